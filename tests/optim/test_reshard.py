"""Checkpoint layouts across shardings, in one process: the block geometry of ``blocks``, the
portable layout DCP's ``get_state_dict`` gets, loading a state saved over other shards, and
FSDP1's dequantized export; for 8-bit states (256-blocks) and 4-bit ones (128-blocks, both
moments' codes in the bytes of state1). (The multi-process cases, FSDP2 ranks included, are
tests/distributed's.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import qoptim
from qoptim.optim import blocks, exports
from qoptim.optim.checkpoint import QUANT_STATE_KEY
from qoptim.quant.blockwise import SMALLEST_POSITIVE_CODE, block_absmax, quantize_with_absmax
from qoptim.quant.formats import FORMATS, format_of, state_map
from qoptim.quant.maps import signed_map, unsigned_map

dcp = pytest.importorskip("torch.distributed.checkpoint")  # (torch may be built without torch.distributed)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# the largest rounding error of each format's signed map, relative to the block's scale: half its widest gap
ROUNDING = {8: 0.01, 4: 0.5 * float((state_map("dynamic4")[1:] - state_map("dynamic4")[:-1]).max())}


def _quantized(x, qmap, blocksize):
    """(codes, block scales) of flat ``x`` as the kernels quantize (nearest code, block absmax)."""
    scales = block_absmax(x, blocksize)
    return quantize_with_absmax(x, scales, qmap, blocksize), scales


def _slots_brute_force(shape, d, shards, k, blocksize):
    """Each element's block slot, by walking every shard's elements in C order."""
    whole = torch.arange(math.prod(shape)).view(shape)
    out = torch.empty(shape, dtype=torch.long)
    for s in range(shards):
        a, b = blocks.chunk_bounds(shape[d], shards, s)
        for j, e in enumerate(whole.narrow(d, a, b - a).reshape(-1).tolist()):
            out.view(-1)[e] = a * k + j // blocksize
    return out


GEOMETRIES = [((255, 256), 0, 2), ((8, 255), 0, 3), ((300,), 0, 4), ((6, 100, 7), 1, 3), ((5, 70), 1, 2), ((3, 300), 0, 1)]


@pytest.mark.parametrize("blocksize", [256, 128])
@pytest.mark.parametrize("shape, d, shards", GEOMETRIES)
def test_block_ids_match_a_walk_over_each_shard(shape, d, shards, blocksize):
    k = blocks.rows_shape(shape, d, blocksize=blocksize)[1]
    assert k == math.ceil(math.prod(shape) // shape[d] / blocksize)
    want = _slots_brute_force(shape, d, shards, k, blocksize)
    for rows in [(0, shape[d])] + [blocks.chunk_bounds(shape[d], shards, s) for s in range(shards)]:
        got = blocks.block_ids(shape, d, shards, rows, blocksize=blocksize)
        assert torch.equal(got, want.narrow(d, rows[0], rows[1] - rows[0])), rows
    whole = blocks.block_ids(shape, d, blocks.ONE_SCALE, (0, shape[d]), blocksize=blocksize)
    assert torch.equal(whole, torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("bits", [8, 4])
def test_moved_keeps_blocks_within_one_saved_block_and_requantizes_the_rest(bits):
    fmt = FORMATS[bits]
    size, qmap = fmt.blocksize, state_map(fmt.signed_map)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    x[:100] *= 0.1  # saved block 0's largest value lies outside [0, 100): requantizing [0, 100) alone would rescale it
    codes, absmax = _quantized(x, qmap, size)
    saved_ids = torch.arange(1024) // size
    dense = qmap[codes.long()] * absmax.repeat_interleave(size)
    # new shards [0, 100) and [100, 1024): the first one's block lies within saved block 0, every
    # block of the second straddles two saved blocks
    head_codes, head_scales = blocks.moved(codes[:100], saved_ids[:100], absmax, qmap, fmt)
    assert torch.equal(head_codes, codes[:100]) and torch.equal(head_scales, absmax[:1])
    tail_codes, tail_scales = blocks.moved(codes[100:], saved_ids[100:], absmax, qmap, fmt)
    assert tail_scales.numel() == math.ceil(924 / size)
    tail = qmap[tail_codes.long()] * tail_scales.repeat_interleave(size)[:924]
    assert 0 < float((tail - dense[100:]).abs().max()) <= ROUNDING[bits] * float(dense.abs().max())
    same_codes, same_scales = blocks.moved(codes, saved_ids, absmax, qmap, fmt)  # the same blocks: bit-exact
    assert torch.equal(same_codes, codes) and torch.equal(same_scales, absmax)


def test_nibbles_come_out_of_and_go_back_into_the_shared_bytes():
    both = torch.arange(256, dtype=torch.uint8)
    low, high = blocks.nibble(both, 0), blocks.nibble(both, 4)
    assert torch.equal(low, both % 16) and torch.equal(high, both // 16)
    assert torch.equal(blocks.with_nibble(both, 15 - low, 0), high * 16 + 15 - low)
    assert torch.equal(blocks.with_nibble(both, 15 - high, 4), (15 - high) * 16 + low)


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
    (qoptim.Lion8bit, {}), (qoptim.PagedAdamW8bit, {}), (qoptim.AdamW4bit, {}), (qoptim.AdamW, {"optim_bits": 4}),
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
    live = opt.state[model[2].weight]
    if live["state1"].dtype == torch.uint8:
        size = format_of(live["qmap1"]).blocksize  # 4-bit: 128, so two blocks per row of 256
        rows = (2, 255, 1) if cls is qoptim.AdEMAMix8bit else (255, 256 // size)
        inner = saved[QUANT_STATE_KEY]
        assert tuple(inner["absmax1"].shape) == rows and "max1" not in inner
        if "absmax2" in inner:  # (4-bit: the second moment's scales too, though its codes are in state1)
            assert tuple(inner["absmax2"].shape) == rows[-2:]
        assert ("state2" in inner) == (size == 256 and cls is not qoptim.Lion8bit)
        assert saved["shards"] == (blocks.ONE_SCALE if kw.get("block_wise") is False else 1)
        # optimizer.state_dict() keeps bitsandbytes' layout
        assert "shards" not in plain and ("max1" in plain[QUANT_STATE_KEY]) == (kw.get("block_wise") is False)
        if kw.get("block_wise", True):
            assert plain[QUANT_STATE_KEY]["absmax1"].shape[-1] == math.ceil(255 * 256 / size)
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


def _codes(state, i):
    """State ``i``'s codes (4-bit: its half of state1's bytes)."""
    if state["qmap1"].numel() == 16:
        return blocks.nibble(state["state1"], 4 * (i - 1))
    return state[f"state{i}"]


@pytest.mark.parametrize("cls", [qoptim.AdamW8bit, qoptim.AdamW4bit])
def test_a_state_saved_over_two_shards_loads_into_one_process(cls):
    """The rows layout of 2 shards (as FSDP2 writes it, built here from each shard's own
    quantization) loaded into a plain optimizer: blocks within one saved block exactly, the blocks
    across the shard boundary within the rounding of the format (4-bit: each moment moved in its
    own half of the bytes, with its own map and 128-blocks)."""
    p = nn.Parameter(torch.zeros(8, 255))
    opt = cls([p], min_8bit_size=256)
    p.grad = torch.zeros_like(p)
    opt.step()
    sd = opt.state_dict()
    inner = dict(sd["state"][0][QUANT_STATE_KEY])
    fmt = format_of(inner["qmap1"])
    size, k = fmt.blocksize, math.ceil(255 / fmt.blocksize)
    signed = torch.randn(8, 255, generator=torch.Generator().manual_seed(1))
    values = {1: signed, 2: signed.abs()}  # state2's map is unsigned
    dense, codes = {}, {}
    for i, v in values.items():
        qmap = inner[f"qmap{i}"]
        codes[i], absmax = torch.empty(8, 255, dtype=torch.uint8), torch.zeros(8, k)
        for s, (a, b) in enumerate([(0, 4), (4, 8)]):
            c, scales = _quantized(v[a:b].reshape(-1), qmap, size)
            codes[i][a:b] = c.view(b - a, 255)
            absmax[a:].view(-1)[: scales.numel()] = scales
            dense[(i, s)] = qmap[c.long()] * scales.repeat_interleave(size)[: c.numel()]
        inner[f"absmax{i}"] = absmax
    if fmt.bits == 4:
        inner["state1"] = codes[1] | (codes[2] << 4)
    else:
        inner["state1"], inner["state2"] = codes[1], codes[2]
    opt.load_state_dict({"state": {0: {"step": 1, "shards": 2, QUANT_STATE_KEY: inner}}, "param_groups": sd["param_groups"]})
    state = opt.state[p]
    within = 1020 // size * size  # shard 1 starts at element 1020: the blocks before it lie within shard 0's
    for i in values:
        assert state[f"absmax{i}"].shape == (math.ceil(2040 / size),)  # flat again
        got = state[f"qmap{i}"][_codes(state, i).reshape(-1).long()] * state[f"absmax{i}"].repeat_interleave(size)[:2040]
        want = torch.cat([dense[(i, 0)], dense[(i, 1)]])
        assert torch.equal(got[:within], want[:within]), "the blocks of shard 0 before its last lie within its saved blocks"
        assert 0 < float((got - want).abs().max()) <= ROUNDING[fmt.bits] * float(want.abs().max())
    assert ("state2" in state) == (fmt.bits == 8)


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
    codes, _ = blocks.requantized(values, unsigned_map(), FORMATS[8])
    assert codes[1] == SMALLEST_POSITIVE_CODE and codes[2] == 0 and codes[0] == 255
    signed_codes, _ = blocks.requantized(values, signed_map(), FORMATS[8])
    assert signed_map()[signed_codes[1].long()] == 0  # a signed state rounds to nearest, as bitsandbytes does


def test_requantized_4_bit_states_round_to_the_nearest_code_of_their_map_in_128_blocks():
    """The 4-bit second moment's map has no zero code: a tiny positive value (and zero) takes its
    smallest code, 1/16 of the scale, as the kernels round it; nothing is raised past a code."""
    fmt = FORMATS[4]
    values = torch.zeros(300)
    values[0], values[1], values[129] = 1.0, 1e-12, 0.3
    codes, scales = blocks.requantized(values, state_map("linear4"), fmt)
    assert scales.tolist() == pytest.approx([1.0, 0.3, 0.0])
    assert codes[0] == 15 and codes[1] == 0 and codes[2] == 0 and codes[129] == 15 and int(codes.max()) <= 15
    signed = torch.linspace(-1, 1, 300)
    signed_codes, signed_scales = blocks.requantized(signed, state_map("dynamic4"), fmt)
    assert signed_scales.numel() == 3
    assert torch.equal(signed_codes, quantize_with_absmax(signed, signed_scales, state_map("dynamic4"), 128))


def _exported_4bit(opt, p):
    """The FSDP1 export of ``p``'s 4-bit state, and the float32 values it must hold (each moment's
    code of the map times its 128-block's scale, decoded here on its own)."""
    state = opt.state[p]
    exported = exports.dequantized_state(dict(state), opt.n_states)
    want = {}
    for i in (1, 2):
        codes = (state["state1"] >> (4 * (i - 1))) & 15
        want[i] = (state[f"qmap{i}"][codes.long()].reshape(-1) * state[f"absmax{i}"].repeat_interleave(128)[: p.numel()]).view(p.shape)
    return exported, want


