"""Checkpoint layouts across shardings, in one process: the block geometry of ``blocks``, the
portable layout DCP's ``get_state_dict`` gets, and loading a state saved over other shards.
(The multi-process cases, FSDP2 ranks included, are tests/distributed's.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import qoptim
from qoptim.optim import blocks
from qoptim.optim.checkpoint import QUANT_STATE_KEY
from qoptim.quant.blockwise import SMALLEST_POSITIVE_CODE, quantize_blockwise
from qoptim.quant.maps import signed_map, unsigned_map

dcp = pytest.importorskip("torch.distributed.checkpoint")  # (torch may be built without torch.distributed)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _slots_brute_force(shape, d, shards, k):
    """Each element's block slot, by walking every shard's elements in C order."""
    whole = torch.arange(math.prod(shape)).view(shape)
    out = torch.empty(shape, dtype=torch.long)
    for s in range(shards):
        a, b = blocks.chunk_bounds(shape[d], shards, s)
        for j, e in enumerate(whole.narrow(d, a, b - a).reshape(-1).tolist()):
            out.view(-1)[e] = a * k + j // 256
    return out


GEOMETRIES = [((255, 256), 0, 2), ((8, 255), 0, 3), ((300,), 0, 4), ((6, 100, 7), 1, 3), ((5, 70), 1, 2), ((3, 300), 0, 1)]


@pytest.mark.parametrize("shape, d, shards", GEOMETRIES)
def test_block_ids_match_a_walk_over_each_shard(shape, d, shards):
    k = blocks.rows_shape(shape, d)[1]
    want = _slots_brute_force(shape, d, shards, k)
    for rows in [(0, shape[d])] + [blocks.chunk_bounds(shape[d], shards, s) for s in range(shards)]:
        got = blocks.block_ids(shape, d, shards, rows)
        assert torch.equal(got, want.narrow(d, rows[0], rows[1] - rows[0])), rows
    assert torch.equal(blocks.block_ids(shape, d, blocks.ONE_SCALE, (0, shape[d])), torch.zeros(shape, dtype=torch.long))


def test_moved_keeps_blocks_within_one_saved_block_and_requantizes_the_rest():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    x[:100] *= 0.1  # saved block 0's largest value lies outside [0, 100): requantizing [0, 100) alone would rescale it
    codes, state = quantize_blockwise(x)
    qmap, saved_ids = state.code, torch.arange(1024) // 256
    dense = qmap[codes.long()] * state.absmax.repeat_interleave(256)
    # new shards [0, 100) and [100, 1024): the first one's block lies within saved block 0, every
    # block of the second straddles two saved blocks
    head_codes, head_scales = blocks.moved(codes[:100], saved_ids[:100], state.absmax, qmap)
    assert torch.equal(head_codes, codes[:100]) and torch.equal(head_scales, state.absmax[:1])
    tail_codes, tail_scales = blocks.moved(codes[100:], saved_ids[100:], state.absmax, qmap)
    assert tail_scales.numel() == 4
    tail = qmap[tail_codes.long()] * tail_scales.repeat_interleave(256)[:924]
    assert 0 < float((tail - dense[100:]).abs().max()) <= 0.01 * float(dense.abs().max())
    same_codes, same_scales = blocks.moved(codes, saved_ids, state.absmax, qmap)  # the same blocks: bit-exact
    assert torch.equal(same_codes, codes) and torch.equal(same_scales, state.absmax)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8))


def _train(model, opt, steps):
    for step in steps:
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


CASES = [
    (qoptim.AdamW8bit, {}), (qoptim.AdamW8bit, {"block_wise": False}), (qoptim.AdamW32bit, {}), (qoptim.AdEMAMix8bit, {}),
    (qoptim.Lion8bit, {}), (qoptim.PagedAdamW8bit, {}),
]  # fmt: skip


@pytest.mark.parametrize("cls, kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_plain_dcp_round_trip_is_exact(cls, kw, tmp_path):
    """README's DCP recipe in one process: the portable layout goes out (scales in rows form, the
    layout recorded) and comes back as the same live state, and the runs go on bit for bit. Only a
    one-scale state's ``new_max`` (the previous step's scale, which the update never reads) comes
    back as the current scale."""
    model = _model()
    opt = cls(model.parameters(), lr=1e-3, min_8bit_size=256, **kw)
    _train(model, opt, range(3))
    plain = opt.state_dict()["state"][2]
    msd, osd = get_state_dict(model, opt)
    saved = osd["state"]["2.weight"]
    if opt.state[model[2].weight]["state1"].dtype == torch.uint8:
        rows = (2, 255, 1) if cls is qoptim.AdEMAMix8bit else (255, 1)
        assert tuple(saved[QUANT_STATE_KEY]["absmax1"].shape) == rows and "max1" not in saved[QUANT_STATE_KEY]
        assert saved["shards"] == (blocks.ONE_SCALE if kw.get("block_wise") is False else 1)
        # optimizer.state_dict() keeps bitsandbytes' layout
        assert "shards" not in plain and ("max1" in plain[QUANT_STATE_KEY]) == (kw.get("block_wise") is False)
        if kw.get("block_wise", True):
            assert plain[QUANT_STATE_KEY]["absmax1"].shape[-1] == math.ceil(255 * 256 / 256)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    model2 = _model()
    opt2 = cls(model2.parameters(), lr=1e-3, min_8bit_size=256, **kw)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p, q in zip(model.parameters(), model2.parameters()):
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys()
        for key, value in a.items():
            want = a["max" + key[-1]] if key.startswith("new_max") else value
            assert torch.equal(b[key], want) if isinstance(value, torch.Tensor) else b[key] == value, key
    _train(model, opt, range(3, 5))
    _train(model2, opt2, range(3, 5))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def _fqn_keyed(model, osd):
    """An ``optimizer.state_dict()`` keyed by parameter names, as DCP's get_state_dict writes it."""
    names = [name for name, _ in model.named_parameters()]
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]
    return {"state": {names[i]: v for i, v in osd["state"].items()}, "param_groups": groups}


