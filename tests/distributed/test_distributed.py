"""qoptim under torch.distributed on CPU (gloo, 2 processes): DDP, ZeroRedundancyOptimizer, FSDP2
(DTensor) with DCP sharded and full checkpoints, FSDP1 optimizer state dicts, then a reload of the
FSDP2 checkpoints into one plain process (another world size: the 8-bit blocks are requantized).

One launch of tests/workers/dist_worker.py runs every multi-process case (each process costs
seconds to start); the tests below read its results.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import qoptim
from support import WORKERS, launch

pytestmark = pytest.mark.integration

WORKER = WORKERS / "dist_worker.py"


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    launch(WORKER, str(out))
    return out, json.loads((out / "results.json").read_text())


def test_ddp_and_dcp(dist_run):
    r = dist_run[1]["ddp"]
    assert r["loss_last"] < 0.2 * r["loss_first"]
    assert r["params_same"] and r["states_same"] and r["uint8_states"] == 4
    assert r["dcp_restored"], "DCP save -> load into a fresh optimizer must restore the state bit for bit"
    assert r["dcp_resumed_equal"]


def test_zero_redundancy_optimizer(dist_run):
    r = dist_run[1]["zero"]
    assert r["loss_last"] < 0.2 * r["loss_first"]
    assert r["params_same"] and r["resumed_equal"]


def test_fsdp2_dtensor_state_and_dcp(dist_run):
    r = dist_run[1]["fsdp2"]
    assert r["loss_last"] < 0.5 * r["loss_first"]
    assert r["layout_ok"], "8-bit state must be DTensors with the parameter's placements, shaped like its local shard"
    assert r["aligned_exact"], "shards on 256-block boundaries: the same update as one process, bit for bit"
    assert r["vs_single_rel"] < 0.1
    assert r["dcp_sharded_equal"] and r["dcp_full_equal"] and r["resumed_equal"]


def test_fsdp2_other_families(dist_run):
    r = dist_run[1]["fsdp2_families"]
    for name in ("AdEMAMix8bit", "Lion8bit", "AdamW32bit", "RMSprop8bit"):
        assert r[name]["loss_fell"], name
        assert r[name]["restored"], (name, r[name]["mismatch"])
        assert r[name]["resumed_equal"], name
    assert r["LAMB8bit_refused"], "LAMB needs the whole parameter's norm: sharded params must be refused"


@pytest.mark.parametrize("orig", [0, 1])
def test_fsdp1_optim_state_dict_round_trip(dist_run, orig):
    r = dist_run[1][f"fsdp1_orig{orig}"]
    assert r["loss_last"] < 0.5 * r["loss_first"]
    assert r["export_ok"], "FSDP1 must see float32 states shaped like the original parameter"
    assert r["uint8_again"], "loading must requantize to 8-bit states"
    assert r["codes_exact"], r["mismatch"]
    assert r["scale_max_rel"] < 1e-6
    assert r["resumed_max_diff"] < 1e-3
    assert r["dcp_codes_exact"], r["dcp_mismatch"]  # get_state_dict / dcp / set_state_dict on the FSDP1 model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8))


def _dense(opt) -> dict[str, torch.Tensor]:
    out = {}
    for index, p in enumerate(opt.param_groups[0]["params"]):
        state = opt.state[p]
        for i in (1, 2):
            v = state[f"state{i}"]
            if v.dtype == torch.uint8:
                n = v.numel()
                scales = state[f"absmax{i}"].reshape(-1)[: math.ceil(n / 256)]
                v = (state[f"qmap{i}"][v.reshape(-1).long()] * scales.repeat_interleave(256)[:n]).view(v.shape)
            out[f"{index}.state{i}"] = v
    return out


@pytest.mark.parametrize("source", ["dcp", "full"])
def test_fsdp2_checkpoint_reloads_into_one_process(dist_run, source, tmp_path):
    """World size 2 -> 1: codes reshard exactly, the per-shard blocks are requantized."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    out = dist_run[0]
    if source == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(out / "fsdp2_dcp"), str(tmp_path / "converted.pt"))
        saved = torch.load(tmp_path / "converted.pt", weights_only=True)
    else:
        saved = torch.load(out / "fsdp2_full.pt", weights_only=True)
    model = _model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=256)
    set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    assert all(s["step"] == 10 for s in opt.state.values())
    expected = torch.load(out / "fsdp2_dense.pt", weights_only=True)
    got = _dense(opt)
    for key, want in expected.items():
        index = int(key.split(".")[0])
        err = float((got[key] - want).abs().max())
        scale = float(want.abs().max())
        if index in (0, 2):  # shard boundaries on block boundaries: the same blocks
            assert err <= 1e-6 * scale, (key, err, scale)
        else:  # requantized into other blocks: within the 8-bit error
            assert err <= 0.05 * scale, (key, err, scale)
        assert opt.state[opt.param_groups[0]["params"][index]][f"state{key[-1]}"].dtype == (torch.uint8 if index != 3 and index != 5 else torch.float32)
    # and training goes on
    target = torch.randn(64, 8, generator=torch.Generator().manual_seed(7)) / 8
    losses = []
    for step in range(10):
        g = torch.Generator().manual_seed(1000 + step % 4)
        x = torch.randn(32, 64, generator=g)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ target))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cls", [qoptim.AdamW8bit, qoptim.AdEMAMix8bit, qoptim.Lion8bit])
def test_dequantized_layout_round_trip_single_process(cls):
    """The layout qoptim hands FSDP1 (float32 states, flat, no absmax/qmap) loads back into the
    same 8-bit codes; plain ``state_dict()`` keeps bitsandbytes' nested layout."""
    from qoptim.optim import reshard
    from qoptim.optim.optimizer import QUANT_STATE_KEY

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, 75))
    opt = cls([p], lr=1e-3, min_8bit_size=256)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert QUANT_STATE_KEY in sd["state"][0] and "shards" not in sd["state"][0]
    exported = reshard.dequantized_state(dict(opt.state[p]), opt.n_states)  # what FSDP1 is handed
    assert exported["qoptim_dequantized"] == 1 and not any(k.startswith(("absmax", "qmap")) for k in exported)
    assert all(exported[f"state{i}"].dtype == torch.float32 for i in range(1, opt.n_states + 1))
    q = nn.Parameter(p.detach().clone())
    opt2 = cls([q], lr=1e-3, min_8bit_size=256)
    opt2.load_state_dict({"state": {0: exported}, "param_groups": sd["param_groups"]})
    for key, value in opt.state[p].items():
        got = opt2.state[q][key]
        if key.startswith("absmax"):
            torch.testing.assert_close(got, value, rtol=1e-6, atol=0)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got, value), key
        else:
            assert got == value, key