def test_fsdp1_export_of_a_4_bit_state_holds_both_moments_and_loads_back_into_the_same_bytes():
    """FSDP1 gathers only float32 tensors shaped like the parameter: a 4-bit state goes out as
    state1 and state2 (both moments), without maps or scales, and a 4-bit optimizer loading it
    requantizes into the same bytes (scales to an ulp) and the same continuation."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, 75))
    opt = qoptim.AdamW4bit([p], lr=1e-3, min_8bit_size=256)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    exported, want = _exported_4bit(opt, p)
    assert exported["qoptim_dequantized"] == 1 and not any(k.startswith(("absmax", "qmap")) for k in exported)
    for i in (1, 2):
        assert exported[f"state{i}"].dtype == torch.float32 and torch.equal(exported[f"state{i}"], want[i])
    sd = opt.state_dict()
    for cls, kw in ((qoptim.AdamW4bit, {}), (qoptim.AdamW, {"optim_bits": 4})):
        q = nn.Parameter(p.detach().clone())
        opt2 = cls([q], lr=1e-3, min_8bit_size=256, **kw)
        opt2.load_state_dict({"state": {0: dict(exported)}, "param_groups": sd["param_groups"]})
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys() and torch.equal(a["state1"], b["state1"])
        assert b["qmap1"] is opt2.name2qmap["dynamic4"] and b["qmap2"] is opt2.name2qmap["linear4"]
        for key in ("absmax1", "absmax2"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0)
        r = nn.Parameter(p.detach().clone())  # the run resumed from the checkpoint in bitsandbytes' layout
        ref = qoptim.AdamW4bit([r], lr=1e-3, min_8bit_size=256)
        ref.load_state_dict(sd)
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(5))
        q.grad, r.grad = g.clone(), g.clone()
        opt2.step()
        ref.step()
        assert float((q - r).detach().abs().max()) < 1e-6


@pytest.mark.parametrize("source, dest", [(qoptim.AdamW4bit, qoptim.AdamW8bit), (qoptim.AdamW8bit, qoptim.AdamW4bit)])
def test_an_fsdp1_export_loads_in_the_format_of_the_loading_optimizer(source, dest):
    """The export is float32: the loading optimizer's optim_bits decides the format it is
    requantized into (8-bit: two tensors of codes in 256-blocks; 4-bit: one of shared bytes in
    128-blocks), each value within that format's rounding of its block's scale. (A block's scale
    is chosen so that its largest value of either sign gets an end code of the map exactly: the
    4-bit signed map's ends are -0.8875 and 1, so a scale can exceed the block's largest |value|.)"""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, 75))
    opt = source([p], lr=1e-3, min_8bit_size=256)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    exported = exports.dequantized_state(dict(opt.state[p]), opt.n_states)
    q = nn.Parameter(p.detach().clone())
    opt2 = dest([q], lr=1e-3, min_8bit_size=256)
    opt2.load_state_dict({"state": {0: dict(exported)}, "param_groups": opt.state_dict()["param_groups"]})
    state = opt2.state[q]
    fmt = format_of(state["qmap1"])
    assert fmt is FORMATS[8 if dest is qoptim.AdamW8bit else 4] and ("state2" in state) == (fmt.bits == 8)
    for i in (1, 2):
        got = state[f"qmap{i}"][_codes(state, i).reshape(-1).long()] * state[f"absmax{i}"].repeat_interleave(fmt.blocksize)[: q.numel()]
        want = exported[f"state{i}"].reshape(-1)
        scale = state[f"absmax{i}"].repeat_interleave(fmt.blocksize)[: q.numel()]
        largest = block_absmax(want, fmt.blocksize).repeat_interleave(fmt.blocksize)[: q.numel()]
        assert bool((scale >= largest).all() and (scale <= largest / 0.8875 * (1 + 1e-6)).all()), i
        assert bool(((got - want).abs() <= ROUNDING[fmt.bits] * scale).all()), i


def test_an_incomplete_4_bit_export_is_refused_and_changes_nothing():
    """Both moments share state1's bytes: an export without the second moment is not half loaded."""
    opt, p = None, nn.Parameter(torch.randn(40, 75))
    opt = qoptim.AdamW4bit([p], lr=1e-3, min_8bit_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    exported = exports.dequantized_state(dict(opt.state[p]), opt.n_states)
    del exported["state2"]
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match="holds \\['state1'\\], but AdamW4bit keeps \\['state1', 'state2'\\]"):
        opt.load_state_dict({"state": {0: exported}, "param_groups": opt.state_dict()["param_groups"]})
    after = opt.state[p]
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())
