"""The CUDA backend on a real GPU: Triton kernels against the reference on the same device, and
paged states in CUDA managed memory. Skipped without CUDA; ``bash scripts/gpu-check.sh`` runs it
(and ``test_whole_gpu.py``, which needs the GPU to itself, alone after it)."""

from __future__ import annotations

import gc
import io
import math

import pytest
import torch
from support import RULES, copy_state, fresh
from support.weights import HALF_DTYPES, WEIGHT_CASES

import qoptim
from qoptim import kernels, paging
from qoptim.kernels import reference, rules
from qoptim.kernels.types import Hyper, Job, WeightFormat
from qoptim.paging import cuda as paging_cuda
from qoptim.quant import master

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_cuda_tensors_use_the_triton_backend(triton_backend):
    assert kernels.backend_for(CUDA) is triton_backend


# ---- kernels against the reference, on the GPU --------------------------------------------

# Each rule's hyperparameters, its options on (the Hyper fields beyond eps, decay and step).
RULE_HYPER = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999),
    "ademamix": dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0),
    "lion": dict(lr=1e-4, beta1=0.9, beta2=0.99),
    "momentum": dict(lr=1e-2, beta1=0.0, beta2=0.0, momentum=0.9, nesterov=True),
    "lars": dict(lr=1e-1, beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, trust_coefficient=0.02),
    "rmsprop": dict(lr=1e-3, beta1=0.0, beta2=0.0, smoothing=0.99),
    "adagrad": dict(lr=1e-2, beta1=0.0, beta2=0.0, lr_decay=0.01),
    "lamb": dict(lr=1e-3, beta1=0.9, beta2=0.999, max_unorm=1.0),
}
assert set(RULE_HYPER) == set(rules.RULES)


def _hyper(rule, step):
    """Decoupled decay on odd steps, L2 on even ones (for the rules that have both); percentile
    clipping's gradient scale on odd steps."""
    return Hyper(eps=1e-8, weight_decay=0.01, step=step, decoupled=step % 2 == 1, gnorm_scale=0.5 if step % 2 else 1.0,
                 **RULE_HYPER[rule])  # fmt: skip


