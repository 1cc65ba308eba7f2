"""qoptim under torch.distributed on CPU (gloo, 2 processes): DDP, ZeroRedundancyOptimizer, FSDP2
(DTensor) with DCP sharded and full checkpoints, FSDP1 optimizer state dicts, and checkpoints moving
between one device and FSDP2 ranks both ways (DCP and full state dicts; the blocks cut by a new
shard boundary are requantized, the others come back exactly); with 8-bit states and 4-bit ones
(AdamW4bit: both moments' codes in state1's bytes, 128-blocks).

One launch of tests/workers/dist_worker.py runs every multi-process case (each process costs
seconds to start); the tests below read its results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    _write_plain_checkpoints(out / "plain")
    launch(WORKER, str(out))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", ["ddp", "ddp_4bit"])
def test_ddp_and_dcp(dist_run, name):
    r = dist_run[1][name]
    assert r["loss_last"] < 0.2 * r["loss_first"]
    assert r["params_same"] and r["states_same"] and r["uint8_states"] == 4
    assert r["dcp_restored"], "DCP save -> load into a fresh optimizer must restore the state bit for bit"
    assert r["dcp_resumed_equal"]


def test_zero_redundancy_optimizer(dist_run):
    r = dist_run[1]["zero"]
    assert r["loss_last"] < 0.2 * r["loss_first"]
    assert r["params_same"] and r["resumed_equal"]


# The quantized params of the worker's model, and those that 2 shards split on block boundaries: weights 0
# (256x64) and 2 (255x256, uneven: 128 and 127 rows) on 256-block boundaries; bias 1 (256) into halves of
# its one 256-block, which are 128-blocks. Weight 4 (8x255) splits at element 1020: rank 1's blocks straddle
# a plain run's, and are requantized. 3 and 5 are 32-bit (elementwise: always the same).
QUANTIZED = [0, 1, 2, 4]
SAME_BLOCKS_BOTH_WAYS = {"fsdp2": [0, 2], "fsdp2_4bit": [0, 1, 2]}


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_4bit"])
def test_fsdp2_dtensor_state_and_dcp(dist_run, name):
    r = dist_run[1][name]
    assert r["loss_last"] < 0.5 * r["loss_first"]
    assert r["layout_ok"], "quantized states must be DTensors with the parameter's placements, shaped like its local shard"
    # shards on block boundaries, and 32-bit states: the same update as one process, bit for bit
    assert r["exact"] == sorted([*SAME_BLOCKS_BOTH_WAYS[name], 3, 5])
    assert r["vs_single_rel"] < 0.1
    assert r["dcp_sharded_equal"] and r["dcp_full_equal"] and r["resumed_equal"]


def test_fsdp2_other_families(dist_run):
    r = dist_run[1]["fsdp2_families"]
    for name in ("AdEMAMix8bit", "Lion8bit", "AdamW32bit", "RMSprop8bit"):
        assert r[name]["loss_fell"], name
        assert r[name]["restored"], (name, r[name]["mismatch"])
        assert r[name]["resumed_equal"], name
    assert r["LAMB8bit_refused"], "LAMB needs the whole parameter's norm: sharded params must be refused"


@pytest.mark.parametrize("name", ["fsdp1", "fsdp1_4bit"])
@pytest.mark.parametrize("orig", [0, 1])
def test_fsdp1_optim_state_dict_round_trip(dist_run, orig, name):
    r = dist_run[1][f"{name}_orig{orig}"]
    assert r["loss_last"] < 0.5 * r["loss_first"]
    assert r["export_ok"], "FSDP1 must see float32 states shaped like the original parameter (both moments)"
    assert r["uint8_again"], "loading must requantize into the optimizer's format"
    assert r["codes_exact"], r["mismatch"]
    assert r["scale_max_rel"] < 1e-6
    assert r["resumed_max_diff"] < 1e-3
    assert r["dcp_codes_exact"], r["dcp_mismatch"]  # get_state_dict / dcp / set_state_dict on the FSDP1 model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The worker's batches, whole (both ranks' halves)."""
    target = torch.randn(64, 8, generator=torch.Generator().manual_seed(7)) / 8
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1000 + step % 4))
    return x, torch.tanh(x @ target)


