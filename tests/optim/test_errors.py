"""Bad input gets a clear error, and a rejected step changes nothing; NaN/Inf gradients."""

import warnings

import pytest
import torch
from support import make_params

import qoptim as bnb

ALL_CLASSES = [
    bnb.optim.Adam, bnb.optim.Adam8bit, bnb.optim.Adam32bit, bnb.optim.PagedAdam, bnb.optim.PagedAdam8bit,
    bnb.optim.PagedAdam32bit, bnb.optim.AdamW, bnb.optim.AdamW8bit, bnb.optim.AdamW32bit, bnb.optim.PagedAdamW,
    bnb.optim.PagedAdamW8bit, bnb.optim.PagedAdamW32bit,
]  # fmt: skip
EIGHT_BIT = [bnb.optim.Adam8bit, bnb.optim.AdamW8bit, bnb.optim.PagedAdam8bit, bnb.optim.PagedAdamW8bit]

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported")


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_amsgrad_is_refused(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support amsgrad=True"):
        cls(make_params((4, 4), torch.float32), amsgrad=True)


@pytest.mark.parametrize("cls", EIGHT_BIT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bits", [8, 16])
def test_8bit_classes_refuse_other_optim_bits(cls, bits):
    with pytest.raises(ValueError, match=rf"{cls.__name__} only supports optim_bits=32 \(default value for compatibility\)"):
        cls(make_params((4, 4), torch.float32), optim_bits=bits)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, "Invalid learning rate: nan"),
        ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
        ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1: -0.1"),
        ({"betas": 0.9}, "Invalid betas"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
        ({"min_8bit_size": -1}, "min_8bit_size must be"),
        ({"percentile_clipping": 0}, r"percentile_clipping must be an int in \[1, 100\]"),
        ({"percentile_clipping": 101}, r"percentile_clipping must be an int in \[1, 100\]"),
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, message):
    for cls in (bnb.optim.Adam8bit, bnb.optim.AdamW):
        with pytest.raises(ValueError, match=message):
            cls(make_params((4, 4), torch.float32), **kwargs)


def test_plain_classes_refuse_unsupported_bits():
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        bnb.optim.Adam(make_params((4, 4), torch.float32), optim_bits=16)


def test_paged_adamw_has_no_is_paged_argument():
    with pytest.raises(TypeError):
        bnb.optim.PagedAdamW8bit(make_params((4, 4), torch.float32), is_paged=False)


def test_base_classes_refuse_unknown_optimizer_names():
    with pytest.raises(ValueError, match="Unsupported optimizer name"):
        bnb.optim.Optimizer2State("adagrad", make_params((4, 4), torch.float32))


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()} for p in params
    }


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
        for key, old in states[id(p)].items():
            new = opt.state[p][key]
            assert torch.equal(new, old) if isinstance(old, torch.Tensor) else new == old


def _trained(dtype=torch.float32):
    params = make_params((64, 81), dtype, n=2)
    opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


@pytest.mark.parametrize(
    "bad_grad,error,message",
    [
        (lambda p: torch.randn(p.shape, dtype=torch.float64), ValueError, "the gradient of parameter 1 of param group 0 must match"),
        (lambda p: torch.randn(81, 64), ValueError, "must match it"),
        (lambda p: torch.randn(p.shape).to_sparse(), RuntimeError, "does not support sparse gradients"),
    ],
    ids=["dtype", "shape", "sparse"],
)
def test_a_bad_gradient_is_rejected_before_anything_changes(bad_grad, error, message):
    opt, params = _trained()
    params[0].grad = torch.randn_like(params[0])  # a good gradient, listed first
    grad = bad_grad(params[1])
    if grad.is_sparse:
        params[1].grad = grad
    else:  # torch refuses such gradients on assignment; a buggy hook could still leave one
        params[1].grad_dtype = None
        params[1].grad = torch.zeros_like(params[1])
        params[1].grad.data = grad
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_unsupported_param_dtype_is_rejected():
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    opt = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match="supported parameter dtypes are float32, float16 and bfloat16"):
        opt.step()
    assert not opt.state[p]


