"""Compatibility with bitsandbytes 0.50.2: constructor and method signatures, errors and warnings,
``qoptim.utils``. Live tests need bitsandbytes itself (the ``bnb`` fixture, ``conftest.py``) and
are skipped without it; the deliberate differences are listed with the cases below."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import qoptim
from support.bnb_fixtures import take_steps

# paged optimizers on CPU fall back to ordinary states and say so (also when loading a checkpoint)
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")

# qoptim's documented additions to bitsandbytes 0.50.2's constructors: (name, default)
EXTRA_ARGS = {"percentile_clipping": 100, "block_wise": True, "nonfinite": "skip", "master_weight_bits": None,
              "weight_rounding": "nearest", "state_rounding": None}  # fmt: skip
# qoptim's own, last; the lean-training ones keyword-only (state_rounding where a state is never negative)
LAST_ARGS = ["nonfinite", "master_weight_bits", "weight_rounding"]
NEVER_NEGATIVE_STATE = {"Adam", "AdamW", "AdEMAMix", "LAMB", "RMSprop", "Adagrad", "Optimizer2State", "Optimizer1State"}


def bnb_counterpart(bnb, name: str):
    return getattr(bnb.optim, name, None) or getattr(bnb.optim.optimizer, name)


def comparable(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", qoptim.optim.__all__)
def test_signature_matches_bnb(bnb, name):
    q_sig = inspect.signature(getattr(qoptim.optim, name))
    b_sig = inspect.signature(bnb_counterpart(bnb, name))
    q_params = comparable(q_sig)
    extras = [(n, d) for n, _, d in q_params if n in EXTRA_ARGS]
    assert all(EXTRA_ARGS[n] == d for n, d in extras), extras
    if extras:  # the 0.49-era arguments sit where 0.49 had them, right after min_8bit_size; qoptim's own last
        order = [n for n, _, _ in q_params]
        if "percentile_clipping" in order:
            i = order.index("min_8bit_size")
            assert order[i + 1 : i + 3] == ["percentile_clipping", "block_wise"]
        if "nonfinite" in order:
            last = LAST_ARGS + ["state_rounding"] * (_family(name) in NEVER_NEGATIVE_STATE)
            assert order[-len(last) :] == last
            assert [kind for n, kind, _ in q_params[-len(last) + 1 :]] == [inspect.Parameter.KEYWORD_ONLY] * (len(last) - 1)
    assert [t for t in q_params if t[0] not in EXTRA_ARGS] == comparable(b_sig)


def _family(name: str) -> str:
    """A class's family: its name without Paged, 8bit, 32bit, 4bit."""
    return name.removeprefix("Paged").removesuffix("8bit").removesuffix("32bit").removesuffix("4bit")


METHODS = {
    "Optimizer8bit": ["step", "state_dict", "load_state_dict", "check_overrides", "fill_qmap", "get_config",
                      "get_state_buffer", "init_state", "prefetch_state", "to_gpu", "update_step"],
    "Optimizer2State": ["init_state", "update_step"],
    "GlobalOptimManager": ["get_instance", "initialize", "override_config", "register_module_override",
                           "register_parameters"],
}  # fmt: skip


@pytest.mark.parametrize(("cls", "method"), [(c, m) for c, ms in METHODS.items() for m in ms])
def test_method_signature_matches_bnb(bnb, cls, method):
    """The public methods of the base classes and the manager (``load_state_dict(state_dict,
    move_to_device=True)`` etc.) take the same arguments."""
    q = inspect.signature(getattr(getattr(qoptim.optim, cls), method))
    b = inspect.signature(getattr(bnb_counterpart(bnb, cls), method))
    assert comparable(q) == comparable(b)


EIGHT_BIT = ["Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"]
NOT_EIGHT_BIT = ["Adam", "Adam32bit", "PagedAdam", "PagedAdam32bit", "AdamW", "AdamW32bit", "PagedAdamW", "PagedAdamW32bit"]


