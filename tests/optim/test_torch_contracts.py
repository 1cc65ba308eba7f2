"""The generic contracts torch's optimizers are held to, for every qoptim optimizer class.

PyTorch checks each of its optimizers against the same generic tests (``test/test_optim.py`` with
``torch/testing/_internal/common_optimizers.py``: hooks, deepcopy, param groups, zero_grad,
closures, error inputs, empty and missing gradients, state dict determinism ...). Here every class
of ``qoptim.optim.__all__`` (a new one is covered without a line here) runs through those
contracts: ``CASES`` is the table of classes and constructor arguments, ``CONTRACTS`` the table of
checks, and ``test_contract`` the one runner. Tensors are small (two 256-blocks, 8-bit states
where a class has them) and a contract takes a few steps. Deliberate differences from torch.optim
are listed in the README.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable

import pytest
import torch

import qoptim.optim
from support.optimizers import ABSTRACT, Case, optimizer_cases

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

SHAPE = (5, 70)  # 350 elements: a full and a partial 256-block
STEPS = 3

CASES = optimizer_cases()
CONTRACTS: list[Callable[[Case], None]] = []


def contract(check: Callable[[Case], None]) -> Callable[[Case], None]:
    CONTRACTS.append(check)
    return check


def params(n: int = 2, seed: int = 0, shape=SHAPE) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1) for _ in range(n)]


def grads(ps, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 0.01


def take_steps(opt, ps, steps: int = STEPS, first_seed: int = 100) -> None:
    for i in range(steps):
        grads(ps, first_seed + i)
        opt.step()


def copies(ps) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


def assert_same_tensors(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_same_structure(a: Any, b: Any) -> None:
    """Two state dicts (or parts) with the same keys and equal values, tensors equal exactly."""
    assert type(a) is type(b) or (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_structure(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_structure(x, y)
    else:
        assert a == b


def public_attrs(opt) -> set[str]:
    return {key for key in opt.__dict__ if not key.startswith("_")}


# ---- steps ---------------------------------------------------------------------------------


@contract
def step_is_noop_when_params_have_no_grad(case: Case) -> None:
    ps = params()
    before = copies(ps)
    opt = case.make(ps)
    opt.step()
    opt.step()
    assert_same_tensors(copies(ps), before)
    assert not any(opt.state.get(p) for p in ps)


@contract
def params_without_grad_are_skipped(case: Case) -> None:
    ps = params(3)
    before = copies(ps)
    opt = case.make(ps)
    for i in range(STEPS):
        grads(ps[:1], 10 + i)
        ps[2].grad = None
        opt.step()
    assert not torch.equal(ps[0], before[0])
    assert_same_tensors(copies(ps[1:]), before[1:])
    assert not opt.state.get(ps[1]) and not opt.state.get(ps[2])


@contract
def zero_gradients_leave_params_unchanged(case: Case) -> None:
    """A zero gradient without weight decay is no update (a state of zeros stays zeros)."""
    ps = params()
    before = copies(ps)
    opt = case.make(ps, **({"weight_decay": 0.0} if case.accepts("weight_decay") else {}))
    for _ in range(STEPS):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_same_tensors(copies(ps), before)


@contract
def empty_params_step(case: Case) -> None:
    """Zero-element parameters next to others (torch's test_empty_grad), with every scale layout."""
    layouts = [{}]
    if case.accepts("block_wise") and getattr(case.cls, "fixed_bits", None) != 4:  # (4-bit states are block-wise only)
        layouts.append({"block_wise": False})
    for layout in layouts:
        ps = params(2) + [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(0, 3))]
        before = copies(ps)
        opt = case.make([ps[2], ps[0], ps[3], ps[1]], **layout)
        if layout and any(kept.rows > 1 for kept in getattr(opt, "layout", ())):
            continue  # stacked states (AdEMAMix) are block-wise only: test_errors covers the refusal
        take_steps(opt, ps)
        assert all(not torch.equal(p, b) for p, b in zip(ps[:2], before[:2]))
        assert ps[2].shape == (0,) and ps[3].shape == (0, 3)