def _train(model, opt, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _values(opt) -> dict[str, torch.Tensor]:
    """Each state's float32 values (8-bit: code * its block's scale, or the one scale; 4-bit: the
    state's half of state1's bytes, in 128-blocks)."""
    out = {}
    for index, p in enumerate(opt.param_groups[0]["params"]):
        state = opt.state[p]
        for i in (1, 2):
            four_bit = "qmap1" in state and state["qmap1"].numel() == 16
            v = (state["state1"] >> (4 * (i - 1))) & 15 if four_bit else state[f"state{i}"]
            if v.dtype == torch.uint8 and f"max{i}" in state:
                v = state[f"qmap{i}"][v.long()] * state[f"max{i}"]
            elif v.dtype == torch.uint8:
                n, size = v.numel(), 128 if four_bit else 256
                scales = state[f"absmax{i}"].reshape(-1)[: math.ceil(n / size)]
                v = (state[f"qmap{i}"][v.reshape(-1).long()] * scales.repeat_interleave(size)[:n]).view(v.shape)
            out[f"{index}.state{i}"] = v.clone()
    return out


# plain runs that the worker resumes on FSDP2 ranks: (class, plain kwargs, FSDP2 kwargs). FSDP2 has no
# block_wise=False (one scale needs the whole parameter): that run resumes block-wise, every scale the one scale.
PLAIN_CASES = {
    "blockwise": ("AdamW8bit", {"min_8bit_size": 256}, {"min_8bit_size": 256}),
    "one_scale": ("AdamW8bit", {"min_8bit_size": 256, "block_wise": False}, {"min_8bit_size": 256}),
    "fp32": ("AdamW32bit", {}, {}),
    "fourbit": ("AdamW4bit", {"min_8bit_size": 256}, {"min_8bit_size": 256}),
}
PLAIN_STEPS = 5


def _write_plain_checkpoints(root: Path) -> None:
    """For each plain case: PLAIN_STEPS steps in this process, then a DCP checkpoint (README's
    recipe), a full state dict from ``get_state_dict``, ``optimizer.state_dict()`` keyed by name
    (bitsandbytes' layout) and the states' values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root.mkdir()
    cases = {}
    for name, (cls_name, plain_kw, fsdp2_kw) in PLAIN_CASES.items():
        model = _model()
        opt = getattr(qoptim, cls_name)(model.parameters(), lr=3e-3, **plain_kw)
        _train(model, opt, range(PLAIN_STEPS))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(root / f"{name}_dcp"))
        fmsd, fosd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        torch.save({"model": fmsd, "optim": fosd}, root / f"{name}_full.pt")
        torch.save(_values(opt), root / f"{name}_dense.pt")
        names = [n for n, _ in model.named_parameters()]  # optimizer.state_dict(), bitsandbytes' layout, keyed by name
        bnb = opt.state_dict()
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in bnb["param_groups"]]
        bnb = {"state": {names[i]: v for i, v in bnb["state"].items()}, "param_groups": groups}
        torch.save({"model": model.state_dict(), "optim": bnb}, root / f"{name}_bnb.pt")
        cases[name] = {"cls": cls_name, "plain_kw": plain_kw, "fsdp2_kw": fsdp2_kw, "steps": PLAIN_STEPS}
    (root / "cases.json").write_text(json.dumps(cases))


def test_plain_checkpoint_resumes_on_fsdp2(dist_run):
    """One device -> 2 FSDP2 ranks, by DCP (README's recipe) and by full state dicts (from
    get_state_dict, also broadcast from rank 0, and optimizer.state_dict()'s layout): exact wherever
    a new block lies within one saved block, else within the rounding of the format; the same state
    all three ways; exact continuation where the blocks are the same."""
    r = dist_run[1]["plain_to_fsdp2"]
    states = {f"{i}.state{s}" for i in range(6) for s in (1, 2)}
    for name, case in r.items():
        assert case["steps"] == [PLAIN_STEPS], name
        assert case["full_same"] and case["bnb_same"] and case["broadcast_same"], name
        assert case["loss_last"] < case["loss_first"], name
    blockwise = r["blockwise"]
    assert blockwise["uint8"] == QUANTIZED
    assert set(blockwise["exact"]) == states - {"4.state1", "4.state2"}, blockwise["exact"]
    assert 0 < blockwise["max_rel"] <= 0.02, "weight 4's requantized blocks move by at most the 8-bit rounding"
    assert set(blockwise["continued_exact"]) >= {0, 2, 3, 5}, blockwise["continued_exact"]
    # 4-bit: each moment moved in its half of the bytes, requantized in 128-blocks where cut (weight 4's rank 1)
    fourbit = r["fourbit"]
    assert fourbit["uint8"] == QUANTIZED
    assert set(fourbit["exact"]) == states - {"4.state1", "4.state2"}, fourbit["exact"]
    assert 0 < fourbit["max_rel"] <= 0.15, "weight 4's requantized blocks move by at most the 4-bit rounding"
    assert set(fourbit["continued_exact"]) >= {0, 1, 2, 3, 5}, fourbit["continued_exact"]
    # one scale -> block-wise with every scale the one scale: the values stay exactly as they were
    assert r["one_scale"]["uint8"] == QUANTIZED and set(r["one_scale"]["exact"]) == states
    fp32 = r["fp32"]
    assert fp32["uint8"] == [] and set(fp32["exact"]) == states and fp32["continued_exact"] == list(range(6))


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_4bit"])
def test_fsdp2_checkpoint_resumes_on_plain_ranks(dist_run, name):
    """2 FSDP2 ranks -> a plain model on each rank, by DCP and by a full state dict broadcast from
    rank 0: the same state as one process fed the same gradients where the blocks are the same,
    and the same continuation."""
    r = dist_run[1][f"{name}_to_plain"]
    same = {*SAME_BLOCKS_BOTH_WAYS[name], 3, 5}
    for label in ("dcp", "broadcast"):
        assert r[label]["steps"] == [10], label
        assert set(r[label]["exact"]) >= same, (label, r[label]["exact"])
        assert set(r[label]["continued_exact"]) >= same, (label, r[label]["continued_exact"])
        assert r[label]["same_on_ranks"], label


@pytest.mark.parametrize(("name", "cls"), [("fsdp2", qoptim.AdamW8bit), ("fsdp2_4bit", qoptim.AdamW4bit)])
@pytest.mark.parametrize("source", ["dcp", "dcp_to_torch_save", "full"])
def test_fsdp2_checkpoint_reloads_into_one_process(dist_run, source, name, cls, tmp_path):
    """World size 2 -> 1: codes reshard exactly, the per-shard blocks are requantized (4-bit: each
    moment in its half of the bytes, within the 4-bit rounding)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    out = dist_run[0]
    model = _model()
    opt = cls(model.parameters(), lr=3e-3, min_8bit_size=256)
    if source == "dcp":  # README's recipe, straight into one process
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        saved = {"model": msd, "optim": osd}
        dcp.load(saved, checkpoint_id=str(out / f"{name}_dcp"))
    elif source == "dcp_to_torch_save":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(out / f"{name}_dcp"), str(tmp_path / "converted.pt"))
        saved = torch.load(tmp_path / "converted.pt", weights_only=True)
    else:
        saved = torch.load(out / f"{name}_full.pt", weights_only=True)
    set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    assert all(s["step"] == 10 for s in opt.state.values())
    expected = torch.load(out / f"{name}_dense.pt", weights_only=True)
    got = _values(opt)
    for key, want in expected.items():
        index = int(key.split(".")[0])
        err = float((got[key] - want).abs().max())
        scale = float(want.abs().max())
        if index in SAME_BLOCKS_BOTH_WAYS[name]:  # shard boundaries on block boundaries: the same blocks, exactly
            assert err == 0, (key, err, scale)
        else:  # requantized into other blocks: within the error of the format
            assert err <= (0.05 if cls is qoptim.AdamW8bit else 0.15) * scale, (key, err, scale)
        state = opt.state[opt.param_groups[0]["params"][index]]
        assert state["state1"].dtype == (torch.uint8 if index in QUANTIZED else torch.float32)
        assert ("state2" in state) == (cls is qoptim.AdamW8bit or index not in QUANTIZED)
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
    from qoptim.optim import exports
    from qoptim.optim.optimizer import QUANT_STATE_KEY

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, 75))
    opt = cls([p], lr=1e-3, min_8bit_size=256)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert QUANT_STATE_KEY in sd["state"][0] and "shards" not in sd["state"][0]
    exported = exports.dequantized_state(dict(opt.state[p]), opt.n_states)  # what FSDP1 is handed
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


