"""Gradient release (qoptim.release_gradients): each parameter updated in backward as its gradient
completes, the gradient freed. A loop written for the normal path gives the same parameters and
states bit for bit, for every family; what cannot work is refused with a clear error."""

from __future__ import annotations

import gc
import inspect
import math
import warnings
import weakref

import pytest
import torch
from support import count_calls, dtype_id
from support.paging import is_paged, paged_cpu
from torch import nn

import qoptim
from qoptim import kernels
from qoptim.optim import release

FAMILIES = {  # family class (takes optim_bits) and its arguments
    "Adam": (qoptim.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "AdamW": (qoptim.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "AdEMAMix": (qoptim.optim.AdEMAMix, dict(lr=1e-2, t_alpha=10, t_beta3=10)),
    "Lion": (qoptim.optim.Lion, dict(lr=1e-3, weight_decay=1e-2)),
    "LAMB": (qoptim.optim.LAMB, dict(lr=1e-2, weight_decay=1e-2)),
    "LARS": (qoptim.optim.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    "SGD": (qoptim.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "RMSprop": (qoptim.optim.RMSprop, dict(lr=1e-3)),
    "Adagrad": (qoptim.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3)),
}
STEPS = 4


def make_model(dtype=torch.float32) -> nn.Module:
    """Weights of 2560 and 5120 elements (8-bit states at min_8bit_size=1024), small biases and a norm (fp32 states)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 80), nn.LayerNorm(80), nn.Tanh(), nn.Linear(80, 64)).to(dtype)


def batch(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(100 + step)).to(dtype)


def train(model, opt, steps=STEPS, *, start=0, scheduler=None, calls_step=True, between=None):
    """The normal loop (backward, step, scheduler, zero_grad); ``between(step)`` runs after backward."""
    for step in range(start, start + steps):
        model(batch(step, next(model.parameters()).dtype)).float().square().mean().backward()
        if between is not None:
            between(step)
        if calls_step:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()


def assert_same(model_a, opt_a, model_b, opt_b):
    for index, (a, b) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        assert torch.equal(a, b), f"parameter {index} differs"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys(), index
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"parameter {index}: {key} differs"
            else:
                assert sa[key] == sb[key], f"parameter {index}: {key} {sa[key]!r} != {sb[key]!r}"
    assert opt_a.nonfinite_skipped_blocks == opt_b.nonfinite_skipped_blocks


def pair(make_opt, dtype=torch.float32):
    """Two equal models with an optimizer each: (model, opt) for the normal loop, and for release."""
    return [(m, make_opt(m.parameters())) for m in (make_model(dtype), make_model(dtype))]


def lr_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # a new lr every step


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_release_matches_the_normal_loop(family, bits, dtype, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("QOPTIM_BACKEND", "reference")
    cls, kwargs = FAMILIES[family]
    (m1, o1), (m2, o2) = pair(lambda ps: cls(ps, optim_bits=bits, min_8bit_size=1024, **kwargs), dtype)
    s1, s2 = lr_schedule(o1), lr_schedule(o2)
    handle = qoptim.release_gradients(o2, bucket_bytes=4096)  # several flushes per backward
    train(m1, o1, scheduler=s1)
    train(m2, o2, scheduler=s2, between=lambda step: assert_no_grads(m2))
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] != kwargs["lr"]  # the schedule moved it
    assert_same(m1, o1, m2, o2)
    if bits == 8:
        assert o2.state[m2[0].weight]["state1"].dtype == torch.uint8
    handle.remove()


def assert_no_grads(model):
    assert all(p.grad is None for p in model.parameters()), "released gradients must be freed"


@pytest.mark.parametrize("bucket_bytes", [0, 4096, release.DEFAULT_BUCKET_BYTES])
def test_one_batched_kernel_call_per_flush(bucket_bytes, monkeypatch):
    (m1, o1), (m2, o2) = pair(lambda ps: qoptim.AdamW8bit(ps, lr=1e-2, min_8bit_size=1024))
    qoptim.release_gradients(o2, bucket_bytes=bucket_bytes)
    train(m1, o1)
    calls = count_calls(monkeypatch, kernels, "update_many")
    train(m2, o2)
    assert_same(m1, o1, m2, o2)
    sizes = [len(jobs) for (jobs,) in calls if jobs]
    assert sum(sizes) == STEPS * 6, "each parameter once per backward"
    if bucket_bytes == 0:
        assert sizes == [1] * (STEPS * 6)
    elif bucket_bytes == release.DEFAULT_BUCKET_BYTES:
        assert sizes == [6] * STEPS, "the whole model fits one flush: one update_many call per backward"
    else:
        assert 1 < max(sizes) and len(sizes) < STEPS * 6


def live_gradient_peak(model, bucket_bytes=None) -> tuple[int, int]:
    """(peak of the bytes held in .grad during backward, bytes of all gradients), through a
    post-accumulate-grad hook registered before release's (it runs first, each time a gradient completes)."""
    params = list(model.parameters())
    peak = [0]

    def count(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    opt = qoptim.AdamW8bit(params, lr=1e-2, min_8bit_size=1024)
    if bucket_bytes is not None:
        qoptim.release_gradients(opt, bucket_bytes=bucket_bytes)
    train(model, opt, steps=2)
    return peak[0], sum(p.numel() * p.element_size() for p in params)


def test_gradient_memory_is_bounded_by_the_bucket():
    normal, total = live_gradient_peak(make_model())
    assert normal == total
    biggest = max(p.numel() * p.element_size() for p in make_model().parameters())
    for bucket_bytes in (0, 4096, 12_000):
        peak, _ = live_gradient_peak(make_model(), bucket_bytes)
        assert peak <= bucket_bytes + biggest, (bucket_bytes, peak)
        assert peak < total
    assert live_gradient_peak(make_model(), 0)[0] == biggest, "bucket 0: one gradient alive at a time"


def test_a_loop_without_step_or_zero_grad_and_with_a_closure():
    models = [make_model() for _ in range(3)]
    (m1, o1), (m2, o2), (m3, o3) = [(m, qoptim.Lion8bit(m.parameters(), lr=1e-3, min_8bit_size=1024)) for m in models]
    qoptim.release_gradients(o2)
    qoptim.release_gradients(o3)
    train(m1, o1)
    for step in range(STEPS):  # release only: backward is the step
        m2(batch(step)).square().mean().backward()
    for step in range(STEPS):

        def closure(step=step):
            loss = m3(batch(step)).square().mean()
            loss.backward()
            return loss

        assert torch.isfinite(o3.step(closure))
        assert_no_grads(m3)
    assert_same(m1, o1, m2, o2)
    assert_same(m1, o1, m3, o3)


def test_parameters_left_out_of_a_backward_are_not_stepped():
    (m1, o1), (m2, o2) = pair(lambda ps: qoptim.Adam8bit(ps, lr=1e-2, min_8bit_size=1024))
    qoptim.release_gradients(o2, bucket_bytes=0)

    def run(model, opt):
        for step in range(STEPS):
            head = model[3] if step % 2 else nn.Identity()  # the last layer only on odd steps
            head(model[:3](batch(step))).square().mean().backward()
            opt.step()
            opt.zero_grad()

    run(m1, o1)
    run(m2, o2)
    assert o2.state[m2[3].weight]["step"] == STEPS // 2
    assert_same(m1, o1, m2, o2)


def test_remove_restores_the_normal_path():
    (m1, o1), (m2, o2) = pair(lambda ps: qoptim.AdamW8bit(ps, lr=1e-2, min_8bit_size=1024))
    handle = qoptim.release_gradients(o2)
    assert getattr(o2, "_step_supports_amp_scaling", False)
    train(m1, o1)
    train(m2, o2)
    handle.remove()
    assert not hasattr(o2, "_step_supports_amp_scaling")
    m2(batch(0)).square().mean().backward()
    assert all(p.grad is not None for p in m2.parameters()), "gradients stay for step() again"
    o2.zero_grad()
    for step in range(2):  # gradients accumulated over two micro-batches, as the normal path allows
        for model in (m1, m2):
            model(batch(step)).square().mean().backward()
    for opt in (o1, o2):
        opt.step()
        opt.zero_grad()
    assert_same(m1, o1, m2, o2)
    qoptim.release_gradients(o2).remove()  # and on again


def test_percentile_clipping_and_nonfinite_counts_match():
    """NaN/Inf gradients on some steps: the same skipped blocks and one warning, with the step's count."""
    (m1, o1), (m2, o2) = pair(lambda ps: qoptim.Adam8bit(ps, lr=1e-2, min_8bit_size=1024, percentile_clipping=5))
    qoptim.release_gradients(o2, bucket_bytes=0)  # the count of one backward spans several flushes
    counter = [0]

    def poison(g):  # a NaN in two weights' gradients on steps 1 and 2
        if 1 <= counter[0] <= 2:
            g = g.clone()
            g[0, counter[0]] = math.nan
        return g

    for model in (m1, m2):
        for layer in (model[0], model[3]):
            layer.weight.register_hook(poison)
    messages = []
    for model, opt in ((m1, o1), (m2, o2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(STEPS):
                counter[0] = step
                model(batch(step)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        messages.append([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    assert o1.nonfinite_skipped_blocks > 0
    assert messages[0] == messages[1] and len(messages[0]) == 1
    assert_same(m1, o1, m2, o2)
    assert "gnorm_vec" in o2.state[m2[0].weight]


def test_paged_optimizer():
    with paged_cpu() as fake:
        params = [[nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1) for n in (100_000, 8192, 100)]
                  for _ in range(2)]  # fmt: skip
        o1, o2 = (qoptim.PagedAdamW8bit(ps, lr=1e-2) for ps in params)
        qoptim.release_gradients(o2)
        for step in range(3):
            for ps, opt in ((params[0], o1), (params[1], o2)):
                sum((p * torch.linspace(-1, 1, p.numel()) * (step + 1)).sum() for p in ps).backward()
                opt.step()
                opt.zero_grad()
        assert is_paged(o2.state[params[1][0]]["state1"]) and fake.prefetches
        for a, b in zip(*params):
            assert torch.equal(a, b)
            for key, value in o1.state[a].items():
                assert torch.equal(value, o2.state[b][key]) if isinstance(value, torch.Tensor) else value == o2.state[b][key]


# ---- refusals -----------------------------------------------------------------------------------


def test_accumulation_is_refused_at_step_then_at_once():
    model = make_model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    qoptim.release_gradients(opt)
    for step in range(2):  # two micro-batches before the first step(): both already applied
        model(batch(step)).square().mean().backward()
    with pytest.raises(RuntimeError, match="more than one backward ran since the last optimizer.step.*accumulation"):
        opt.step()
    model(batch(2)).square().mean().backward()
    opt.step()  # the loop calls step(): from now on the second micro-batch is refused in backward
    model(batch(3)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="parameter 5 of param group 0 got a second gradient before optimizer.step"):
        model(batch(4)).square().mean().backward()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "the refused backward applied nothing"
    opt.zero_grad()
    opt.step()  # the next iteration starts clean
    model(batch(5)).square().mean().backward()


def test_grad_scaler_is_refused():
    model = make_model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    handle = qoptim.release_gradients(opt)
    scaler.scale(model(batch(0)).square().mean()).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot be used with gradient release"):
        scaler.unscale_(opt)  # (it would find no gradient)
    with pytest.raises(RuntimeError, match="GradScaler cannot be used with gradient release"):
        scaler.step(opt)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    handle.remove()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # the normal path again
    scaler.scale(model(batch(1)).square().mean()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


CLIPPING = {"clip_grad_norm_": (1.0,), "clip_grad_value_": (0.1,), "clip_grads_with_norm_": (1.0, torch.tensor(2.0))}


@pytest.mark.parametrize("name", list(CLIPPING))
def test_gradient_clipping_is_refused_for_released_parameters(name):
    """It would find no gradient and clip nothing: refused while the handle is on, for its parameters
    only (one of them among others is enough); torch's own clipping for the rest and after remove()."""
    model, other = make_model(), nn.Linear(8, 8)
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    handle = qoptim.release_gradients(opt)
    clip, args = getattr(torch.nn.utils, name), CLIPPING[name]  # (looked up now: the guard wraps the module's names)
    assert clip is getattr(torch.nn.utils.clip_grad, name, clip)  # (one function under both names, as in torch)
    torch_clip = inspect.unwrap(clip)
    model(batch(0)).square().mean().backward()
    other(torch.randn(2, 8)).square().sum().backward()
    with pytest.raises(RuntimeError, match="under gradient release"):
        clip(model.parameters(), *args)  # (a generator)
    with pytest.raises(RuntimeError, match="under gradient release"):
        clip([*other.parameters(), model[0].weight], *args)
    twin = [q.grad.clone() for q in other.parameters()]
    twin_params = [torch.zeros_like(g, requires_grad=True) for g in twin]
    for q, g in zip(twin_params, twin):
        q.grad = g
    torch_clip(twin_params, *args)
    clip(other.parameters(), *args)  # a model outside release: clipped as torch clips
    assert all(torch.equal(q.grad, t.grad) for q, t in zip(other.parameters(), twin_params))
    handle.remove()
    model(batch(1)).square().mean().backward()
    clip(model.parameters(), *args)  # the normal path again
    assert all(q.grad is not None for q in model.parameters())


def test_plain_parameters_in_a_process_group_are_refused(tmp_path):
    """DDP (and FSDP1, or one's own all-reduce) reduce gradients after backward: refused when
    release starts, and at the next backward when the process group came later."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    model = make_model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    handle = qoptim.release_gradients(opt)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="needs every parameter sharded by FSDP2.*DistributedDataParallel"):
            ddp(batch(0)).square().mean().backward()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        handle.remove()
        opt.zero_grad()
        ddp.zero_grad()
        with pytest.raises(RuntimeError, match="needs every parameter sharded by FSDP2"):
            qoptim.release_gradients(opt)
    finally:
        dist.destroy_process_group()


def test_bad_calls_are_refused():
    model = make_model()
    with pytest.raises(TypeError, match="takes a qoptim optimizer, got AdamW"):
        qoptim.release_gradients(torch.optim.AdamW(model.parameters()))
    opt = qoptim.AdamW8bit(model.parameters())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="bucket_bytes must be a non-negative int"):
            qoptim.release_gradients(opt, bucket_bytes=bad)
    with pytest.raises(ValueError, match=r"nonfinite='raise'\) cannot release gradients"):
        qoptim.release_gradients(qoptim.AdamW8bit(model.parameters(), nonfinite="raise"))
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's own warning
        twice = qoptim.AdamW8bit([model[0].weight, model[0].weight])
    with pytest.raises(ValueError, match="parameter 1 of param group 0 is listed twice"):
        qoptim.release_gradients(twice)
    model(batch(0)).sum().backward()
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 holds a gradient already"):
        qoptim.release_gradients(opt)
    opt.zero_grad()
    handle = qoptim.release_gradients(opt)
    with pytest.raises(RuntimeError, match="gradient release is already on"):
        qoptim.release_gradients(opt)
    handle.remove()
    qoptim.release_gradients(opt).remove()


def test_a_failing_flush_raises_from_backward_and_leaves_the_rest():
    model = make_model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    qoptim.release_gradients(opt, bucket_bytes=0)
    opt.param_groups[0]["lr"] = -1.0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param group 0: Invalid learning rate"):
        model(batch(0)).square().mean().backward()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.in_step
    opt.param_groups[0]["lr"] = 1e-2
    opt.zero_grad()
    model(batch(1)).square().mean().backward()
    assert_no_grads(model)


class FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a failure of the model's own in backward")


@pytest.mark.parametrize("next_call", ["step", "backward"])
def test_param_groups_are_checked_after_a_backward_that_failed(next_call):
    """A backward that failed after a flush (not in ours: the model's) leaves the step it had
    opened; the next step() or backward still checks the param groups before updating anything."""
    a, b = nn.Parameter(torch.randn(4096)), nn.Parameter(torch.randn(4096))
    opt = qoptim.AdamW8bit([a, b], lr=1e-3)
    handle = qoptim.release_gradients(opt, bucket_bytes=0)
    with pytest.raises(RuntimeError, match="model's own"):
        ((FailsInBackward.apply(b) * 2).sum() + (a * 2).sum()).backward()  # a is flushed first
    opt.param_groups[0]["lr"] = -1.0
    before = [p.detach().clone() for p in (a, b)]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        if next_call == "step":
            handle.remove()
            a.grad, b.grad = torch.ones(4096), torch.ones(4096)
            opt.step()
        else:
            ((a * 3).sum() + (b * 3).sum()).backward()
    assert all(torch.equal(x, p) for x, p in zip(before, (a, b)))


def test_nothing_keeps_a_released_optimizer_alive():
    model = make_model()
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-2)
    qoptim.release_gradients(opt)  # the handle is not kept: the optimizer holds it
    model(batch(0)).square().mean().backward()
    assert opt.state[model[0].weight]["step"] == 1
    gone = weakref.ref(opt)
    del model, opt
    gc.collect()
    assert gone() is None
