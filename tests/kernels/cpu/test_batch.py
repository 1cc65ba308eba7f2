"""Small tensors batched into one CPU kernel call (kernels.cpu.batch) against the one-at-a-time
path: the same task functions run on the same memory, so results must be identical bit for bit,
whatever mix of rules, dtypes, layouts, sizes, steps and gradient scales a step brings."""

import numpy as np
import pytest
import torch

import qoptim as bnb
from qoptim import kernels
from qoptim.kernels import BLOCK, WHOLE_TENSOR, Hyper, Job, StateSlot, cpu
from qoptim.kernels.cpu import batch, launch, paths
from qoptim.kernels.rules import RULES
from qoptim.quant.maps import signed_map, unsigned_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 255, 256, 257, 4097, 3000, 65537, 700]

# each rule of kernels.rules.RULES with its options switched on
OPTIONS = {
    "adam": dict(beta1=0.9, beta2=0.999, decoupled=True, weight_decay=0.1),
    "ademamix": dict(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, decoupled=True, weight_decay=0.01),
    "lion": dict(beta1=0.9, beta2=0.99, decoupled=True, weight_decay=0.1),
    "momentum": dict(beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, weight_decay=1e-4),
    "lars": dict(beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, weight_decay=1e-4, trust_coefficient=0.02),
    "rmsprop": dict(beta1=0.0, beta2=0.0, smoothing=0.99, weight_decay=1e-4),
    "adagrad": dict(beta1=0.0, beta2=0.0, lr_decay=0.01),
    "lamb": dict(beta1=0.9, beta2=0.999, decoupled=True, weight_decay=0.01, max_unorm=1.0),
}
assert set(OPTIONS) == set(RULES)


@pytest.fixture(params=["vector", "portable"])
def path(request):
    """The best vector path of this CPU, or the portable one."""
    vector = paths.AVX512 if paths.HAS_AVX512 else paths.AVX2
    with paths.force(vector if request.param == "vector" else paths.PORTABLE):
        yield