def test_fsdp2_32bit_and_one_scale_destinations(dist_run):
    """2 FSDP2 ranks -> one process by README's DCP recipe: 32-bit states exactly; 8-bit states
    into an optimizer built with block_wise=False stay block-wise (a loaded state keeps its form)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = dist_run[0]
    one_scale = {"block_wise": False, "min_8bit_size": 256}
    for cls, kw, path in ((qoptim.AdamW32bit, {}, "fam_AdamW32bit"), (qoptim.AdamW8bit, one_scale, "fsdp2_dcp")):
        model = _model()
        opt = cls(model.parameters(), lr=3e-3, **kw)
        msd, osd = get_state_dict(model, opt)
        saved = {"model": msd, "optim": osd}
        dcp.load(saved, checkpoint_id=str(out / path))
        set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
        got = _values(opt)
        if cls is qoptim.AdamW32bit:
            expected = torch.load(out / "fam_AdamW32bit_dense.pt", weights_only=True)
            assert all(torch.equal(got[k], v) for k, v in expected.items())
        else:
            expected = torch.load(out / "fsdp2_dense.pt", weights_only=True)
            for key, want in expected.items():
                assert float((got[key] - want).abs().max()) <= 0.05 * float(want.abs().max()), key
            quantized = [s for s in opt.state.values() if s["state1"].dtype == torch.uint8]
            assert quantized and all("absmax1" in s and "max1" not in s for s in quantized)
        losses = _train(model, opt, range(10, 16))
        assert losses[-1] < losses[0], cls.__name__
