"""Compatibility with bitsandbytes 0.50.2: checkpoints both ways.

Fixture tests (always run) load checkpoints written by bitsandbytes 0.50.2 (``tests/data/bnb_*.pt``,
made by ``tests/data/make_bnb_fixtures.py``; see its docstring for what each file holds). Live
tests need bitsandbytes itself (the ``bnb`` fixture, ``conftest.py``) and are skipped without it.

Deliberate differences from bitsandbytes 0.50.2 (not bugs, so not tested as such):
qoptim's ``Adam*`` use L2 weight decay where bitsandbytes' are decoupled (the fixtures use
``Adam*`` with weight_decay 0 only); qoptim keeps the 0.49-era ``percentile_clipping`` and
``block_wise`` arguments and adds ``nonfinite``; qoptim's quantizer rounds exactly to the nearest
code (bitsandbytes' CPU quantizer goes through a 65536-entry LUT) and skips blocks with NaN/Inf
gradients; qoptim uses torch's Adam formula on every path. Numeric comparisons with bitsandbytes
therefore use tolerances, each justified where it is used.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qoptim
from qoptim.quant.maps import signed_map, unsigned_map
from support import round_trip
from support.bnb_fixtures import (
    DATA, GROUP_KEYS, QUANT_KEY, STEMS, assert_live_state_equals, assert_same_layout, fixture_optimizer, load_fixture,
    next_grads, take_steps, ulp16,
)  # fmt: skip

# paged optimizers on CPU fall back to ordinary states and say so (also when loading a checkpoint)
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")


# ---- fixture tests: bitsandbytes 0.50.2 checkpoints -> qoptim --------------------------------


def test_fixtures_are_small_and_complete():
    files = sorted(DATA.glob("bnb_*.pt"))
    assert {f.name for f in files} == {f"bnb_{s}.pt" for s in STEMS} | {"bnb_grads.pt"}
    assert sum(f.stat().st_size for f in files) < 200_000
    fx = load_fixture("adam8bit")
    assert fx["meta"]["bitsandbytes"] == "0.50.2"
    names = fx["meta"]["names"]
    numels = {n: fx["params"][n].numel() for n in names}
    # one parameter with 8-bit state and a partial last 256-block, the others below min_8bit_size
    assert numels["weight"] >= 4096 and numels["weight"] % 256 != 0
    assert all(v < 4096 for n, v in numels.items() if n != "weight")
    assert len(next_grads()) == fx["meta"]["M"]


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_state_layout(stem):
    """What bitsandbytes wrote: the layout qoptim must read and write (bnb-spec §7)."""
    fx = load_fixture(stem)
    sd, meta = fx["state_dict"], fx["meta"]
    assert list(sd) == ["state", "param_groups"]
    assert [list(g) for g in sd["param_groups"]] == [GROUP_KEYS]
    eight_bit = meta["class"] != "Adam"
    for index, name in enumerate(meta["names"]):
        entry = sd["state"][index]
        assert list(entry) == ["step", QUANT_KEY] and entry["step"] == meta["K"]
        inner = entry[QUANT_KEY]
        shape = fx["params"][name].shape
        if eight_bit and name == "weight":
            blocks = math.ceil(shape.numel() / 256)
            assert list(inner) == ["state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2"]
            assert inner["state1"].dtype == inner["state2"].dtype == torch.uint8
            assert inner["absmax1"].shape == inner["absmax2"].shape == (blocks,)
            # bitsandbytes' maps are bit-identical to qoptim's
            assert torch.equal(inner["qmap1"], signed_map()) and torch.equal(inner["qmap2"], unsigned_map())
        else:
            assert list(inner) == ["state1", "state2"]
            assert inner["state1"].dtype == inner["state2"].dtype == torch.float32
        assert inner["state1"].shape == inner["state2"].shape == shape


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_loads_into_qoptim(stem):
    fx = load_fixture(stem)
    opt, ps = fixture_optimizer(qoptim, fx)
    opt.load_state_dict(round_trip(fx["state_dict"]))
    assert_live_state_equals(opt, ps, fx["state_dict"]["state"])
    assert opt.param_groups[0]["params"] == ps
    # ... and writes it back in exactly bitsandbytes' layout, values included
    saved = opt.state_dict()
    assert_same_layout(saved, fx["state_dict"])
    assert_same_layout(round_trip(saved), fx["state_dict"])


@pytest.mark.parametrize("stem", STEMS)
def test_qoptim_writes_bnb_layout(stem):
    """A qoptim optimizer that never saw a bitsandbytes checkpoint writes the same layout
    (keys, nesting, order, dtypes, shapes, param-group entries and their values) as
    bitsandbytes after the same number of steps."""
    fx = load_fixture(stem)
    opt, ps = fixture_optimizer(qoptim, fx)
    take_steps(opt, ps, fx["meta"]["names"], next_grads() * 3)
    saved = opt.state_dict()
    steps = 3 * fx["meta"]["M"]
    want = copy.deepcopy(fx["state_dict"])
    for entry in want["state"].values():
        entry["step"] = steps
    assert_same_layout(saved, want, values=False)
    assert [s["step"] for s in saved["state"].values()] == [steps] * len(ps)
    assert_same_layout(saved["param_groups"], want["param_groups"])  # values too: same kwargs, same defaults


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_continues_like_bnb(stem):
    """M more steps with qoptim from bitsandbytes' checkpoint land where bitsandbytes' did.

    ``update`` (bitsandbytes' change over the M steps) is stored rounded to fp16, so the
    reference is exact to within 1/2 fp16 ulp of the update (~5e-7 here). fp32-state parameters
    (and the first of the M steps for 8-bit ones: it uses the dequantized loaded states) follow
    the same formula up to fp32 rounding (~1e-8), so they must be within 1 fp16 ulp.
    8-bit parameters: from the second step on, the states were requantized by each library's own
    quantizer. bitsandbytes' CPU quantizer picks the code through a 65536-bin LUT (grid 3.05e-5 of
    the block absmax), qoptim picks the exact nearest code; they disagree only when a value lies
    within ~1.5e-5 * absmax of a midpoint between two codes (code spacing >= 1/64 of absmax in the
    densest decade, so << 1% of elements; measured 12 of 4120), and then by one code step of m or
    v. So: at most 1% of the elements may leave the fp16-ulp bound, none by more than 0.1 * lr,
    and the whole update must agree to 1% (relative L2; measured 4.9e-4).
    """
    fx = load_fixture(stem)
    meta = fx["meta"]
    lr = meta["kwargs"]["lr"]
    opt, ps = fixture_optimizer(qoptim, fx)
    opt.load_state_dict(fx["state_dict"])
    take_steps(opt, ps, meta["names"], next_grads())
    for name, p in zip(meta["names"], ps):
        start = fx["params"][name].float()
        want_update = fx["update"][name].float()
        got_update = p.detach() - start
        err = (got_update - want_update).abs()
        within = err <= ulp16(want_update)
        if meta["class"] != "Adam" and name == "weight":
            assert (~within).sum() <= 0.01 * err.numel(), f"{name}: {(~within).sum()} elements off"
            assert err.max() <= 0.1 * lr, f"{name}: max error {err.max():.3g}"
            rel = (got_update - want_update).norm() / want_update.norm()
            assert rel <= 1e-2, f"{name}: relative L2 error of the update {rel:.3g}"
        else:
            assert within.all(), f"{name}: max error {err.max():.3g}"
        assert opt.state[p]["step"] == meta["K"] + meta["M"]


@pytest.mark.parametrize("stem", STEMS)
def test_load_state_dict_does_not_alias_the_checkpoint(stem):
    """bitsandbytes' load_state_dict deep-copies the state dict: stepping the optimizer leaves
    the loaded dict as it was, and one dict can be loaded into two optimizers independently."""
    fx = load_fixture(stem)
    sd = fx["state_dict"]
    pristine = copy.deepcopy(sd)
    opt, ps = fixture_optimizer(qoptim, fx)
    opt.load_state_dict(sd)
    take_steps(opt, ps, fx["meta"]["names"], next_grads())
    assert_same_layout(sd, pristine)


# ---- live tests: need bitsandbytes ----------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_qoptim_checkpoint_loads_into_bnb(bnb, stem):
    """qoptim state_dict -> torch.save/load(weights_only) -> bitsandbytes load_state_dict: the
    live bitsandbytes state is byte-identical to what qoptim saved, and bitsandbytes' next step
    matches qoptim's next step. That step uses the dequantized loaded states, the same in both,
    and the same formula up to fp32 rounding: the ~lr-sized update may differ by a few roundings
    (<< 1e-8) and p's final rounding may then land on a neighbour, so the bound is 2 fp32 ulps of
    p (rtol 2 * 2**-23) plus 1e-8 (measured: at most 1 ulp, 1.5e-8, at |p| ~ 0.2)."""
    fx = load_fixture(stem)
    names = fx["meta"]["names"]
    grads = next_grads()
    q_opt, q_ps = fixture_optimizer(qoptim, fx)
    take_steps(q_opt, q_ps, names, grads * 2)
    checkpoint = round_trip(q_opt.state_dict())

    b_opt, b_ps = fixture_optimizer(bnb, fx, dict(zip(names, q_ps)))
    b_opt.load_state_dict(checkpoint)
    assert_live_state_equals(b_opt, b_ps, checkpoint["state"])

    take_steps(b_opt, b_ps, names, grads[:1])
    take_steps(q_opt, q_ps, names, grads[:1])
    for q, b in zip(q_ps, b_ps):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.detach(), q.detach(), rtol=2 * 2**-23, atol=1e-8)
        assert b_opt.state[b]["step"] == q_opt.state[q]["step"] == 2 * len(grads) + 1
        for key in ("state1", "state2"):
            assert b_opt.state[b][key].dtype == q_opt.state[q][key].dtype


@pytest.mark.parametrize("stem", STEMS)
def test_bnb_and_qoptim_write_the_same_layout(bnb, stem):
    fx = load_fixture(stem)
    names = fx["meta"]["names"]
    saved = {}
    for lib in (qoptim, bnb):
        opt, ps = fixture_optimizer(lib, fx)
        take_steps(opt, ps, names, next_grads())
        saved[lib.__name__] = opt.state_dict()
    assert_same_layout(saved["qoptim"], saved["bitsandbytes"], values=False)
    assert_same_layout(saved["qoptim"]["param_groups"], saved["bitsandbytes"]["param_groups"])


@pytest.mark.parametrize("stem", ["adam8bit"])
def test_load_state_dict_errors_match_bnb(bnb, stem):
    fx = load_fixture(stem)
    results = []
    for lib in (qoptim, bnb):
        opt, ps = fixture_optimizer(lib, fx)
        outcomes = []
        wrong_groups = copy.deepcopy(fx["state_dict"])
        wrong_groups["param_groups"].append(copy.deepcopy(wrong_groups["param_groups"][0]))
        wrong_size = copy.deepcopy(fx["state_dict"])
        wrong_size["param_groups"][0]["params"] = wrong_size["param_groups"][0]["params"][:-1]
        for sd in (wrong_groups, wrong_size):
            try:
                opt.load_state_dict(sd)
                outcomes.append(None)
            except Exception as e:  # noqa: BLE001
                outcomes.append((type(e).__name__, str(e)))
        results.append(outcomes)
    assert results[0] == results[1]
    assert all(o is not None for o in results[0])


# ---- bitsandbytes' layer-wise state: unorm_vec ------------------------------------------------


LARS_ARGS = {"lr": 0.01, "momentum": 0.9}
LAYER_WISE = [("LAMB", {}), ("LAMB8bit", {}), ("LARS", LARS_ARGS), ("LARS8bit", LARS_ARGS)]


@pytest.mark.parametrize(("name", "kwargs"), LAYER_WISE)
def test_layer_wise_state_keeps_unorm_vec(name, kwargs):
    """LAMB and LARS with max_unorm > 0 keep a one-element float32 ``unorm_vec``, as bitsandbytes
    does (its step fails without it); max_unorm=0 keeps none."""
    for max_unorm, present in ((kwargs.get("max_unorm", 0.5), True), (0.0, False)):
        p = torch.nn.Parameter(torch.randn(64, 64))
        opt = getattr(qoptim.optim, name)([p], **kwargs, max_unorm=max_unorm)
        p.grad = torch.randn_like(p)
        opt.step()
        assert ("unorm_vec" in opt.state[p]) is present
        if present:
            assert opt.state[p]["unorm_vec"].dtype == torch.float32 and opt.state[p]["unorm_vec"].shape == (1,)
            assert "unorm_vec" in opt.state_dict()["state"][0][QUANT_KEY]


def test_malformed_unorm_vec_is_rejected_before_loading():
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = qoptim.optim.LAMB([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0][QUANT_KEY]["unorm_vec"] = torch.zeros(2)
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match="unorm_vec must be a float32 tensor of shape \\(1,\\)"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.5  # nothing was loaded


@pytest.mark.parametrize(("name", "kwargs"), LAYER_WISE)
def test_layer_wise_checkpoint_steps_in_bnb(bnb, name, kwargs):
    """A qoptim LAMB/LARS checkpoint has bitsandbytes' per-parameter layout and bitsandbytes
    can take a step from it."""
    saved = {}
    for lib in (qoptim, bnb):
        p = torch.nn.Parameter(torch.randn(64, 64))
        opt = getattr(lib.optim, name)([p], **kwargs)
        p.grad = torch.randn_like(p)
        opt.step()
        saved[lib.__name__] = round_trip(opt.state_dict())
    assert_same_layout(saved["qoptim"]["state"], saved["bitsandbytes"]["state"], values=False)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = getattr(bnb.optim, name)([p], **kwargs)
    opt.load_state_dict(saved["qoptim"])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["step"] == 2 and torch.isfinite(p).all()