def outcome(lib, name: str, **kwargs) -> tuple:
    """(where, exception type name, message) of constructing ``name(**kwargs)`` and taking one
    step, or ("ok", None, None)."""
    p = torch.nn.Parameter(torch.zeros(8))
    try:
        opt = getattr(lib.optim, name)([p], **kwargs)
    except Exception as e:  # noqa: BLE001 - comparing whatever is raised
        return ("constructor", type(e).__name__, str(e))
    p.grad = torch.ones(8)
    try:
        take_steps(opt, [p], ["p"], [{"p": torch.ones(8)}])
    except Exception as e:  # noqa: BLE001
        return ("step", type(e).__name__, str(e))
    return ("ok", None, None)


ERROR_CASES = (
    [(n, {"amsgrad": True}) for n in EIGHT_BIT]
    + [(n, {"optim_bits": 8}) for n in EIGHT_BIT]
    + [(n, {"optim_bits": 8}) for n in NOT_EIGHT_BIT]
    + [
        (n, kw)
        for n in ("Adam8bit", "AdamW", "PagedAdamW8bit")
        for kw in ({"lr": -1.0}, {"eps": -1e-8}, {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}, {"weight_decay": -0.1})
    ]
)
# Deliberate differences: bitsandbytes silently ignores amsgrad in the non-8-bit classes, and
# rejects optim_bits=16 in Adam/AdamW only at the first step (NotImplementedError). qoptim refuses
# both in the constructor: a user asking for AMSGrad must not silently get Adam.
DELIBERATE_ERROR_DIFFERENCES = [(n, {"amsgrad": True}) for n in NOT_EIGHT_BIT] + [
    (n, {"optim_bits": 16}) for n in ("Adam", "PagedAdam", "AdamW", "PagedAdamW")
]


@pytest.mark.parametrize(("name", "kwargs"), [pytest.param(n, kw, id=f"{n}-{kw}") for n, kw in ERROR_CASES])
def test_errors_match_bnb(bnb, name, kwargs):
    assert outcome(qoptim, name, **kwargs) == outcome(bnb, name, **kwargs)


@pytest.mark.parametrize(("name", "kwargs"), [pytest.param(n, kw, id=f"{n}-{kw}") for n, kw in DELIBERATE_ERROR_DIFFERENCES])
def test_qoptim_refuses_early_what_bnb_ignores_or_refuses_late(bnb, name, kwargs):
    where, error, _ = outcome(qoptim, name, **kwargs)
    assert (where, error) == ("constructor", "ValueError")
    assert outcome(bnb, name, **kwargs)[0] != "constructor"


def test_errors_for_8bit_classes_are_raised():
    """The cases the brief names explicitly, spelled out: exception type and message."""
    for name in EIGHT_BIT:
        assert outcome(qoptim, name, amsgrad=True) == ("constructor", "ValueError", f"{name} does not support amsgrad=True")
        assert outcome(qoptim, name, optim_bits=8) == (
            "constructor",
            "ValueError",
            f"{name} only supports optim_bits=32 (default value for compatibility)",
        )


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdam"])
def test_paged_on_cpu_warning_matches_bnb(bnb, name):
    """On CPU both fall back to non-paged states and warn once per optimizer, with the same text."""
    seen = {}
    for lib in (qoptim, bnb):
        ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
        opt = getattr(lib.optim, name)(ps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
        seen[lib.__name__] = [(w.category, str(w.message)) for w in caught if "Paged" in str(w.message)]
    assert len(seen["qoptim"]) == 1
    assert seen["qoptim"] == seen["bitsandbytes"]


def test_utils_sync_gpu_is_importable_and_harmless_on_cpu():
    """Code written for bitsandbytes (its own test suite among it) imports bitsandbytes.utils.sync_gpu."""
    from qoptim.utils import sync_gpu

    sync_gpu(torch.zeros(3))  # nothing queued on a CPU: returns at once
    assert qoptim.utils.sync_gpu is sync_gpu