def _assert_close_to_reference(p, p_ref, before, slots, slots_ref, n):
    """torch on CUDA divides by a Python scalar as a multiply by its reciprocal (~1 ulp in an
    intermediate; AdEMAMix and LAMB divide twice), and LAMB / LARS's trust ratio sums in another
    order (~1e-15): parameters within four ulps of the update (bounded by |old| + |new|), states
    within an ulp or so, 8-bit codes off by one here and there."""
    bound = 4 * torch.finfo(p.dtype).eps * (before.float().abs() + torch.maximum(p.float().abs(), p_ref.float().abs()))
    assert bool(((p.float() - p_ref.float()).abs() <= bound).all())
    for s, e in zip(slots, slots_ref):
        if s.quantized:
            diff = (s.values.int() - e.values.int()).abs()
            assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, n // 10_000)
            torch.testing.assert_close(s.absmax, e.absmax, rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(s.values, e.values, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["blockwise", "whole_tensor", "fp32"])
@pytest.mark.parametrize("rule", RULES)
def test_kernel_matches_reference_on_device(triton_backend, rule, layout, dtype):
    for n in (1, 257, 4097, 1_000_003):
        p_ref, slots_ref = fresh(rule, n, layout, dtype, CUDA)
        for step in range(1, 6):
            g = (torch.randn(n, device=CUDA) * 0.01).to(dtype)
            g[(step * 997) % n] = math.nan
            hp = _hyper(rule, step)
            p, slots = copy_state(p_ref, slots_ref)
            before = p.clone()
            got = triton_backend.update(rule, p, g, slots, hp, True).skipped_blocks
            assert got == reference.update(rule, p_ref, g, slots_ref, hp, True).skipped_blocks == 1
            _assert_close_to_reference(p, p_ref, before, slots, slots_ref, n)


@pytest.mark.parametrize("rule, rel", [("lars", 1e-12), ("lamb", 1e-6)])
def test_trust_ratio_on_device_matches_reference(triton_backend, rule, rel):
    """LARS's norms (of p and g) differ only in the order of their float64 sums; LAMB's direction
    also differs by an ulp here and there (torch's reciprocal-multiply division on CUDA)."""
    for layout in ("blockwise", "fp32"):
        p, slots = fresh(rule, 1_000_003, layout, torch.bfloat16, CUDA)
        for step in range(1, 4):
            g = (torch.randn(p.numel(), device=CUDA) * 0.01).bfloat16()
            hp = _hyper(rule, step)
            expected = reference.trust_ratio(rule, p, g, slots, hp, True)
            got = triton_backend.trust_ratio(rule, p, g, slots, hp, True)
            assert float(got.ratio) == pytest.approx(expected, rel=rel, abs=0)
            triton_backend.update(rule, p, g, slots, hp, True)


# ---- many small tensors in one launch --------------------------------------------------

BATCHED_RULES = tuple(rule for rule in RULES if not rules.RULES[rule].trust)  # a trust ratio takes launches of its own


def _small_tensors_step(rule, tensors, step):
    """Jobs of one step: a NaN in a place that moves from tensor to tensor, percentile clipping's
    gradient scale on every other tensor."""
    jobs = []
    for i, (p, slots) in enumerate(tensors):
        g = (torch.randn(p.numel(), device=CUDA) * 0.01).to(p.dtype)
        g[(step * 997 + 31 * i) % p.numel()] = math.nan
        hp = _hyper(rule, step)._replace(gnorm_scale=0.5 if (i + step) % 2 else 1.0)
        jobs.append(Job(rule, p, g, slots, hp, True))
    return jobs


def _twin(job):
    p, slots = copy_state(job.p, job.slots)
    return job._replace(p=p, slots=slots)


def _bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("rule", BATCHED_RULES)
def test_batched_launch_matches_a_launch_per_tensor(triton_backend, monkeypatch, rule, layout, dtype):
    """The same tile code with the pointers from a table: bit for bit, skip counts included.
    Each 8-bit state has a map of its own (the optimizers share one per kind and device; other
    callers may not): a batch reads each tensor's map from its table row."""
    from qoptim.kernels.triton import batch

    launches = []
    monkeypatch.setattr(batch, "run", lambda jobs, run=batch.run: launches.append(len(jobs)) or run(jobs))
    tensors = [fresh(rule, n, layout, dtype, CUDA) for n in (1, 255, 257, 4097, 100_003)]
    for _, slots in tensors:
        for slot in slots:
            slot.code = None if slot.code is None else slot.code.clone()
    for step in range(1, 4):
        jobs = _small_tensors_step(rule, tensors, step)
        single = [_twin(job) for job in jobs]
        results = triton_backend.update_many(jobs)
        expected = [triton_backend.update(*job) for job in single]
        assert launches[-1] == len(jobs)
        for job, twin, got, want in zip(jobs, single, results, expected):
            assert int(got.skipped_blocks) == int(want.skipped_blocks) == 1
            assert torch.equal(_bits(job.p), _bits(twin.p))
            for ours, theirs in zip(job.slots, twin.slots):
                assert torch.equal(_bits(ours.values), _bits(theirs.values))
                assert ours.absmax is None or torch.equal(ours.absmax, theirs.absmax)


def test_batched_step_does_not_synchronize(triton_backend):
    """The tables go to the device from pinned memory, the skip counts stay there: a warm
    step queues its work without waiting for the GPU."""
    tensors = [fresh("adam", n, "blockwise", torch.bfloat16, CUDA) for n in (768, 2304, 3072, 768)]
    triton_backend.update_many(_small_tensors_step("adam", tensors, 1))  # warm: compiled, search tables made
    jobs = _small_tensors_step("adam", tensors, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = triton_backend.update_many(jobs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(r.skipped_blocks, torch.Tensor) for r in results)


# ---- weight formats (issue #17) ----------------------------------------------------------


def _step_as_fp32_then_format(triton_backend, rule, p, correction, slots, g, hp, weights):
    """One fused step of 16-bit ``p`` in ``weights``' format, and what it must give: the same
    kernel's step on an fp32 parameter holding the (decoded) master, then ``quant.master``'s
    encode or stochastic rounding, whose integer and power-of-two ops round alike on any device
    (where the reference's float ops on CUDA may not, see ``_assert_close_to_reference``).
    Asserts the two agree bit for bit: weight, correction, states, skipped blocks."""
    p32 = p.float() if correction is None else master.decode(p, correction)
    p32, slots32 = copy_state(p32, slots)
    got = triton_backend.update(rule, p, g, slots, hp, True, weights).skipped_blocks
    want = triton_backend.update(rule, p32, g.float(), slots32, hp, True).skipped_blocks
    assert int(got) == int(want)
    if correction is None:
        assert torch.equal(_bits(p), _bits(master.stochastic_round(p32, p.dtype, weights.draw)))
    else:
        weight, c = master.encode(p32, p.dtype, master.bits_of(correction.dtype))
        assert torch.equal(_bits(p), _bits(weight)) and torch.equal(correction, c)
        if p.dtype == torch.bfloat16 and correction.dtype == torch.int16:  # the pair is the fp32 master itself
            assert torch.equal(_bits(master.decode(p, correction)), _bits(p32))
    for ours, theirs in zip(slots, slots32):
        assert torch.equal(_bits(ours.values), _bits(theirs.values))
        assert ours.absmax is None or torch.equal(ours.absmax, theirs.absmax)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["blockwise", "whole_tensor", "fp32"])
@pytest.mark.parametrize("rule", RULES)
def test_weight_formats_are_the_fp32_step_then_the_format(triton_backend, rule, layout, dtype, case):
    for n in (257, 1_000_003):
        p, slots = fresh(rule, n, layout, dtype, CUDA)
        correction = case.start(p)
        for step in range(1, 5):
            g = (torch.randn(n, device=CUDA) * 0.01).to(dtype)
            g[(step * 997) % n] = math.nan
            hp = _hyper(rule, step)
            _step_as_fp32_then_format(triton_backend, rule, p, correction, slots, g, hp, case.at(correction, hp))


def test_batches_of_mixed_weight_formats_match_a_launch_per_tensor(triton_backend):
    """Small tensors of every 16-bit dtype and format (and fp32 with a draw, which it ignores) in
    ``update_many``: a batch per dtype and format, each tensor as a launch of its own would leave it."""
    tensors = []
    for i, (dtype, case) in enumerate((d, c) for d in HALF_DTYPES for c in (None, *WEIGHT_CASES)):
        for n in (1, 255, 4097, 100_003):
            p, slots = fresh("adam", n, "blockwise", dtype, CUDA)
            tensors.append((p, slots, case, None if case is None else case.start(p), i))
    tensors.append((*fresh("adam", 3000, "fp32", torch.float32, CUDA), WEIGHT_CASES[2], None, 99))
    for step in range(1, 4):
        jobs, single = [], []
        for i, (p, slots, case, correction, seed) in enumerate(tensors):
            hp = _hyper("adam", step)
            if case is not None and case.stochastic:
                weights = WeightFormat(draw=master.Draw(master.step_key(seed, step), 1000 * i))
            else:
                weights = WeightFormat() if case is None else case.at(correction, hp)
            g = (torch.randn(p.numel(), device=CUDA) * 0.01).to(p.dtype)
            g[(step * 997 + 31 * i) % p.numel()] = math.nan
            jobs.append(Job("adam", p, g, slots, hp, True, weights))
            twin_p, twin_slots = copy_state(p, slots)
            twin_weights = weights._replace(correction=None if correction is None else correction.clone())
            single.append(Job("adam", twin_p, g, twin_slots, hp, True, twin_weights))
        results = triton_backend.update_many(jobs)
        expected = [triton_backend.update(*job) for job in single]
        for job, twin, got, want in zip(jobs, single, results, expected):
            assert int(got.skipped_blocks) == int(want.skipped_blocks) == 1
            assert torch.equal(_bits(job.p), _bits(twin.p))
            if job.weights.correction is not None:
                assert torch.equal(job.weights.correction, twin.weights.correction)
            for ours, theirs in zip(job.slots, twin.slots):
                assert torch.equal(_bits(ours.values), _bits(theirs.values))
                assert ours.absmax is None or torch.equal(ours.absmax, theirs.absmax)


# ---- training, Triton against the reference --------------------------------------------


def _train(optimizer_name, backend, monkeypatch, steps=30, **settings):
    monkeypatch.setenv("QOPTIM_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(CUDA)
    opt = getattr(qoptim.optim, optimizer_name)(model.parameters(), **{"lr": 1e-3, **settings})
    x, y = torch.randn(64, 512, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "Adam8bit", "AdamW"])
def test_training_matches_reference_backend(triton_backend, monkeypatch, name):
    fused, opt, fused_losses = _train(name, "auto", monkeypatch)
    ref, _, ref_losses = _train(name, "reference", monkeypatch)
    assert fused_losses[-1] < fused_losses[0]
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)
    if name.startswith("Paged"):
        big = opt.state[fused[0].weight]  # 131072 elements: paged
        assert getattr(big["state1"], "is_paged", False) and getattr(big["state2"], "is_paged", False)
        small = opt.state[fused[0].bias]
        assert not getattr(small["state1"], "is_paged", False)


