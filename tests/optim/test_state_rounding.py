"""``state_rounding``: how the never-negative quantized states (second moments, sums of squares)
round to their codes. None (the default) is their format's way: to nearest at 8 bits
(bitsandbytes'), stochastically at 4 (``quant.formats``); "stochastic" and "nearest" choose.
The rounding rule itself is tests/quant/test_stochastic.py's, the kernels' agreement with the
reference tests/kernels' and resuming test_resume's; here: which states round how, the seed it
keeps, checkpoints, overrides and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from support import round_trip

import qoptim
from qoptim.optim import GlobalOptimManager

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

# (class, its never-negative state's key, the signed state's key or None): every 8-bit family with one
FAMILIES = [
    (qoptim.Adam8bit, "state2", "state1"),
    (qoptim.AdamW8bit, "state2", "state1"),
    (qoptim.PagedAdamW8bit, "state2", "state1"),
    (qoptim.AdEMAMix8bit, "state2", "state1"),
    (qoptim.LAMB8bit, "state2", "state1"),
    (qoptim.RMSprop8bit, "state1", None),
    (qoptim.Adagrad8bit, "state1", None),
]


def stepped(cls, shape=(64, 96), steps=3, seed=0, **kwargs):
    """An optimizer over one parameter of ``shape`` after ``steps`` steps of random gradients."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=g))
    opt = cls([p], lr=1e-3, **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=g) * 0.01
        opt.step()
    return opt, p


@pytest.mark.parametrize(("cls", "unsigned", "signed"), FAMILIES, ids=lambda c: getattr(c, "__name__", None))
def test_stochastic_rounds_the_never_negative_state_and_keeps_a_seed(cls, unsigned, signed):
    """One step from the same start: with "stochastic" the never-negative state's codes differ from
    nearest's (some round up, some down), the signed state's are nearest's, and the seed is kept."""
    near, p = stepped(cls, steps=1)
    stoch, q = stepped(cls, steps=1, state_rounding="stochastic")
    default, r = stepped(cls, steps=1, state_rounding=None)
    assert "rounding_seed" not in near.state[p] and "rounding_seed" not in default.state[r]
    assert isinstance(stoch.state[q]["rounding_seed"], int)
    a, b = near.state[p][unsigned].int(), stoch.state[q][unsigned].int()
    assert torch.equal(default.state[r][unsigned], near.state[p][unsigned])
    assert (b > a).any() and (b < a).any(), "stochastic rounding rounded every value one way"
    assert ((b - a).abs() <= 1).all(), "a stochastic code is the floor or the ceiling of the value"
    if signed is not None and cls is not qoptim.LAMB8bit:  # (LAMB's trust ratio reads v: the parameter moves apart)
        assert torch.equal(near.state[p][signed], stoch.state[q][signed])


def test_the_eight_bit_default_is_bitsandbytes_nearest_and_explicit_nearest_is_it():
    a, p = stepped(qoptim.AdamW8bit)
    b, q = stepped(qoptim.AdamW8bit, state_rounding="nearest")
    assert torch.equal(p, q)
    assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in ("state1", "state2", "absmax1", "absmax2"))


def test_four_bit_states_round_stochastically_unless_told_nearest():
    a, p = stepped(qoptim.AdamW4bit)
    b, q = stepped(qoptim.AdamW4bit, state_rounding="stochastic")
    c, r = stepped(qoptim.AdamW4bit, state_rounding="nearest")
    assert torch.equal(a.state[p]["state1"], b.state[q]["state1"]) and "rounding_seed" in a.state[p]
    assert "rounding_seed" not in c.state[r]
    assert not torch.equal(a.state[p]["state1"] >> 4, c.state[r]["state1"] >> 4)


def test_a_value_between_two_codes_takes_both_in_proportion():
    """v = 0.3 of the way from one code of the unsigned map to the next, in 256-blocks scaled by a
    first element of v = 1: about 30% of the codes round up, the rest down."""
    code = qoptim.quant.formats.state_map("udynamic")
    k = 200
    target = code[k] + 0.3 * (code[k + 1] - code[k])
    p = torch.nn.Parameter(torch.zeros(1 << 16))
    opt = qoptim.AdamW8bit([p], lr=0.0, betas=(0.9, 0.0), state_rounding="stochastic")  # (beta2 0: v = g**2)
    g = torch.full_like(p, float(target.sqrt()))
    g[:: 256] = 1.0
    p.grad = g
    opt.step()
    codes = opt.state[p]["state2"].view(-1, 256)[:, 1:]
    assert set(codes.unique().tolist()) == {k, k + 1}
    assert abs((codes == k + 1).float().mean().item() - 0.3) < 0.02


