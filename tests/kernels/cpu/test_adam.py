"""The fused CPU kernel (qoptim.kernels.cpu) on Adam against the reference backend, its oracle,
bit for bit: same codes, same scales, same fp32 states, same parameter bits. The reference's
square root is correctly rounded itself (``reference.sqrt``: through float64 on the CPU, where
torch's float32 ``sqrt`` can be one ulp off), as the kernel's is, so it runs here as it is.
"""

import numba
import pytest
import torch
from support.cpu_states import LAYOUTS, assert_same, copy_state, gradient, make_state, torch_threads
from support.cpu_states import adam_hyper as hyper

from qoptim import kernels
from qoptim.kernels import StateSlot, cpu, reference
from qoptim.kernels.cpu import launch
from qoptim.kernels.cpu.tables import tables_for
from qoptim.quant.maps import signed_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 255, 256, 257, 4097, 65537]
STEPS = 20


@pytest.fixture(autouse=True)
def _parallel_from_4096(monkeypatch):
    """Sizes 4097 and 65537 take the parallel drivers, the smaller ones run as one task on the calling thread."""
    monkeypatch.setattr(launch, "PARALLEL_MIN", 4096)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The oracle's and the checks' many small torch ops only lose time to thread hand-offs
    (a lot of it on a busy machine); the kernel gets its threads back in ``run_both``."""
    with torch_threads(1):
        yield


def run_both(n, dtype, layout, decoupled, skip, code=None):
    """STEPS steps of the reference and the kernel from the same start; yields after each step."""
    p_ref, slots_ref = make_state(n, dtype, layout, code=code)
    p, slots = copy_state(p_ref, slots_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        g = gradient(n, dtype, step, gen, nonfinite=True)
        hp = hyper(step, decoupled)
        expected = reference.update("adam", p_ref, g, slots_ref, hp, skip)
        with torch_threads(2):  # two tasks where the size allows, whatever the machine
            got = cpu.update("adam", p, g, slots, hp, skip)
        yield step, (p_ref, slots_ref, expected), (p, slots, got)


# Every dtype and layout on the best path; the other paths differ only in how 8-bit states are
# looked up and quantized (from fp32 buffers, whatever the parameter dtype), so one dtype
# covers each and keeps the compilations of a cold cache within the CI budget.
KERNEL_CASES = [(dtype, layout, "avx512") for dtype in DTYPES for layout in LAYOUTS]
KERNEL_CASES += [(torch.float32, layout, path) for path in ("avx2", "portable") for layout in ("block", "whole")]


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
@pytest.mark.parametrize("dtype,layout,path", KERNEL_CASES, ids=[f"{str(d)[6:]}-{lay}-{p}" for d, lay, p in KERNEL_CASES], indirect=["path"])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_is_bit_identical_to_the_reference(n, dtype, layout, decoupled, skip, path):
    """Every step: same skipped-block count, parameter bits, codes, scales and fp32 states
    (NaN where the reference has NaN, in propagate mode)."""
    assert cpu.supports("adam", torch.zeros(n, dtype=dtype), make_state(n, dtype, layout)[1])
    for step, (p_ref, slots_ref, expected), (p, slots, got) in run_both(n, dtype, layout, decoupled, skip):
        assert got == expected, f"step {step}"
        assert_same(p, p_ref)
        for ours, theirs in zip(slots, slots_ref):
            assert_same(ours.values, theirs.values)  # codes, or fp32 states
            if ours.quantized:
                assert_same(ours.absmax, theirs.absmax)


@pytest.mark.parametrize("code", ["linear", "crowded"])
def test_a_checkpoints_own_map_is_used(code, path):
    """A map other than the standard ones, including one with several midpoints per table
    bucket (so the quantizer needs more than one fix-up comparison)."""
    if code == "linear":  # a midpoint at exactly 0: the single-read vector quantizer cannot take it
        qmap = torch.linspace(-1, 1, 256)
        assert tables_for(qmap).packed.size == 0 and tables_for(signed_map()).packed.size > 0
    else:  # 56 codes crowded into [0.5, 0.5005]: a single top-16-bit bucket holds many midpoints
        qmap = torch.cat([torch.linspace(-1, 1, 200), 0.5 + torch.linspace(1e-5, 5e-4, 56)]).sort().values
        assert tables_for(qmap).fixups > 2
    for step, (p_ref, slots_ref, _), (p, slots, _) in run_both(4097, torch.float32, "block", True, True, code=qmap):
        assert_same(p, p_ref)
        for ours, theirs in zip(slots, slots_ref):
            assert torch.equal(ours.values, theirs.values), f"step {step}"


@pytest.mark.parametrize("name", ["AdamW8bit", "Adam8bit", "AdamW"])
@pytest.mark.parametrize("block_wise", [True, False])
def test_optimizer_on_the_kernel_matches_the_forced_reference(name, block_wise, monkeypatch):
    """The optimizer end to end: with QOPTIM_BACKEND unset CPU parameters go through the
    kernel, with QOPTIM_BACKEND=reference through the reference; 20 steps agree bit for bit
    (a 8-bit parameter, one below min_8bit_size with fp32 states, and a bf16 one)."""
    import qoptim

    monkeypatch.delenv("QOPTIM_BACKEND", raising=False)
    assert kernels.backend_for(torch.device("cpu")) is cpu
    gen = torch.Generator().manual_seed(0)
    shapes = [((64, 81), torch.float32), ((17, 33), torch.float32), ((40, 300), torch.bfloat16)]
    start = [(torch.randn(s, generator=gen) * 0.1).to(d) for s, d in shapes]
    grads = [[(torch.randn(s, generator=gen) * 0.01).to(d) for s, d in shapes] for _ in range(STEPS)]
    results = {}
    for backend in ("auto", "reference"):
        monkeypatch.setenv("QOPTIM_BACKEND", backend)
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = getattr(qoptim.optim, name)(params, lr=1e-3, weight_decay=0.1, block_wise=block_wise, percentile_clipping=90)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        results[backend] = (params, opt.state_dict())
    (params, sd), (params_ref, sd_ref) = results["auto"], results["reference"]
    for p, q in zip(params, params_ref):
        assert_same(p.detach(), q.detach())
    for k, state in sd["state"].items():
        inner, inner_ref = state.get("__bnb_optimizer_quant_state__", {}), sd_ref["state"][k].get("__bnb_optimizer_quant_state__", {})
        for key, value in inner.items():
            assert_same(value, inner_ref[key])


def test_unsupported_cases_fall_back_to_the_reference():
    p, slots = make_state(300, torch.float32, "block")
    assert cpu.supports("adam", p, slots)
    assert not cpu.supports("lion", p, slots)
    assert not cpu.supports("adam", p, slots[:1])
    assert not cpu.supports("adam", p.view(10, 30), slots)
    assert not cpu.supports("adam", p[:0], [StateSlot(torch.zeros(0))] * 2)
    mixed = [slots[0], StateSlot(torch.zeros(300))]
    assert not cpu.supports("adam", p, mixed)
    wrong_block = [StateSlot(s.values, s.code, torch.zeros(3), 128) for s in slots]
    assert not cpu.supports("adam", p, wrong_block)
    unsorted = [StateSlot(s.values, s.code.flip(0), s.absmax, s.blocksize) for s in slots]
    assert not cpu.supports("adam", p, unsorted)
    # still correct through update(): it hands such cases to the reference
    g = torch.randn(300)
    p2, mixed2 = p.clone(), [StateSlot(slots[0].values.clone(), slots[0].code, slots[0].absmax.clone()), StateSlot(torch.zeros(300))]
    result = cpu.update("adam", p2, g, mixed2, hyper(1, True), True)
    assert result.skipped_blocks == 0 and not torch.equal(p2, p)


def test_a_step_splits_into_tasks_by_torchs_thread_count(monkeypatch):
    """A large tensor is split into TASKS_PER_THREAD tasks per thread of torch's, which the
    calling thread and worker threads share; with one thread, or a small tensor, one task
    runs on the calling thread alone. Whatever the split, the result is the same."""
    seen = []
    plain = launch.run
    monkeypatch.setattr(launch, "run", lambda task, ntasks, *rest: seen.append(ntasks) or plain(task, ntasks, *rest))
    two = min(2, numba.config.NUMBA_NUM_THREADS)
    results = []
    for n, threads, expected in [(1 << 16, 1, 1), (1 << 16, 2, 1 if two == 1 else two * launch.TASKS_PER_THREAD), (1000, 2, 1)]:
        p, slots = make_state(n, torch.float32, "block")
        seen.clear()
        with torch_threads(threads):
            cpu.update("adam", p, torch.ones(n), slots, hyper(1, True), True)
        assert seen == [expected]
        results.append(p)
    assert torch.equal(results[0], results[1])