# The other families: 8-bit states for the weights, 32-bit for the biases (below min_8bit_size),
# and the whole-tensor 8-bit layout on a few.
FAMILY_RUNS = {
    "Lion8bit": dict(lr=1e-4, weight_decay=0.01),
    "Lion32bit": dict(lr=1e-4),
    "AdEMAMix8bit": dict(weight_decay=0.01),
    "SGD8bit": dict(lr=1e-2, momentum=0.9, nesterov=True),
    "LARS8bit": dict(lr=1e-1, momentum=0.9, weight_decay=1e-4),
    "RMSprop8bit": dict(lr=1e-3, block_wise=False),
    "Adagrad8bit": dict(lr=1e-2),
    "LAMB8bit": dict(weight_decay=0.01),
    "LAMB32bit": dict(),
    "SGD8bit-whole": dict(lr=1e-2, momentum=0.9, block_wise=False),
}


@pytest.mark.parametrize("run", FAMILY_RUNS)
def test_family_training_matches_reference_backend(triton_backend, monkeypatch, run):
    name, settings = run.split("-")[0], FAMILY_RUNS[run]
    fused, opt, fused_losses = _train(name, "auto", monkeypatch, **settings)
    ref, _, ref_losses = _train(name, "reference", monkeypatch, **settings)
    assert fused_losses[-1] < fused_losses[0]
    assert opt.state[fused[0].weight]["state1"].dtype == (torch.float32 if "32bit" in name else torch.uint8)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