def test_a_positive_second_moment_never_takes_the_zero_code():
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = qoptim.AdamW8bit([p], lr=0.0, betas=(0.9, 0.0), state_rounding="stochastic")
    g = torch.full_like(p, 1e-6)
    g[::256] = 1.0
    p.grad = g
    opt.step()
    assert (opt.state[p]["state2"] >= 1).all()


def test_a_checkpoint_resumes_bit_for_bit():
    """Save after 2 steps, load into a new optimizer (weights_only), 2 more steps: as 4 in a row."""
    whole, p = stepped(qoptim.AdamW8bit, steps=4, state_rounding="stochastic")
    half, q = stepped(qoptim.AdamW8bit, steps=2, state_rounding="stochastic")
    saved = round_trip(half.state_dict())
    assert isinstance(saved["state"][0]["rounding_seed"], int)
    r = torch.nn.Parameter(q.detach().clone())
    resumed = qoptim.AdamW8bit([r], lr=1e-3, state_rounding="stochastic")
    resumed.load_state_dict(saved)
    g = torch.Generator().manual_seed(0)
    torch.randn(q.shape, generator=g)
    for _ in range(2):  # (the gradients of steps 1 and 2, then 3 and 4 as the uninterrupted run drew them)
        torch.randn(q.shape, generator=g)
    for _ in range(2):
        r.grad = torch.randn(q.shape, generator=g) * 0.01
        resumed.step()
    assert torch.equal(r, p)
    assert all(torch.equal(resumed.state[r][k], whole.state[p][k]) for k in ("state1", "state2", "absmax2"))


def test_one_parameter_can_take_its_own_rounding_through_the_manager():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4096))
    manager = GlobalOptimManager.get_instance()
    manager.initialize()
    manager.register_parameters([a, b])
    manager.override_config(b, "state_rounding", "stochastic")
    opt = qoptim.AdamW8bit([a, b])
    a.grad, b.grad = torch.randn(4096), torch.randn(4096)
    opt.step()
    manager.initialize()
    assert "rounding_seed" not in opt.state[a] and "rounding_seed" in opt.state[b]


def test_small_tensors_keep_fp32_states_and_no_seed():
    opt, p = stepped(qoptim.AdamW8bit, shape=(4095,), state_rounding="stochastic")
    assert opt.state[p]["state2"].dtype == torch.float32 and "rounding_seed" not in opt.state[p]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: qoptim.AdamW8bit([p], state_rounding="up"), "state_rounding must be one of"),
        (lambda p: qoptim.AdamW8bit([p], state_rounding=True), "state_rounding must be one of"),
        (lambda p: qoptim.Adam8bit([p], block_wise=False, state_rounding="stochastic"), "block_wise=False"),
        (lambda p: qoptim.optim.Optimizer1State("lion", [p], optim_bits=8, state_rounding="stochastic"), "never-negative"),
        (lambda p: qoptim.optim.Optimizer1State("momentum", [p], optim_bits=8, state_rounding="stochastic"), "never-negative"),
    ],
)
def test_bad_settings_are_refused_in_the_constructor(make, message):
    p = torch.nn.Parameter(torch.randn(4096))
    with pytest.raises(ValueError, match=message):
        make(p)


def test_optimizers_without_a_never_negative_state_do_not_take_the_setting():
    p = torch.nn.Parameter(torch.randn(8))
    for cls in (qoptim.Lion8bit, qoptim.SGD8bit, qoptim.LARS8bit):
        with pytest.raises(TypeError, match="state_rounding"):
            cls([p], lr=0.1, state_rounding="stochastic")


def test_a_bad_override_is_refused_at_the_step_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4096))
    manager = GlobalOptimManager.get_instance()
    manager.initialize()
    manager.register_parameters([p])
    manager.override_config(p, "state_rounding", "sideways")
    opt = qoptim.AdamW8bit([p])
    before = p.detach().clone()
    p.grad = torch.randn(4096)
    try:
        with pytest.raises(ValueError, match="state_rounding must be one of"):
            opt.step()
    finally:
        manager.initialize()
    assert torch.equal(p, before)
    assert math.isclose(opt.state[p].get("step", 0), 0)
