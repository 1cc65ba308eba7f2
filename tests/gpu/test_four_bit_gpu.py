"""4-bit optimizer states (issue #18) in the compiled Triton kernels on a real GPU, against the
reference run on the CPU (its square root correctly rounded, ``reference.sqrt``): bit for bit, as
under the interpreter (``tests/kernels/triton/test_four_bit.py``). The compiled kernels use the same IEEE
float32 ops (``div_rn``, ``sqrt_rn``, no contraction, no flush of subnormals: checked in
``tests/kernels/triton_compile``), so a difference here is one between the compiled code and the
interpreted one. (Not the reference run on CUDA: torch divides by a Python scalar there as a
multiply by its reciprocal, and a 4-bit code flips wherever that moves ``x / scale`` across a
midpoint.) LAMB's and LARS's steps are compared given the kernel's own trust ratio (its float64
sums add in another order: ``test_cuda.py`` checks the ratio). Skipped without CUDA;
``bash scripts/gpu-check.sh`` runs it."""

from __future__ import annotations

import pytest
import torch
from support import (FOUR_BIT, FOUR_BIT_RULES, PARAM_DTYPES, assert_same, assert_same_state, dtype_id, fresh,
                     gradient, hyper, with_draws)  # fmt: skip
from support.weights import HALF_DTYPES, WEIGHT_CASES

import qoptim
from qoptim.kernels import reference, rules
from qoptim.kernels.types import Job, StateSlot
from qoptim.quant import master

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SIZES = (1, 257, 4097, 1_000_003)  # the last: many programs, and the reference in chunks
BATCHED_RULES = tuple(rule for rule in FOUR_BIT_RULES if not rules.RULES[rule].trust)