def test_paged_checkpoint_round_trip(triton_backend, monkeypatch):
    model, opt, _ = _train("PagedAdamW8bit", "auto", monkeypatch, steps=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = qoptim.optim.PagedAdamW8bit(model.parameters(), lr=1e-3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(fresh.state[p][key], value), key
    state = fresh.state[model[0].weight]
    assert getattr(state["state1"], "is_paged", False)
    assert state["state1"].data_ptr() != opt.state[model[0].weight]["state1"].data_ptr()  # a buffer of its own


# ---- the managed-memory allocator --------------------------------------------------------


class _CountingRuntime(paging_cuda.CudaRuntime):
    def __init__(self):
        super().__init__()
        self.freed = 0
        self.prefetched = 0

    def free(self, ptr):
        super().free(ptr)
        self.freed += 1

    def prefetch(self, ptr, nbytes, device):
        super().prefetch(ptr, nbytes, device)
        self.prefetched += 1


def test_managed_buffers_are_paged_prefetched_and_freed():
    runtime = _CountingRuntime()
    pager = paging_cuda.ManagedPager(runtime)
    allocated_before = torch.cuda.memory_allocated()
    t = pager.zeros((1024, 1024), torch.float32, CUDA)
    assert t.is_cuda and t.is_paged and t.shape == (1024, 1024) and bool((t == 0).all())
    assert torch.cuda.memory_allocated() == allocated_before  # not from torch's caching allocator
    t += 1
    pager.prefetch([t], CUDA)
    pager.synchronize(CUDA)
    assert runtime.prefetched == (1 if runtime.can_prefetch(CUDA) else 0)
    assert float(t.sum()) == 1024 * 1024
    view = t[0]
    del t
    gc.collect()
    assert runtime.freed == 0  # a view still holds the buffer
    del view
    gc.collect()
    assert runtime.freed == 1


def test_the_registered_cuda_pager_pages_large_states():
    p = torch.nn.Parameter(torch.zeros(paging.PAGED_MIN_NUMEL, device=CUDA))
    assert getattr(paging.state_buffer(p, torch.uint8, True), "is_paged", False)
    assert not getattr(paging.state_buffer(p[:10], torch.uint8, True), "is_paged", False)