@contract
def closure_returns_the_loss_and_runs_with_grad(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum((p * p).sum() for p in ps)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None  # no closure: None, as torch's


@contract
def zero_grad_sets_to_none_or_zeros(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    opt.zero_grad()  # set_to_none=True, torch's default
    assert all(p.grad is None for p in ps)


@contract
def step_hooks_run_around_the_step(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    take_steps(opt, ps, 1)
    pre.remove()
    take_steps(opt, ps, 1)
    assert calls == ["pre", "post", "post"]


# ---- param groups ---------------------------------------------------------------------------


@contract
def per_group_options_are_honoured(case: Case) -> None:
    """A group with lr 0 does not move while the other does (torch's test_param_groups_lr)."""
    ps = params()
    before = copies(ps)
    opt = case.make([{"params": [ps[0]], "lr": 0.0}, {"params": [ps[1]]}], **({} if "lr" in case.kwargs else {"lr": 0.01}))
    take_steps(opt, ps)
    assert torch.equal(ps[0], before[0]) and not torch.equal(ps[1], before[1])


@contract
def param_group_edits_between_steps_apply(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 2)
    opt.param_groups[0]["lr"] = 0.0
    frozen = copies(ps)
    take_steps(opt, ps, 2, first_seed=200)
    assert_same_tensors(copies(ps), frozen)


@contract
def add_param_group_fills_defaults_and_steps(case: Case) -> None:
    ps = params(3)
    opt = case.make(ps[:2])
    take_steps(opt, ps[:2], 1)
    before = ps[2].detach().clone()
    opt.add_param_group({"params": [ps[2]]})
    group = opt.param_groups[1]
    assert set(group) == set(opt.param_groups[0])
    assert all(group[k] == opt.defaults[k] or k == "params" for k in group if k in opt.defaults)
    take_steps(opt, ps, 2, first_seed=300)
    assert not torch.equal(ps[2], before)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [ps[0]]})


@contract
def lr_scheduler_moves_the_right_way(case: Case) -> None:
    """torch's test_param_group_with_lrscheduler_goes_right_direction: two groups under a
    scheduler still decrease a convex loss."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(10))
    x = torch.randn(5)
    opt = case.make([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **({} if "lr" in case.kwargs else {"lr": 0.01}))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def loss_now():
        return (weight.mv(x) + bias).pow(2).sum()

    initial = loss_now().item()
    for _ in range(4):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
        scheduler.step()
    assert loss_now().item() < initial
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * 0.25)


# ---- copies and checkpoints ----------------------------------------------------------------


def _continue_alike(case: Case, make_copy) -> None:
    """A copy of a stepped optimizer has every public attribute, steps like the original, and
    shares no state with it."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps)
    other, other_ps = make_copy(opt)
    assert public_attrs(other) == public_attrs(opt)
    assert other_ps is not None and all(a is not b for a, b in zip(other_ps, ps))
    take_steps(opt, ps, 2, first_seed=400)
    take_steps(other, other_ps, 2, first_seed=400)
    assert_same_tensors(copies(other_ps), copies(ps))
    assert_same_structure(other.state_dict(), opt.state_dict())


@contract
def deepcopy_copies_all_public_attrs(case: Case) -> None:
    def deep(opt):
        other = copy.deepcopy(opt)
        return other, other.param_groups[0]["params"]

    _continue_alike(case, deep)


@contract
def pickling_gives_a_working_optimizer(case: Case) -> None:
    def pickled(opt):
        other = pickle.loads(pickle.dumps(opt))
        return other, other.param_groups[0]["params"]

    _continue_alike(case, pickled)


@contract
def torch_save_of_the_optimizer_gives_a_working_one(case: Case) -> None:
    def saved(opt):
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
        return other, other.param_groups[0]["params"]

    _continue_alike(case, saved)


def _loaded_copy(case: Case, opt, ps, state_dict=None):
    other_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = case.make(other_ps)
    # a deep copy, as torch's tests load: torch's load_state_dict keeps tensors that need no cast
    other.load_state_dict(copy.deepcopy(opt.state_dict() if state_dict is None else state_dict))
    return other, other_ps


@contract
def state_dict_deterministic(case: Case) -> None:
    """torch's test_state_dict_deterministic: a loaded optimizer steps exactly like the original."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps)
    other, other_ps = _loaded_copy(case, opt, ps)
    assert_same_structure(other.state_dict(), opt.state_dict())
    take_steps(opt, ps, 2, first_seed=500)
    take_steps(other, other_ps, 2, first_seed=500)
    assert_same_tensors(copies(other_ps), copies(ps))
    assert_same_structure(other.state_dict(), opt.state_dict())


@contract
def save_load_equality_with_weights_only(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same_structure(loaded, opt.state_dict())
    other, other_ps = _loaded_copy(case, opt, ps, loaded)
    take_steps(opt, ps, 1, first_seed=600)
    take_steps(other, other_ps, 1, first_seed=600)
    assert_same_tensors(copies(other_ps), copies(ps))


@contract
def load_tensor_or_float_step(case: Case) -> None:
    """torch's test_load_nontensor_step, the other way round: a ``step`` saved as a tensor or a
    float loads like the int."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps)
    reference, reference_ps = _loaded_copy(case, opt, ps)
    take_steps(reference, reference_ps, 1, first_seed=700)
    for spelled in (lambda s: torch.tensor(float(s)), float):
        state_dict = opt.state_dict()
        stepped = [s for s in state_dict["state"].values() if "step" in s]
        for s in stepped:
            s["step"] = spelled(s["step"])
        other, other_ps = _loaded_copy(case, opt, ps, state_dict)
        take_steps(other, other_ps, 1, first_seed=700)
        assert_same_tensors(copies(other_ps), copies(reference_ps))


@contract
def older_state_dict_loads_with_defaults(case: Case) -> None:
    """torch's test_can_load_older_state_dict: a state dict whose groups lack settings that came
    later (here: all but bitsandbytes' lr, betas and eps, or torch SGD's nesterov) loads with
    their defaults and steps like the optimizer it came from."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps)
    state_dict = opt.state_dict()
    kept = {"params", "lr", "betas", "eps", "weight_decay", "momentum", "dampening", "max_unorm"}
    if issubclass(case.cls, qoptim.optim.Optimizer8bit):
        kept -= {"momentum", "dampening"}  # bitsandbytes' SGD and LARS groups hold betas only
    for group in state_dict["param_groups"]:
        for key in set(group) - kept:
            del group[key]
    other, other_ps = _loaded_copy(case, opt, ps, state_dict)
    assert sorted(other.param_groups[0]) == sorted(opt.param_groups[0])
    take_steps(opt, ps, 2, first_seed=750)
    take_steps(other, other_ps, 2, first_seed=750)
    assert_same_tensors(copies(other_ps), copies(ps))


@contract
def tensor_lr_steps_like_a_float_lr(case: Case) -> None:
    lr = 2.0**-9  # exact in a float32 tensor (torch's "tensor lr" input)
    results = []
    for spelled in (lr, torch.tensor(lr)):
        ps = params()
        opt = case.make(ps, lr=spelled)
        take_steps(opt, ps)
        assert all(opt.state[p] for p in ps)  # torch's test_non_empty_state
        results.append(copies(ps))
    assert_same_tensors(*results)


@contract
def state_dict_hooks_pre_and_post(case: Case) -> None:
    """torch's test_state_dict_pre_hook / _post_hook: the pre hook may change the optimizer
    before the dict is made; the post hook sees the dict as returned and may return another."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 1)
    opt.register_state_dict_pre_hook(lambda o: o.param_groups[0].__setitem__("lr", 0.125))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_state_dict_post_hook(lambda o, sd: sd["state"].__setitem__("seen_extra", "extra" in sd))
    state_dict = opt.state_dict()
    assert state_dict["param_groups"][0]["lr"] == 0.125
    assert state_dict["extra"] == 1 and state_dict["state"]["seen_extra"] is True


@contract
def load_state_dict_hooks_pre_and_post(case: Case) -> None:
    """torch's test_load_state_dict_pre_hook_and_prepend / _post_hook: pre hooks (prepended
    ones first) may replace the dict to load; post hooks run on the loaded optimizer."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 1)
    state_dict = opt.state_dict()
    other = case.make([torch.nn.Parameter(p.detach().clone()) for p in ps])
    order = []

    def pre(o, sd):
        order.append("pre")
        sd = dict(sd)
        sd["param_groups"] = [{**g, "lr": 0.25} for g in sd["param_groups"]]
        return sd

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_pre_hook(lambda o, sd: order.append("prepended"), prepend=True)
    other.register_load_state_dict_post_hook(lambda o: order.append(("post", o.param_groups[0]["lr"])))
    other.load_state_dict(state_dict)
    assert order == ["prepended", "pre", ("post", 0.25)]
    assert state_dict["param_groups"][0]["lr"] != 0.25  # the caller's dict is left as it was


@contract
def non_parameter_state_entries_round_trip(case: Case) -> None:
    """torch keeps entries of ``optimizer.state`` that are not parameters (keyed as they are)."""
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 1)
    opt.state["note"] = 1
    state_dict = opt.state_dict()
    assert state_dict["state"]["note"] == 1
    other, other_ps = _loaded_copy(case, opt, ps, state_dict)
    assert other.state["note"] == 1
    take_steps(other, other_ps, 1)


@contract
def named_parameters_are_kept(case: Case) -> None:
    """torch >= 2.6: parameters given with names keep them in param_groups and state dicts."""
    ps = params()
    opt = case.make([("a", ps[0]), ("b", ps[1])])
    assert opt.param_groups[0]["param_names"] == ["a", "b"]
    take_steps(opt, ps, 1)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["a", "b"]
    other, _ = _loaded_copy(case, opt, ps)
    assert other.param_groups[0]["param_names"] == ["a", "b"]


# ---- errors and printing -------------------------------------------------------------------


@contract
def error_inputs_as_torch(case: Case) -> None:
    """torch's get_error_inputs_for_all_optims: the same exception types and texts."""
    ps = params()
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable of Tensors or dicts"):
        case.make(ps[0])
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        case.make([ps[0], ps[0]])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        case.make([{"params": [ps[0]]}, {"params": [ps[0]]}])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        case.make(ps, lr=torch.tensor([0.001, 0.001]))
    with pytest.raises(ValueError, match="all optimizer params should be with/without names. Some param names are missing"):
        case.make([("weight", ps[0]), ps[1]])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        case.make([{"params": [ps[0]], "lr": 1e-2}, {"params": [("weight", ps[1])]}])


@contract
def sparse_gradient_is_refused_as_torch_does(case: Case) -> None:
    """A RuntimeError, as torch's optimizers without sparse support raise, before anything changes."""
    if not issubclass(case.cls, qoptim.optim.Optimizer8bit):
        return  # PytorchLARS is plain torch (torch.optim.SGD's step), which takes sparse gradients
    ps = params()
    opt = case.make(ps)
    take_steps(opt, ps, 1)
    before, state = copies(ps), copy.deepcopy(opt.state_dict())
    grads(ps, 800)
    ps[1].grad = ps[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_same_tensors(copies(ps), before)
    assert_same_structure(opt.state_dict(), state)


@contract
def optimizer_can_be_printed(case: Case) -> None:
    ps = params()
    opt = case.make(ps)
    text = repr(opt)
    assert text.startswith(f"{case.name} (") and "Parameter Group 0" in text and "lr:" in text


# ---- the runner ----------------------------------------------------------------------------


def test_every_class_is_covered():
    """The table holds every optimizer class of qoptim.optim (but the abstract ones): bitsandbytes'
    names and qoptim's own."""
    exported = {n for n in [*qoptim.optim.__all__, *qoptim.optim.QOPTIM_NAMES] if isinstance(getattr(qoptim.optim, n), type)
                and issubclass(getattr(qoptim.optim, n), torch.optim.Optimizer)}  # fmt: skip
    assert {c.name for c in CASES} | set(ABSTRACT) == exported
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("check", CONTRACTS, ids=lambda f: f.__name__)
def test_contract(case: Case, check: Callable[[Case], None]) -> None:
    check(case)