def make_job(rule, n, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    signed = RULES[rule].signed
    if layout == "fp32":
        slots = [StateSlot(torch.zeros(n)) for _ in signed]
    else:
        blocksize, scales = (BLOCK, -(-n // BLOCK)) if layout == "block" else (WHOLE_TENSOR, 1)
        slots = [StateSlot(torch.zeros(n, dtype=torch.uint8), signed_map() if s else unsigned_map(), torch.zeros(scales), blocksize) for s in signed]
    return rule, p, slots, gen


def copies(jobs):
    return [(rule, p.clone(), [StateSlot(s.values.clone(), s.code, None if s.absmax is None else s.absmax.clone(), s.blocksize) for s in slots], gen)
            for rule, p, slots, gen in jobs]  # fmt: skip


def step_jobs(jobs, step, grads):
    """This step's Jobs: every third tensor one step ahead (its own bias corrections, so its
    own batch), a gradient scale on some tensors (per tensor within a batch)."""
    out = []
    for k, ((rule, p, slots, _), g) in enumerate(zip(jobs, grads)):
        hp = Hyper(lr=1e-3, eps=1e-8, step=step + 1 + (k % 3 == 0), gnorm_scale=0.5 if k % 4 == 1 else 1.0, **{"weight_decay": 0.0, "decoupled": False, **OPTIONS[rule]})
        out.append(Job(rule, p, g, slots, hp, True))
    return out


def gradients(jobs, step):
    grads = []
    for k, (_, p, _, gen) in enumerate(jobs):
        g = torch.randn(p.numel(), generator=gen) * 0.01
        if (k + step) % 5 == 0 and p.numel():
            g[(step * 7919) % p.numel()] = float("nan")  # a skipped block
        grads.append(g.to(p.dtype))
    return grads


def assert_same(batched, single):
    for (_, p, slots, _), (_, q, twins, _) in zip(batched, single):
        assert torch.equal(p.view(torch.int16) if p.dtype != torch.float32 else p.view(torch.int32),
                           q.view(torch.int16) if q.dtype != torch.float32 else q.view(torch.int32))  # fmt: skip
        for s, t in zip(slots, twins):
            assert torch.equal(s.values, t.values)
            if s.absmax is not None:
                assert torch.equal(s.absmax, t.absmax)


def run_both(jobs, steps=6):
    single = copies(jobs)
    for step in range(steps):
        grads = gradients(jobs, step)
        batched_results = cpu.update_many(step_jobs(jobs, step, grads))
        single_results = [cpu.update(*job) for job in step_jobs(single, step, grads)]
        assert [r.skipped_blocks for r in batched_results] == [r.skipped_blocks for r in single_results]
    assert_same(jobs, single)
    return single


# every rule in fp32, every dtype with Adam (the dtype is handled apart from the rule; each
# combination is a kernel to compile, which CI pays for with a cold cache)
CASES = [(rule, torch.float32) for rule in sorted(RULES)] + [("adam", torch.float16), ("adam", torch.bfloat16)]


@pytest.mark.parametrize("layout", ["block", "fp32"])
@pytest.mark.parametrize("rule,dtype", CASES)
def test_a_batch_equals_one_call_per_tensor(rule, layout, dtype, path):
    jobs = [make_job(rule, n, dtype, layout, seed) for seed, n in enumerate(SIZES)]
    run_both(jobs)


def test_a_mixed_step_batches_what_it_can_and_the_rest_goes_one_by_one(path):
    """Rules, dtypes and layouts mixed in one step, one-scale (whole-tensor) states and LAMB
    among them, which take the one-at-a-time path."""
    jobs = []
    for seed, (rule, dtype, layout) in enumerate(
        [("adam", torch.float32, "block"), ("lion", torch.bfloat16, "block"), ("adam", torch.float32, "whole"),
         ("adam", torch.float16, "fp32"), ("lamb", torch.float32, "block"), ("adam", torch.float32, "block"),
         ("lion", torch.bfloat16, "block"), ("adam", torch.float16, "fp32"), ("momentum", torch.float32, "whole")]  # fmt: skip
    ):
        jobs.append(make_job(rule, SIZES[seed % len(SIZES)], dtype, layout, seed))
    run_both(jobs)


def test_a_batch_large_enough_runs_on_all_threads(path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        jobs = [make_job("adam", 20_000 + 37 * k, torch.float32, "block", k) for k in range(30)]  # 600K elements
        assert sum(p.numel() for _, p, _, _ in jobs) >= launch.PARALLEL_MIN
        launched = []
        run = launch.run
        monkeypatch.setattr(launch, "run", lambda task, ntasks, *rest: launched.append((task, ntasks)) or run(task, ntasks, *rest))
        run_both(jobs, steps=3)
        batched = [ntasks for task, ntasks in launched if task is batch.eight_bit_batch_task]
        assert batched and max(batched) == 2 * launch.TASKS_PER_THREAD  # (a batch below PARALLEL_MIN runs as one task)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["block", "fp32"])
def test_tensors_cut_into_parts_across_tasks_give_the_one_call_result(layout, path, monkeypatch):
    """Tensors of many parts (``PART`` lowered to 16 blocks) shared out over the tasks of two
    threads, parts of one tensor on both, NaN gradients in some blocks: the same bits and the
    same skipped-block counts, summed over a tensor's parts."""
    monkeypatch.setattr(batch, "PART", 16 * BLOCK)
    monkeypatch.setattr(batch, "BATCH_LIMIT", 1 << 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sizes = [300_000, 16 * BLOCK, 16 * BLOCK + 1, 5, 70_001]
        jobs = [make_job("adam", n, torch.float32, layout, seed) for seed, n in enumerate(sizes)]
        assert len(batch.parts(np.array(sizes))) == 74 + 1 + 2 + 1 + 18
        launched = []
        run = launch.run
        monkeypatch.setattr(launch, "run", lambda task, ntasks, *rest: launched.append((task, ntasks)) or run(task, ntasks, *rest))
        run_both(jobs, steps=4)
        batch_tasks = (batch.eight_bit_batch_task, batch.fp32_batch_task)
        # the batch of the 300,000-element tensor (its key-mates: every third job is a step ahead) on both threads
        assert max(ntasks for task, ntasks in launched if task in batch_tasks) == 2 * launch.TASKS_PER_THREAD
    finally:
        torch.set_num_threads(threads)


def test_parts_cover_each_tensor_once():
    sizes = np.array([1, BLOCK, 5 * batch.PART + 3, batch.PART], dtype=np.int64)
    parts = batch.parts(sizes)
    for i, n in enumerate(sizes):
        mine = parts[parts[:, 0] == i]
        count = -(-n // batch.PART)
        assert list(mine[:, 1]) == list(range(count)) and set(mine[:, 2]) == {count}
        assert mine[:, 3].sum() >= n and (mine[:, 3] <= batch.PART).all()


def test_empty_tensors_are_left_to_the_one_at_a_time_path():
    """A rank's shard of a small parameter can be empty (FSDP2): nothing to launch for it."""
    jobs = [make_job("adam", n, torch.float32, "block", seed) for seed, n in enumerate([0, 0, 300, 0])]
    run_both(jobs, steps=2)


def test_task_bounds_split_parts_evenly():
    sizes = np.array([10, 10, 10, 10, 100, 1, 1, 1], dtype=np.int64)
    for ntasks in (1, 2, 3, 8):
        bounds = batch.task_bounds(sizes, ntasks)
        assert len(bounds) == ntasks + 1 and bounds[0] == 0 and bounds[-1] == len(sizes)
        assert (np.diff(bounds) >= 0).all()


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_the_optimizer_batches_and_gets_the_one_at_a_time_result():
    """A model of many small tensors: AdamW8bit (batched) against PagedAdamW8bit, which on a
    CPU is the same optimizer taking the one-at-a-time path."""
    shapes = [(64, 64), (64,), (3, 700), (1,), (5000,), (257,)] * 4
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    batched = bnb.optim.AdamW8bit(params, min_8bit_size=256, percentile_clipping=90)
    single = bnb.optim.PagedAdamW8bit(twins, min_8bit_size=256, percentile_clipping=90)
    calls = []
    many = kernels.update_many
    for step in range(8):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p) * 0.01
            q.grad = p.grad.clone()
        kernels.update_many = lambda jobs: calls.append(len(jobs)) or many(jobs)
        try:
            batched.step()
        finally:
            kernels.update_many = many
        single.step()
    assert calls == [len(params)] * 8
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in batched.state[p].items():
            other = single.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
