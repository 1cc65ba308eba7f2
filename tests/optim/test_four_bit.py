"""4-bit states (``optim_bits=4``, Adam4bit, AdamW4bit, Paged*): their layout and bytes, maps,
what a NaN gradient leaves, the zero-point rule, checkpoints (checked, loaded into other classes),
and the lean-training settings on top. Closeness to torch is test_adam's; resume test_resume's."""

from __future__ import annotations

import math

import pytest
import torch
from support import dequantized, round_trip

import qoptim
from qoptim.optim import AdamW4bit, AdamW8bit, Lion8bit
from qoptim.optim import weights
from qoptim.quant.formats import FORMATS, format_of, state_map

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

KEYS = ["step", "state1", "qmap1", "qmap2", "absmax1", "absmax2", "rounding_seed"]  # (the seed keys v's rounding)


def stepped(cls=AdamW4bit, shape=(70, 90), steps=3, seed=0, **kwargs):
    """An optimizer over one parameter of ``shape`` after ``steps`` steps of random gradients."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=g))
    opt = cls([p], **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=g) * 0.01
        opt.step()
    return opt, p


def live_state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def test_the_formats_maps_are_what_formats_says():
    four = FORMATS[4]
    signed, unsigned = state_map(four.signed_map), state_map(four.unsigned_map)
    assert signed.shape == unsigned.shape == (16,) and format_of(signed) is four
    assert bool((signed[1:] > signed[:-1]).all()) and signed.max() == 1 and 0.0 in signed.tolist()
    assert unsigned.tolist() == [k / 16 for k in range(1, 17)]  # linear, and no zero code
    assert four.zero_free_unsigned and not FORMATS[8].zero_free_unsigned
    assert state_map(FORMATS[8].unsigned_map)[0] == 0


def test_both_moments_share_one_byte_per_element_and_take_1_0625_bytes_per_parameter():
    opt, p = stepped(shape=(1024, 1024), steps=1)
    state = opt.state[p]
    assert list(state) == KEYS
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p.shape
    assert state["absmax1"].shape == state["absmax2"].shape == (1024 * 1024 // 128,)
    assert state["qmap1"] is opt.name2qmap["dynamic4"] and state["qmap2"] is opt.name2qmap["linear4"]
    per_param = live_state_bytes(opt) / p.numel()
    assert per_param <= 1.07 and per_param == pytest.approx(1.0625, abs=1e-3)  # 0.5 + 0.5 + 2 * 4/128 (+ the maps)


def test_the_generic_classes_take_optim_bits_4_and_step_as_the_4_bit_class():
    a, pa = stepped(AdamW4bit, seed=3)
    b, pb = stepped(qoptim.optim.AdamW, seed=3, optim_bits=4)
    assert torch.equal(pa, pb) and all(torch.equal(a.state[pa][k], b.state[pb][k]) for k in KEYS[1:-1])
    assert a.state[pa]["rounding_seed"] == b.state[pb]["rounding_seed"]
    c, pc = stepped(qoptim.optim.PagedAdam4bit, seed=3, weight_decay=0.01)
    assert c.state[pc]["qmap1"].numel() == 16


def test_small_tensors_keep_fp32_states():
    opt, p = stepped(shape=(4095,))
    assert opt.state[p]["state1"].dtype == torch.float32 and opt.state[p]["state2"].dtype == torch.float32
    opt, p = stepped(shape=(33,), min_8bit_size=0)
    assert list(opt.state[p]) == KEYS and opt.state[p]["absmax1"].shape == (1,)


def test_a_nan_gradient_block_keeps_both_moments_codes_scales_and_parameter():
    opt, p = stepped(shape=(4097,), steps=2)
    state = opt.state[p]
    before = {k: state[k].clone() for k in ("state1", "absmax1", "absmax2")}
    p_before = p.detach().clone()
    g = torch.randn(4097) * 0.01
    g[300] = float("nan")  # the 256-block [256, 512): two blocks of 128 of each moment's scales
    p.grad = g
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    kept = slice(256, 512)
    assert torch.equal(state["state1"][kept], before["state1"][kept]) and torch.equal(p[kept], p_before[kept])
    for k in ("absmax1", "absmax2"):
        assert torch.equal(state[k][2:4], before[k][2:4]) and not torch.equal(state[k], before[k])
    assert opt.nonfinite_skipped_blocks == 1 and not torch.equal(p[:256], p_before[:256])


def test_a_tiny_second_moment_beside_a_large_one_never_decodes_to_zero():
    """The zero-point problem: a small v next to its block's large one would round to 0 in a map
    with a zero code; once the gradient stops, the step would be lr * m / eps (~260 here). The
    4-bit second-moment map has no zero code: v decodes to at least 1/16 of the block's scale."""
    p = torch.nn.Parameter(torch.zeros(128))
    opt = AdamW4bit([p], lr=1e-3, weight_decay=0.0, min_8bit_size=0)
    g = torch.full((128,), 1e-2)
    g[0] = 1.0
    p.grad = g
    opt.step()
    v = dequantized(opt.state[p], 2)
    assert v.min() >= opt.state[p]["absmax2"][0] / 16 and dequantized(opt.state[p], 1)[1] > 0
    after_one = p.detach().clone()
    p.grad = torch.where(torch.arange(128) == 0, 1.0, 0.0)
    opt.step()
    assert (p.detach() - after_one)[1:].abs().max() < 1e-4