@pytest.mark.parametrize("family, bits", [("Adam8bit", 16), ("Lion8bit", 4)])  # Lion: 4-bit states are Adam's only
def test_optim_bits_override_to_unsupported_value_fails_before_anything_changes(family, bits):
    a, b = make_params((64, 81), torch.float32, n=2)
    bnb.optim.GlobalOptimManager.get_instance().override_config(b, "optim_bits", bits)
    opt = getattr(bnb.optim, family)([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a_before = a.detach().clone()
    with pytest.raises(NotImplementedError, match=f"Amount of optimizer bits not supported: {bits}"):
        opt.step()
    assert torch.equal(a.detach(), a_before) and not opt.state[a]


def test_optim_bits_override_to_4_gives_adam_4_bit_states_on_that_parameter():
    a, b = make_params((64, 81), torch.float32, n=2)
    bnb.optim.GlobalOptimManager.get_instance().override_config(b, "optim_bits", 4)
    opt = bnb.optim.Adam8bit([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[a]["qmap1"].numel() == 256 and "state2" in opt.state[a]
    assert opt.state[b]["qmap1"].numel() == 16 and "state2" not in opt.state[b]


# ---- non-finite gradients ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_skip_keeps_blocks_with_nan_or_inf_exactly(dtype):
    opt, params = _trained(dtype)
    p = params[0]
    snapshot = _snapshot(opt, [p])
    g = torch.randn_like(p)
    flat = g.view(-1)
    flat[300] = float("nan")  # block 1
    flat[5000] = float("inf")  # block 19, the partial last block is 20
    p.grad, params[1].grad = g, None
    with pytest.warns(RuntimeWarning, match="2 block"):
        opt.step()
    assert opt.nonfinite_skipped_blocks == 2
    old_p, old_state = snapshot[0][0].view(-1), snapshot[1][id(p)]
    state = opt.state[p]
    for block in (1, 19):
        span = slice(256 * block, 256 * (block + 1))
        assert torch.equal(p.detach().view(-1)[span], old_p[span])
        for key in ("state1", "state2"):
            assert torch.equal(state[key].view(-1)[span], old_state[key].view(-1)[span])
        for key in ("absmax1", "absmax2"):
            assert state[key][block] == old_state[key][block]
    assert not torch.equal(p.detach().view(-1)[:256], old_p[:256])  # the other blocks moved
    assert torch.isfinite(p).all() and state["step"] == 2
    # the count goes on, the warning is not repeated
    p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.nonfinite_skipped_blocks == 4


def test_skip_works_for_fp32_state_and_per_tensor_scale():
    for opt_kwargs, shape in [({}, (17, 33)), ({"block_wise": False}, (64, 81))]:
        (p,) = make_params(shape, torch.float32)
        opt = bnb.optim.AdamW8bit([p], **opt_kwargs)
        p.grad = torch.randn_like(p)
        opt.step()
        before = p.detach().clone()
        g = torch.randn_like(p)
        g.view(-1)[3] = float("-inf")
        p.grad = g
        with pytest.warns(RuntimeWarning):
            opt.step()
        assert torch.equal(p.detach().view(-1)[:256], before.view(-1)[:256])
        assert torch.isfinite(p).all()


def test_raise_mode_names_the_parameter_and_changes_nothing():
    params = make_params((64, 81), torch.float32, n=2)
    opt = bnb.optim.AdamW8bit(params, nonfinite="raise")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = _snapshot(opt, params)
    params[1].grad = torch.randn_like(params[1])
    params[1].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameter 1 of param group 0"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_propagate_mode_lets_nan_through():
    (p,) = make_params((64, 81), torch.float32)
    opt = bnb.optim.AdamW8bit([p], nonfinite="propagate")
    g = torch.randn_like(p)
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p[0, 0]) and opt.nonfinite_skipped_blocks == 0


def test_grad_scaler_skips_whole_steps_itself():
    model = torch.nn.Linear(64, 80)
    opt = bnb.optim.AdamW8bit(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(8, 64)
    loss = model(x).sum() * float("inf")
    scaler.scale(loss).backward()
    before = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach(), before) and not opt.state[model.weight]
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    assert opt.state[model.weight]["step"] == 1 and not torch.equal(model.weight.detach(), before)


def test_hyperparameters_changed_between_steps_are_checked_before_anything_changes():
    opt, params = _trained()
    snapshot = _snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.param_groups[0]["lr"] = -0.1  # e.g. a buggy scheduler
    with pytest.raises(ValueError, match="param group 0: Invalid learning rate: -0.1"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    opt.param_groups[0]["lr"] = 1e-3
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="param group 0: Invalid beta parameter at index 1: 1.5"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("flag", ["block_wise", "is_paged"])
def test_flags_must_be_booleans(flag):
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        bnb.optim.Adam8bit(make_params((4, 4), torch.float32), **{flag: "yes"})


def test_a_step_that_fails_in_a_backend_leaves_no_half_open_step(monkeypatch):
    from qoptim import kernels

    (p,) = make_params((64, 81), torch.float32)
    opt = bnb.optim.Adam8bit([p])
    p.grad = torch.randn_like(p)

    def broken(*args, **kwargs):
        raise RuntimeError("backend failure")

    monkeypatch.setattr(kernels, "update_many", broken)
    with pytest.raises(RuntimeError, match="backend failure"):
        opt.step()
    assert not opt.in_step  # later direct update_step calls count their own skips
    monkeypatch.undo()
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.update_step(opt.param_groups[0], p, 0, 0)
    assert opt.nonfinite_skipped_blocks == 21


def test_a_step_that_fails_while_preparing_counts_no_parameter():
    """Switching percentile clipping on for one parameter after its state exists, and a state
    allocation that fails: no parameter is counted without its update."""
    a, b = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(1000))
    opt = bnb.optim.Adam8bit([a, b], min_8bit_size=0)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    bnb.optim.GlobalOptimManager.get_instance().override_config(b, "percentile_clipping", 5)
    opt.step()  # b's clipping history starts now, from this step's norm
    assert opt.state[a]["step"] == opt.state[b]["step"] == 2 and "gnorm_vec" in opt.state[b]
    assert torch.isfinite(b).all()

    c = torch.nn.Parameter(torch.randn(1000))
    opt.add_param_group({"params": [c]})
    c.grad = torch.randn_like(c)
    before = [p.detach().clone() for p in (a, b, c)]
    real = opt.absmax_buffer
    opt.absmax_buffer = lambda p, shape: (_ for _ in ()).throw(MemoryError("out of memory")) if p is c else real(p, shape)
    with pytest.raises(MemoryError):
        opt.step()
    assert not opt.state[c]  # no half-made state
    assert [opt.state[p]["step"] for p in (a, b)] == [2, 2]
    assert all(torch.equal(p, q) for p, q in zip((a, b, c), before))
    del opt.absmax_buffer
    opt.step()
    assert [opt.state[p]["step"] for p in (a, b, c)] == [3, 3, 1]


def test_a_parameter_listed_twice_gets_both_updates():
    w = torch.nn.Parameter(torch.randn(64, 32).t())  # non-contiguous: updated through a copy
    twin = torch.nn.Parameter(w.detach().clone())
    with pytest.warns(UserWarning, match="duplicate"):
        opt = bnb.optim.Adam8bit([{"params": [w, w]}], min_8bit_size=0)
        ref = bnb.optim.PagedAdam8bit([{"params": [twin, twin]}], min_8bit_size=0)  # one at a time on a CPU
    for _ in range(3):
        w.grad = torch.randn_like(w)
        twin.grad = w.grad.clone()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.step()
    assert torch.equal(w, twin)


def test_an_update_step_patched_on_the_instance_is_called():
    p = torch.nn.Parameter(torch.randn(300))
    opt = bnb.optim.Adam8bit([p], min_8bit_size=0)
    calls = []
    original = opt.update_step
    opt.update_step = lambda *args: calls.append(args[1]) or original(*args)
    p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [p]


# ---- issue #16: as torch.optim --------------------------------------------------------------


def _message(make) -> tuple[type, str]:
    with pytest.raises(Exception) as caught:
        make()
    return caught.type, str(caught.value)


def test_a_tensor_lr_of_two_elements_is_refused_in_torchs_words():
    lr = torch.tensor([1e-3, 1e-3])
    for make in (lambda ps: bnb.optim.Adam8bit(ps, lr=lr), lambda ps: bnb.optim.PytorchLARS(ps, lr=lr)):
        assert _message(lambda: make(make_params((4, 4), torch.float32))) == _message(
            lambda: torch.optim.Adam(make_params((4, 4), torch.float32), lr=lr)
        )


@pytest.mark.parametrize("cls", [bnb.optim.SGD8bit, bnb.optim.SGD, bnb.optim.LARS32bit])
def test_a_negative_momentum_is_refused_in_torchs_words(cls):
    """torch's text, followed by bitsandbytes' (which checks momentum as betas[0])."""
    error, text = _message(lambda: torch.optim.SGD(make_params((4, 4), torch.float32), lr=0.1, momentum=-0.5))
    with pytest.raises(error) as caught:
        cls(make_params((4, 4), torch.float32), lr=0.1, momentum=-0.5)
    assert str(caught.value).startswith(text) and "Invalid beta parameter at index 0: -0.5" in str(caught.value)


def test_an_empty_parameter_with_one_scale_per_tensor_steps():
    """torch.optim steps zero-element parameters; so does the 8-bit per-tensor layout, and the
    parameters beside it are updated once."""
    params = make_params((64, 81), torch.float32) + [torch.nn.Parameter(torch.zeros(0))] + make_params((8, 8), torch.float32)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = bnb.optim.Adam8bit(params, lr=1e-3, block_wise=False, min_8bit_size=0)
    torch_opt = torch.optim.Adam(reference, lr=1e-3)
    for _ in range(2):
        for p, r in zip(params, reference):
            p.grad = torch.full_like(p, 0.01)
            r.grad = torch.full_like(r, 0.01)
        opt.step()
        torch_opt.step()
    assert opt.state[params[1]]["step"] == 2 and opt.state[params[1]]["state1"].shape == (0,)
    for p, r in zip(params, reference):  # Adam's first steps on a constant gradient move by lr, 8-bit or not
        torch.testing.assert_close(p, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [bnb.optim.Adam8bit, bnb.optim.AdamW32bit, bnb.optim.Lion8bit])
def test_a_sparse_gradient_raises_runtime_error_as_torch_does(cls):
    p, = make_params((64, 81), torch.float32)
    p.grad = torch.ones_like(p).to_sparse()
    torch_error, _ = _message(lambda: torch.optim.Adam([p]).step())
    before = p.detach().clone()
    opt = cls([p])
    with pytest.raises(torch_error, match="does not support sparse gradients"):
        opt.step()
    assert torch_error is RuntimeError and torch.equal(p, before) and not opt.state[p]
