"""Lean training under torch.distributed on CPU (gloo, 2 processes), on a bf16 model: master
weights and stochastic rounding under FSDP2 (the correction sharded like its parameter, uneven
shards, DCP sharded and full state dicts, the same run as one process fed the same gradients,
gradient release on top), DDP and FSDP1, with 8-bit and 4-bit states; and the FSDP2 run's DCP
checkpoint resharded into one process. One launch of tests/workers/lean_worker.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import qoptim
from support import WORKERS, launch

pytestmark = pytest.mark.integration

FSDP2_RUNS = ["master24", "master24_4bit", "master24_v_stochastic", "master32_fp32_states", "stochastic_fp32_states"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("lean")
    launch(WORKERS / "lean_worker.py", str(out))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", FSDP2_RUNS)
def test_fsdp2(run, name):
    r = run[1][name]
    assert r["loss_fell"] and r["layout_ok"] and r["master_is_dtensor"]
    assert r["dcp_equal"] and r["full_equal"] and r["resumed_equal"]
    # one process fed the gathered gradients: elementwise states give every parameter bit for bit;
    # 8-bit states, those whose shard boundary falls on a 256-block boundary (bias 1's does not) and
    # the small biases' 32-bit ones (3, 5); 4-bit states, 128-blocks: bias 1 too (halves of 128)
    expected = list(range(r["params"])) if "fp32_states" in name else [0, 1, 2, 3, 5] if "4bit" in name else [0, 2, 3, 5]
    assert r["exact"] == expected and r["weights_exact"] == expected


@pytest.mark.parametrize("name", ["ddp", "ddp_v_stochastic"])
def test_ddp_keeps_ranks_equal(run, name):
    assert run[1][name] == {"loss_fell": True, "same_on_ranks": True}


@pytest.mark.parametrize("name", ["release_master24", "release_master24_4bit"])
def test_fsdp2_gradient_release_on_top_matches_the_normal_loop(run, name):
    r = run[1][name]
    assert r["equal"], "weights, master corrections and states must equal the normal loop's, bit for bit"
    assert r["freed"] and r["four_bit"] == ("4bit" in name)


@pytest.mark.parametrize(("name", "bits"), [("fsdp1", 8), ("fsdp1_4bit", 4)])
def test_fsdp1_exports_and_loads_the_master(run, name, bits):
    r = run[1][name]
    assert "error" not in r, r.get("error")
    assert r["loss_fell"] and r["export_shape"] == [255, 256] and r["round_trip_equal"]
    assert r["states_bits"] == [bits]


@pytest.mark.parametrize(("name", "cls", "kw"), [("master24", qoptim.AdamW8bit, dict(min_8bit_size=256, master_weight_bits=24)),
                                                 ("master24_4bit", qoptim.AdamW4bit, dict(min_8bit_size=256, master_weight_bits=24)),
                                                 ("master24_v_stochastic", qoptim.AdamW8bit,
                                                  dict(min_8bit_size=256, master_weight_bits=24, state_rounding="stochastic")),
                                                 ("master32_fp32_states", qoptim.AdamW, dict(master_weight_bits=32))])  # fmt: skip
def test_a_two_rank_checkpoint_loads_into_one_process(run, name, cls, kw):
    out, _ = run
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8)).bfloat16()
    opt = cls(model.parameters(), lr=3e-3, **kw)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(out / f"{name}_dcp"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    saved = torch.load(out / f"{name}_masters.pt", weights_only=True)
    for p, want in zip(model.parameters(), saved):
        assert torch.equal(opt.master_weight(p).view(torch.int32), want.view(torch.int32))