def test_checkpoints_load_weights_only_and_continue_in_other_adam_classes():
    opt, p = stepped(steps=2)
    saved = round_trip(opt.state_dict())
    for cls in (AdamW4bit, AdamW8bit, qoptim.optim.AdamW):  # the loaded states keep their format
        q = torch.nn.Parameter(p.detach().clone())
        other = cls([q])
        other.load_state_dict(saved)
        assert torch.equal(other.state[q]["state1"], opt.state[p]["state1"])
        q.grad = torch.ones_like(q) * 0.01
        other.step()
        assert sorted(other.state[q]) == sorted(KEYS) and other.state[q]["step"] == 3


def _tampered(saved, key, value):
    state = {k: dict(v) for k, v in saved["state"].items()}
    inner = state[0].get("__bnb_optimizer_quant_state__", state[0])
    if value is None:
        inner.pop(key)
    else:
        inner[key] = value
    return {**saved, "state": state}


@pytest.mark.parametrize("key, value, message", [
    ("qmap1", torch.linspace(1, -1, 16), "16 finite codes"),
    ("qmap2", torch.zeros(256), "shape \\(16,\\)"),
    ("absmax2", torch.ones(10), "absmax2 must be a float32 tensor of shape \\(50,\\)"),
    ("absmax1", None, "without their scales"),
    ("state1", torch.zeros(70, 91, dtype=torch.uint8), "state1 must be"),
    ("rounding_seed", -1, "rounding_seed must be an int in \\[0, 2\\*\\*32\\)"),
])  # fmt: skip
def test_a_tampered_4_bit_state_is_rejected_and_nothing_changes(key, value, message):
    opt, p = stepped(steps=2)
    saved = round_trip(opt.state_dict())
    target, q = stepped(seed=5)
    before = {k: v.clone() for k, v in target.state[q].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(_tampered(saved, key, value))
    assert all(torch.equal(target.state[q][k], v) for k, v in before.items())


def test_another_family_refuses_a_4_bit_state():
    opt, p = stepped(steps=1)
    lion = Lion8bit([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match="qmap1 must be a float32 tensor of shape \\(256,\\)"):
        lion.load_state_dict(round_trip(opt.state_dict()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(optim_bits=4), "optim_bits must be 8 or 32 \\(or 4: Adam and AdamW\\)"),
    (dict(optim_bits=16), "optim_bits must be 8 or 32"),
])  # fmt: skip
def test_other_families_refuse_optim_bits_4(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=message):
        qoptim.optim.Lion([p], **kwargs)


def test_4_bit_states_are_block_wise():
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="block_wise=False is not supported with optim_bits=4"):
        qoptim.optim.AdamW([p], optim_bits=4, block_wise=False)
    with pytest.raises(ValueError, match="only supports optim_bits=32"):
        AdamW4bit([p], optim_bits=8)