@pytest.mark.parametrize("block_wise", [True, False])
def test_checkpoints_in_bitsandbytes_layout_load_as_full_state_dicts(block_wise, tmp_path):
    """A DCP checkpoint of a plain run written before the portable layout (bitsandbytes' layout,
    no record) loads as a full state dict (``dcp_to_torch_save``, then ``set_state_dict`` with
    ``full_state_dict=True``), exactly; README's direct recipe asks for the portable layout and
    refuses it. A one-scale state stays one-scale even where the destination's own state dict (which
    set_state_dict merges the loaded one into) had block scales."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model = _model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=256, block_wise=block_wise)
    _train(model, opt, range(3))
    dcp.save({"model": model.state_dict(), "optim": _fqn_keyed(model, opt.state_dict())}, checkpoint_id=str(tmp_path / "old"))
    model2 = _model()
    opt2 = qoptim.AdamW8bit(model2.parameters(), lr=1e-3, min_8bit_size=256)  # block-wise either way
    msd2, osd2 = get_state_dict(model2, opt2)
    with pytest.raises(dcp.api.CheckpointException) as refused:
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=str(tmp_path / "old"))
    assert "Missing key in checkpoint state_dict: optim.state.0.weight.shards" in str(list(refused.value.failures.values()))
    dcp_to_torch_save(str(tmp_path / "old"), str(tmp_path / "old.pt"))
    saved = torch.load(tmp_path / "old.pt", weights_only=True)
    model3 = _model()
    opt3 = qoptim.AdamW8bit(model3.parameters(), lr=1e-3, min_8bit_size=256)
    full = StateDictOptions(full_state_dict=True)
    set_state_dict(model3, opt3, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=full)
    for p, q in zip(model.parameters(), model3.parameters()):
        a, b = opt.state[p], opt3.state[q]
        assert a.keys() == b.keys()
        assert all(torch.equal(b[k], v) if isinstance(v, torch.Tensor) else b[k] == v for k, v in a.items())


def test_a_state_saved_over_two_shards_loads_into_one_process():
    """The rows layout of 2 shards (as FSDP2 writes it, built here from each shard's own
    quantization) loaded into a plain optimizer: blocks within one saved block exactly, the blocks
    across the shard boundary within the 8-bit rounding."""
    p = nn.Parameter(torch.zeros(8, 255))
    opt = qoptim.AdamW8bit([p], min_8bit_size=256)
    p.grad = torch.zeros_like(p)
    opt.step()
    sd = opt.state_dict()
    signed = torch.randn(8, 255, generator=torch.Generator().manual_seed(1))
    values = {1: signed, 2: signed.abs()}  # state2's map is unsigned
    inner = dict(sd["state"][0][QUANT_STATE_KEY])
    dense = {}
    for i, v in values.items():
        qmap = inner[f"qmap{i}"]
        codes, absmax = torch.empty(8, 255, dtype=torch.uint8), torch.zeros(8, 1)
        for s, (a, b) in enumerate([(0, 4), (4, 8)]):
            c, q = quantize_blockwise(v[a:b].reshape(-1), qmap)
            codes[a:b] = c.view(b - a, 255)
            absmax.view(-1)[a : a + q.absmax.numel()] = q.absmax
            dense[(i, s)] = (qmap[c.long()] * q.absmax.repeat_interleave(256)[: c.numel()])
        inner[f"state{i}"], inner[f"absmax{i}"] = codes, absmax
    opt.load_state_dict({"state": {0: {"step": 1, "shards": 2, QUANT_STATE_KEY: inner}}, "param_groups": sd["param_groups"]})
    state = opt.state[p]
    for i in values:
        assert state[f"absmax{i}"].shape == (8,)  # flat again: ceil(2040 / 256) blocks
        got = state[f"qmap{i}"][state[f"state{i}"].reshape(-1).long()] * state[f"absmax{i}"].repeat_interleave(256)[:2040]
        want = torch.cat([dense[(i, 0)], dense[(i, 1)]])
        assert torch.equal(got[:768], want[:768]), "blocks 0-2 lie within shard 0's blocks 0-2"
        assert float((got - want).abs().max()) <= 0.01 * float(want.abs().max())


@pytest.mark.parametrize("record", [-1, "2", 1.5, True])
def test_a_bad_layout_record_is_refused_and_changes_nothing(record):
    p = nn.Parameter(torch.randn(8, 255))
    opt = qoptim.AdamW8bit([p], min_8bit_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    sd["state"][0]["shards"] = record
    with pytest.raises(ValueError, match="'shards' record"):
        opt.load_state_dict(sd)
    after = opt.state[p]
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())


def test_scales_of_another_shape_in_the_rows_form_are_refused():
    p = nn.Parameter(torch.randn(8, 255))
    opt = qoptim.AdamW8bit([p], min_8bit_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["shards"] = 2
    sd["state"][0][QUANT_STATE_KEY]["absmax1"] = torch.ones(8, 2)  # rows form of (8, 255): (8, 1)
    with pytest.raises(ValueError, match="absmax1 must be a float32 tensor of shape"):
        opt.load_state_dict(sd)


def test_requantized_never_negative_state_keeps_positive_values_off_code_zero():
    """Loading across layouts requantizes as the optimizers do: a tiny positive second moment
    next to a large one in its block takes the smallest positive code, not zero; zero stays zero."""
    values = torch.zeros(300)
    values[0], values[1] = 1.0, 1e-12
    codes, _ = blocks.requantized(values, unsigned_map())
    assert codes[1] == SMALLEST_POSITIVE_CODE and codes[2] == 0 and codes[0] == 255
    signed_codes, _ = blocks.requantized(values, signed_map())
    assert signed_map()[signed_codes[1].long()] == 0  # a signed state rounds to nearest, as bitsandbytes does