def on_cpu(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    """CPU copies of a parameter and its states (states sharing their bytes share the copy)."""
    moved: dict[int, torch.Tensor] = {}
    return p.cpu(), [StateSlot(moved.setdefault(id(s.values), s.values.cpu()), s.code.cpu(), s.absmax.cpu(), s.blocksize, s.shift,
                               s.draw) for s in slots]  # fmt: skip


def with_kernel_ratio(monkeypatch, tk, job: Job) -> None:
    """Let the reference's LAMB / LARS step use the kernel's trust ratio for ``job`` (before its update)."""
    if rules.RULES[job.rule].trust:
        ratio = float(tk.trust_ratio(*job).ratio)
        monkeypatch.setattr(reference, "trust_ratio", lambda *args, **kwargs: ratio)


def assert_step_matches_cpu_reference(monkeypatch, tk, job: Job, cpu_job: Job, where: str) -> None:
    """``job`` on the GPU (one launch) and ``cpu_job``, its CPU copy, in the reference: same bits."""
    with_kernel_ratio(monkeypatch, tk, job)
    got = tk.update(*job).skipped_blocks
    expected = reference.update(*cpu_job).skipped_blocks
    assert int(got) == expected, where
    assert_same_state(*on_cpu(job.p, job.slots), cpu_job.p, cpu_job.slots, where)
    if job.weights.correction is not None:
        assert_same(job.weights.correction.cpu(), cpu_job.weights.correction, f"{where} master correction")


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_kernel_matches_cpu_reference(triton_backend, monkeypatch, rule, dtype, skip_nonfinite, stochastic):
    """Five steps (NaN / Inf gradients on steps 2, 3 and 5) at odd sizes, bit for bit; the
    never-negative states rounded to nearest, or stochastically (each step its key, the elements'
    indices wrapping around 2**32)."""
    for n in SIZES:
        p, slots = fresh(rule, n, FOUR_BIT, dtype, CUDA)
        p_ref, slots_ref = on_cpu(p, slots)
        for step in range(1, 6):
            if stochastic:
                draw = master.Draw(master.step_key(n, step), (1 << 32) - 1000)
                slots, slots_ref = with_draws(rule, slots, draw), with_draws(rule, slots_ref, draw)
            g, hp = gradient(n, dtype, step), hyper(rule, step)
            job = Job(rule, p, g.to(CUDA), slots, hp, skip_nonfinite)
            cpu_job = Job(rule, p_ref, g, slots_ref, hp, skip_nonfinite)
            assert_step_matches_cpu_reference(monkeypatch, triton_backend, job, cpu_job, f"n {n}, step {step}:")


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_weight_formats_match_cpu_reference(triton_backend, monkeypatch, rule, dtype, case):
    """Master corrections (compared too) and stochastic rounding, bit for bit."""
    for n in (4097, 1_000_003):
        p, slots = fresh(rule, n, FOUR_BIT, dtype, CUDA)
        correction = case.start(p)
        p_ref, slots_ref = on_cpu(p, slots)
        correction_ref = None if correction is None else correction.cpu()
        for step in range(1, 5):
            g, hp = gradient(n, dtype, step), hyper(rule, step)
            job = Job(rule, p, g.to(CUDA), slots, hp, True, case.at(correction, hp))
            cpu_job = Job(rule, p_ref, g, slots_ref, hp, True, case.at(correction_ref, hp))
            assert_step_matches_cpu_reference(monkeypatch, triton_backend, job, cpu_job, f"n {n}, step {step}:")


@pytest.mark.parametrize("rule", BATCHED_RULES)
def test_a_batch_matches_cpu_reference(triton_backend, monkeypatch, rule):
    """4-bit tensors of several sizes and every dtype in ``update_many`` (a launch per dtype)."""
    from qoptim.kernels.triton import batch

    launches = []
    monkeypatch.setattr(batch, "run", lambda jobs, run=batch.run: launches.append(len(jobs)) or run(jobs))
    tensors = [fresh(rule, n, FOUR_BIT, dtype, CUDA) for dtype in PARAM_DTYPES for n in (1, 255, 257, 4097, 100_003)]
    twins = [on_cpu(p, slots) for p, slots in tensors]
    for step in range(1, 4):
        jobs, cpu_jobs = [], []
        for i, ((p, slots), (p_ref, slots_ref)) in enumerate(zip(tensors, twins)):
            g = gradient(p.numel(), p.dtype, step + i)
            hp = hyper(rule, step)._replace(gnorm_scale=0.37 if (i + step) % 2 else 1.0)
            jobs.append(Job(rule, p, g.to(CUDA), slots, hp))
            cpu_jobs.append(Job(rule, p_ref, g, slots_ref, hp))
        results = triton_backend.update_many(jobs)
        assert sorted(launches[-len(PARAM_DTYPES):]) == [5] * len(PARAM_DTYPES)
        for job, cpu_job, result in zip(jobs, cpu_jobs, results):
            assert int(result.skipped_blocks) == reference.update(*cpu_job).skipped_blocks
            assert_same_state(*on_cpu(job.p, job.slots), cpu_job.p, cpu_job.slots, f"{job.p.dtype} of {job.p.numel()}:")


@pytest.mark.parametrize("name", ["AdamW4bit", "PagedAdamW4bit"])
def test_optimizer_on_gpu_matches_the_reference_on_cpu(triton_backend, monkeypatch, name):
    """The optimizer's steps on the GPU (its 4-bit states in one byte per element, 32-bit ones
    for the small bias) and on a CPU copy in the reference backend, given the same gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    params = [torch.nn.Parameter(p.detach().to(CUDA)) for p in model.parameters()]
    params_ref = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt = getattr(qoptim.optim, name)(params, lr=1e-3, weight_decay=0.01)
    opt_ref = getattr(qoptim.optim, name)(params_ref, lr=1e-3, weight_decay=0.01)
    for _ in range(10):
        for p, p_ref in zip(params, params_ref):
            p_ref.grad = torch.randn(p.shape) * 0.01
            p.grad = p_ref.grad.to(CUDA)
        monkeypatch.setenv("QOPTIM_BACKEND", "auto")
        opt.step()
        monkeypatch.setenv("QOPTIM_BACKEND", "reference")
        opt_ref.step()
    weight = opt.state[params[0]]
    assert weight["state1"].dtype == torch.uint8 and weight["qmap1"].numel() == 16 and "state2" not in weight
    for p, p_ref in zip(params, params_ref):
        assert_same(p.detach().cpu(), p_ref.detach(), "parameter")
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert_same(value.cpu(), opt_ref.state[p_ref][key], key)