def test_bf16_weights_with_a_24_bit_master_and_gradient_release():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(torch.bfloat16)
    opt = AdamW4bit(model.parameters(), lr=1e-2, master_weight_bits=24, min_8bit_size=0)
    handle = qoptim.release_gradients(opt, bucket_bytes=0)
    x, y = torch.randn(256, 64, dtype=torch.bfloat16), torch.randint(0, 8, (256,))
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        losses.append(loss.item())
    handle.remove()
    assert losses[-1] < 0.5 * losses[0]
    for p in model.parameters():
        state = opt.state[p]
        assert set(KEYS) < set(state) and state["master_correction"].dtype == torch.int8 and p.grad is None


# ---- the second moment's stochastic rounding (quant.formats) ------------------------------------


def v_codes(opt, p):
    return opt.state[p]["state1"] >> 4


def test_the_second_moment_is_rounded_stochastically_with_each_parameters_seed():
    """Two parameters with the same values and gradients: the same first moments (rounded to
    nearest), second moments drawn apart (each its own seed); a value between two codes takes both."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(a.detach().clone())
    opt = AdamW4bit([a, b], min_8bit_size=0)
    a.grad = b.grad = torch.randn(64, 128)
    opt.step()
    sa, sb = opt.state[a], opt.state[b]
    assert sa["rounding_seed"] != sb["rounding_seed"]
    assert torch.equal(sa["state1"] & 0xF, sb["state1"] & 0xF) and torch.equal(sa["absmax2"], sb["absmax2"])
    assert not torch.equal(v_codes(opt, a), v_codes(opt, b))
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamW4bit([p], lr=0.0, min_8bit_size=0)
    p.grad = torch.cat([torch.ones(1), torch.full((4095,), math.sqrt(0.5 / 16 + 0.5 / 8))])  # v between codes 0 and 1
    opt.step()
    assert set(v_codes(opt, p)[1:128].tolist()) == {0, 1}


def test_the_seed_is_kept_by_any_parameter_with_4_bit_states_and_no_other():
    opt, p = stepped(shape=(4096,))
    assert isinstance(opt.state[p]["rounding_seed"], int)
    opt, p = stepped(shape=(4095,))  # fp32 states (min_8bit_size)
    assert "rounding_seed" not in opt.state[p]
    opt, p = stepped(AdamW8bit, shape=(4096,))
    assert "rounding_seed" not in opt.state[p]


def test_a_bf16_weight_is_rounded_to_nearest_though_its_states_have_a_seed():
    opt, p = stepped(shape=(4096,), steps=1)
    q = torch.nn.Parameter(p.detach().bfloat16())
    config = {"weight_rounding": "nearest", "master_weight_bits": None}
    draw = weights.step_draw(q, opt.state[p], 2)
    assert draw is not None and weights.weight_format(q, opt.state[p], config, draw).nearest
    assert weights.weight_format(q, opt.state[p], {**config, "weight_rounding": "stochastic"}, draw).draw == draw


def test_a_checkpoint_without_a_seed_gets_one_and_goes_on():
    """A 4-bit checkpoint of before the seed (or one whose seed was dropped) loads, takes the seed
    its position gives, and steps as a run that had it."""
    opt, p = stepped(steps=2)
    saved = round_trip(opt.state_dict())
    seedless = {**saved, "state": {0: {k: v for k, v in saved["state"][0].items() if k != "rounding_seed"}}}
    runs = []
    for checkpoint in (saved, seedless):
        q = torch.nn.Parameter(p.detach().clone())
        other = AdamW4bit([q])
        other.load_state_dict(checkpoint)
        q.grad = torch.full_like(q, 0.01)
        other.step()
        runs.append((q, other.state[q]))
    assert runs[1][1]["rounding_seed"] == runs[0][1]["rounding_seed"]  # (the same position, torch's seed alike)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["state1"], runs[1][1]["state1"])


def test_the_seed_is_the_same_whatever_torchs_seed():
    """Every process must round alike (DDP's replicas, FSDP2's shards), and torch's seed differs
    between processes unless each sets it: the seed comes from the parameter's place alone."""
    seeds = []
    for torch_seed in (1, 2):
        torch.manual_seed(torch_seed)
        opt, p = stepped(shape=(4096,), steps=1)
        seeds.append(opt.state[p]["rounding_seed"])
    assert seeds[0] == seeds[1]
