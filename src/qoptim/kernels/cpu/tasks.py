"""The fused CPU backend: one Numba kernel pass over memory per optimizer step.

Each thread takes a contiguous run of 256-blocks. Per block it dequantizes both states
(``code[q] * absmax``), applies the Adam math in float32 in exactly the reference's order of
operations, writes the parameter back, takes the block's new absmax and requantizes with the
table quantizer of ``cpu_tables`` (exactly the reference's rounding). The only temporaries are
a 256-float buffer per state on each thread's stack, so a step reads and writes each byte of
parameter, gradient and state once. LAMB and LARS take one more pass first, for the norms of
their layer-wise trust ratio.

Agreement with ``reference.update`` is bit for bit: no fast-math (it would let LLVM contract
``a*b + c`` into an FMA or reorder sums), float32 constants rounded from the same Python doubles
torch uses, and the same float32 reciprocal for the quantizer scale. Parameters in bf16/fp16 are
read and written through 16-bit integer views (numpy has no bf16), rounding to nearest-even.

Three paths, chosen per call (``VECTORIZE``, ``_VECTOR``), for the table lookups of
dequantizing and quantizing, which LLVM's own vectorizer leaves scalar: on CPUs with AVX-512
VBMI, lookups in tables held in registers, 64 and 16 lanes at a time (``cpu_avx512``); on
CPUs with AVX2, ``llvm.masked.gather`` intrinsics, 8 lanes at a time; elsewhere, or with
``QOPTIM_CPU_PORTABLE=1``, plain scalar loops. The rules' math is auto-vectorized on all of
them. Where the time goes on the first (one thread, Zen 5, per element of an Adam step,
~0.50 ns in all with the data in cache, ~0.58 ns streaming from memory): quantizing the two
states ~0.21 ns (a guess from a table of bins, then one exact comparison: cpu_guess), the
update's math ~0.16 ns, dequantizing ~0.08 ns, the gradient's finiteness test ~0.02 ns; the
AVX2 path takes ~1.3 ns, the portable one ~2.3 ns. The quantizer and the lookups are inlined
into the task: as calls, their argument copies and table spills cost about as much as a
block's work. A task asks for the memory of the block ``AHEAD`` blocks on while it works.

Kernels are compiled lazily per parameter dtype, state layout and path (~3.9 s for the
first), and cached on disk (``cache=True``): a fresh process with a warm cache pays ~0.4 s on
its first step.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from . import cpu_avx512, reference
from .cpu_tables import NAN_INDEX, tables_for
from .rules import RULES
from .types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult

__all__ = ["update", "update_many", "grad_norm_sq", "supports"]

# Parallel steps run their tasks on Python threads of our own (``_launch``): the kernels
# release the GIL, and the threads sleep between steps (Numba's OpenMP threads spin-wait
# between parallel regions, which starved torch's own pool: training ran up to ~100x slower).
# A Numba parallel driver would also compile each kernel a second time, inlined into its
# gufunc: ~2 s more per kernel on a cold cache.
_workers: ThreadPoolExecutor | None = None
_workers_key = (0, 0)  # (process id, threads) of _workers
_workers_lock = threading.Lock()

LANES = 8


class VectorPath(NamedTuple):
    """Marker argument: compile the kernels with the gather intrinsics (AVX2)."""

    lanes: int


class PermutePath(NamedTuple):
    """Marker argument: compile the kernels with the register-permute lookups (AVX-512 VBMI, cpu_avx512)."""

    lanes: int


class PortablePath(NamedTuple):
    """Marker argument: compile the kernels from plain scalar loops only."""

    lanes: int


# The path is told apart by the marker's type, so each path is its own compiled (and cached)
# specialization and the portable one never contains an intrinsic: if a vectorized one fails
# to compile (another numba/llvmlite), the next one down still works.
_AVX512, _AVX2, _PORTABLE = PermutePath(16), VectorPath(LANES), PortablePath(1)

# The vectorized paths, best first, each taken where the CPU has what it needs: the permutes
# of AVX-512 VBMI, or the hardware gathers of AVX2 (elsewhere LLVM would emulate them, and the
# portable scalar loops run instead). QOPTIM_CPU_PORTABLE=1 (at import) forces the portable
# path. A vectorized kernel that fails to compile hands over to the next path down for good.
# Both flags are read on every call.
_FEATURES = llvm_binding.get_host_cpu_features()
HAS_AVX512 = all(_FEATURES.get(f) for f in cpu_avx512.FEATURES)
_VECTOR = _AVX512 if HAS_AVX512 else _AVX2
VECTORIZE = bool(_FEATURES.get("avx2")) and os.environ.get("QOPTIM_CPU_PORTABLE", "") in ("", "0")

# Below this many elements (~0.2 ms of work for one thread) a step runs on the calling thread
# only: a hand-off to another thread costs tens of microseconds, and with busy cores it can
# stall for a scheduler tick (~8 ms measured under load with Numba's OpenMP layer).
PARALLEL_MIN = 1 << 18

# How the kernels see a parameter's memory: bf16 and fp16 both as 16-bit integers, told apart by signedness.
_VIEWS = {torch.float32: (torch.float32, np.float32), torch.bfloat16: (torch.int16, np.int16), torch.float16: (torch.int16, np.uint16)}

# weight decay modes of the kernels
_NO_DECAY, _L2, _DECOUPLED = 0, 1, 2

# error_model="numpy": float division by zero gives inf/NaN as in torch instead of raising
_JIT = dict(cache=True, error_model="numpy")
# The kernels themselves run without Numba's reference counting: they allocate nothing (their
# scratch is on the stack) and only borrow the arrays their caller holds. With it, every slice
# and every array passed down cost a call to NRT_incref / NRT_decref (an atomic add), some
# hundreds per 256-block: once more than all the arithmetic of a step. They release the GIL
# (``_launch`` runs them on several threads).
_KERNEL = dict(_nrt=False, nogil=True, **_JIT)
# The helpers of the block loops are inlined into them: a call passes every array of every
# state (tables included) field by field, some hundred words per call and block. (Costs
# ~1 s of compiling per kernel; saves ~25% of a step.)
_INLINE = dict(forceinline=True, **_KERNEL)

_TWO_POW_112 = np.float32(2.0**112)  # rebias of an fp16 exponent (15) to a float32 one (127)
_INF_BITS = np.uint32(0x7F800000)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


# ---- the update rules ---------------------------------------------------------------------
#
# A rule is a per-element function of float32 scalars, ``(p, g, s0, s1, s2, c) -> (p, s0, s1, s2)``
# (``g`` already scaled by gnorm_scale; states past the rule's count are ignored and returned
# as they came), the host-side function that turns a Hyper into its constants ``c``, and a
# marker type. The drivers take the marker as an argument, so each rule is its own compiled
# (and cached) specialization of the same drivers; ``_math`` picks the function by its type.


class AdamRule(NamedTuple):
    """Marker argument of each rule's specialization (one NamedTuple class per rule)."""

    states: int


class AdEMAMixRule(NamedTuple):
    states: int


class LionRule(NamedTuple):
    states: int


class MomentumRule(NamedTuple):
    states: int


class RMSpropRule(NamedTuple):
    states: int


class AdagradRule(NamedTuple):
    states: int


class LAMBRule(NamedTuple):
    states: int


class _Family(NamedTuple):
    marker: NamedTuple  # an instance of the rule's marker class
    constants: object  # Hyper -> tuple of float32 constants and int flags


# ---- the seam -----------------------------------------------------------------------


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """A rule of ``_FAMILIES`` with all its states fp32, all 8-bit in 256-blocks, or all 8-bit
    with one scale, on a flat contiguous CPU parameter; anything else goes to the reference."""
    layout = _supported_layout(rule, p, slots)
    # the registry asks, then calls update() with these very objects: it reuses the answer
    _last_check.answer = (rule, p, slots, layout)
    return layout is not None


def _supported_layout(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> str | None:
    family = _FAMILIES.get(rule)
    if family is None or len(slots) != family.marker.states or not p.is_cpu or p.dtype not in _VIEWS:
        return None
    if p.dim() != 1 or not p.is_contiguous() or p.numel() == 0:
        return None
    return _layout(p.numel(), slots)


# The last answer of supports() on each thread, (rule, p, slots, layout), taken by update().
_last_check = threading.local()


def update(rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True) -> UpdateResult:
    """One step of ``rule`` on ``p`` in place (same result as ``reference.update``)."""
    last = getattr(_last_check, "answer", None)
    _last_check.answer = None
    if last is not None and last[0] == rule and last[1] is p and last[2] is slots:
        layout = last[3]
    else:
        layout = _supported_layout(rule, p, slots)
    if layout is None or not _flat_cpu(g, p.dtype, p.numel()):
        return reference.update(rule, p, g, slots, hp, skip_nonfinite)
    return UpdateResult(skipped_blocks=_update(rule, layout, p, g, slots, hp, skip_nonfinite, _tasks_for(p.numel())))


def _update(rule: str, layout: str, p, g, slots, hp, skip_nonfinite, ntasks) -> int:
    family = _FAMILIES[rule]
    if rule in reference.TRUST_RATIOS:  # the layer-wise ratio first: a pass of its own
        hp = hp._replace(trust_ratio=_trust_ratio(rule, family, layout, p, g, slots, hp, skip_nonfinite, ntasks))
    return _step(family, layout, p, g, slots, hp, skip_nonfinite, ntasks)


# Tasks per thread of a parallel step: threads take the next task as they finish one, so a
# thread slowed down (by another process on its core) holds up the step by one task at most.
TASKS_PER_THREAD = 4


def _threads() -> int:
    """Threads for a step: torch's thread count, at most one per core the process may use."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _tasks_for(n: int) -> int:
    """How many tasks a step of ``n`` elements is split into: ``TASKS_PER_THREAD`` per
    thread, one for small tensors (``PARALLEL_MIN``) or one thread."""
    threads = _threads()
    if n < PARALLEL_MIN or threads == 1:
        return 1
    return min(threads * TASKS_PER_THREAD, -(-n // BLOCK))


def _launch(task, ntasks: int, results: np.ndarray, args: tuple) -> None:
    """results[t] = task(t, ntasks, *args) for each task, on the calling thread and worker
    threads (``_threads``), each taking the next task when done with one. Returns when all
    are done, re-raising the first error."""
    if ntasks == 1:
        results[0] = task(0, 1, *args)
        return
    pending = queue.SimpleQueue()
    for t in range(ntasks):
        pending.put(t)

    def work():
        while True:
            try:
                t = pending.get_nowait()
            except queue.Empty:
                return
            results[t] = task(t, ntasks, *args)

    helpers = min(_threads(), ntasks) - 1
    futures = []
    try:
        for _ in range(helpers):
            futures.append(_worker_pool(helpers).submit(work))
    except RuntimeError:  # no new threads at interpreter shutdown: fewer threads do it all
        pass
    error = None
    try:
        work()
    except BaseException as e:  # (Ctrl-C too) stop handing out tasks, and wait for the others: they may still be writing
        error = e
        while not pending.empty():
            pending.get_nowait()
    for future in futures:
        try:
            future.result()
        except Exception as e:
            error = error or e
    if error is not None:
        raise error


def _worker_pool(size: int) -> ThreadPoolExecutor:
    """The worker threads, at least ``size`` of them (a new pool after a fork: the threads
    stay behind in the parent)."""
    global _workers, _workers_key
    with _workers_lock:
        pid, threads = _workers_key
        if _workers is None or pid != os.getpid() or threads < size:
            threads = max(size, numba.config.NUMBA_NUM_THREADS - 1)
            _workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qoptim-cpu")
            _workers_key = (os.getpid(), threads)
        return _workers


def _step(family: _Family, layout: str, p, g, slots, hp, skip_nonfinite, ntasks) -> int:
    skipped = np.zeros(ntasks, dtype=np.int64)
    head = (family.marker, _as_numpy(p), _as_numpy(g))
    constants = (np.float32(hp.gnorm_scale), family.constants(hp))
    if layout == "fp32":
        states = _padded(tuple(s.values.detach().numpy() for s in slots))
        _launch(_fp32_task, ntasks, skipped, (*head, *states, *constants, skip_nonfinite))
        return int(skipped.sum())
    states = _padded(tuple(_quantized(s) for s in slots))
    whole = layout == "whole"
    peaks = _on_best_path(lambda path: _run_8bit(head, states, constants, skip_nonfinite, whole, ntasks, skipped, path))
    if whole:
        for slot, peak in zip(slots, peaks):  # the rule's states only
            slot.absmax.fill_(float(peak))
    return int(skipped.sum())


def _padded(states: tuple) -> tuple:
    """A rule's states, padded to _MAX_STATES with stand-ins (the first state again) that the
    kernels never touch: the drivers take three states whatever the rule (Numba's parallel
    drivers cannot take a tuple of them), and the rule tells how many are real."""
    return states + states[:1] * (_MAX_STATES - len(states))


def _run_8bit(head, states, constants, skip_nonfinite, whole, ntasks, skipped, path):
    """The 8-bit kernels; returns the new one-per-tensor scales (``whole``) or None. One
    driver does both passes of a one-scale step, told apart by ``measure``."""
    peaks = np.zeros((ntasks, _MAX_STATES), dtype=np.float32)
    inverse = (_ZERO,) * _MAX_STATES
    new_scales = None
    if whole:  # one scale per tensor: a first pass finds the new scales, as in the reference
        _launch(_8bit_task, ntasks, skipped, (*head, *states, *constants, skip_nonfinite, True, True, inverse, path, peaks))
        new_scales = [np.float32(np.nan) if np.isnan(col).any() else col.max() for col in peaks.T[: head[0].states]]
        inverse = tuple(_inverse(x) for x in new_scales) + (_ZERO,) * (_MAX_STATES - len(new_scales))
    _launch(_8bit_task, ntasks, skipped, (*head, *states, *constants, skip_nonfinite, whole, False, inverse, path, peaks))
    return new_scales


def _on_best_path(run):
    """``run(path)`` on the best path that compiles (a kernel that fails to compile has
    written nothing)."""
    while True:
        path = _VECTOR if VECTORIZE else _PORTABLE
        try:
            return run(path)
        except (numba.core.errors.NumbaError, RuntimeError) as e:
            if path is _PORTABLE:
                raise
            _give_up_vectorizing(e)


def _trust_ratio(rule: str, family: _Family, layout: str, p, g, slots, hp, skip_nonfinite, ntasks) -> float:
    """reference._trust_ratio from one fused pass over the blocks (``_trust_task``): each
    block's float64 sums of squares, added up by numpy (pairwise) in an order that does not
    depend on the thread count. torch sums in another order in the reference: the norms
    differ by ~1e-16 relative."""
    sums = np.zeros((-(-p.numel() // BLOCK), 2))
    states = _padded(tuple(s.values.detach().numpy() if layout == "fp32" else _quantized(s) for s in slots))
    args = (family.marker, _as_numpy(p), _as_numpy(g), *states, np.float32(hp.gnorm_scale), family.constants(hp), skip_nonfinite)
    _on_best_path(lambda path: _launch(_trust_task, ntasks, np.zeros(ntasks, np.int64), (*args, path, sums)))
    norms = np.sqrt(sums.sum(axis=0))
    return reference.TRUST_RATIOS[rule][1](float(norms[0]), float(norms[1]), hp)


def _give_up_vectorizing(error: Exception) -> None:
    """After a vectorized kernel failed to compile: the AVX-512 path hands over to the AVX2
    one, the AVX2 one to the portable one."""
    global VECTORIZE, _VECTOR
    if _VECTOR is _AVX512:
        _VECTOR, failed, instead = _AVX2, "AVX-512", "the AVX2 one"
    else:
        VECTORIZE, failed, instead = False, "AVX2", "the portable one"
    warnings.warn(
        f"qoptim: the {failed} CPU kernel failed to compile ({type(error).__name__}: {str(error)[:200]}); using {instead}",
        RuntimeWarning,
        stacklevel=4,
    )


def grad_norm_sq(g: torch.Tensor) -> float:
    """The reference's sum of squares (chunked BLAS dot, already memory-bound), so that
    percentile clipping decides exactly as it does on the reference backend."""
    return reference.grad_norm_sq(g)


# ---- host-side preparation ------------------------------------------------------------


def _layout(n: int, slots: list[StateSlot]) -> str | None:
    """'fp32', 'block' or 'whole' when all states share a layout the kernels cover: flat
    contiguous CPU tensors; 8-bit ones with the scales of their block size and a map of 256
    float32 codes on the CPU that has tables (``tables_for``: a sorted one)."""
    if not any(s.quantized for s in slots):
        return "fp32" if all(_flat_cpu(s.values, torch.float32, n) for s in slots) else None
    blocksize = slots[0].blocksize
    if blocksize not in (BLOCK, WHOLE_TENSOR):
        return None
    scales = -(-n // BLOCK) if blocksize == BLOCK else 1
    for s in slots:
        if not (s.quantized and s.blocksize == blocksize and _flat_cpu(s.values, torch.uint8, n) and _flat_cpu(s.absmax, torch.float32, scales)):
            return None
        code = s.code
        if code is None or not (code.is_cpu and code.dtype == torch.float32 and code.dim() == 1 and code.numel() == 256):
            return None
        if _tables_of(code) is None:  # (an unsorted map)
            return None
    return "block" if blocksize == BLOCK else "whole"


# id(code map) -> (weak reference to it, its version and address then, its tables): the
# optimizers pass the same map tensor every step, so its tables are found without reading it.
_TABLES: dict[int, tuple] = {}


def _tables_of(code: torch.Tensor):
    """``tables_for(code)``, cached by the map tensor itself (while unchanged in place)."""
    seen = _TABLES.get(id(code))
    stamp = (code._version, code.data_ptr())
    if seen is not None and seen[0]() is code and seen[1] == stamp:
        return seen[2]
    tables = tables_for(code)
    if len(_TABLES) >= 64:
        _TABLES.clear()
    _TABLES[id(code)] = (weakref.ref(code), stamp, tables)
    return tables


def _flat_cpu(t: torch.Tensor | None, dtype: torch.dtype, n: int) -> bool:
    return t is not None and t.dtype == dtype and t.numel() == n and t.is_cpu and t.is_contiguous()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float32:
        return t.detach().numpy()
    view_dtype, np_dtype = _VIEWS[t.dtype]
    return t.detach().view(view_dtype).numpy().view(np_dtype)


def _quantized(slot: StateSlot) -> tuple:
    """What the kernels need of an 8-bit state: codes, scales, and the quantizer tables."""
    t = _tables_of(slot.code)
    return (slot.values.detach().numpy(), slot.absmax.detach().view(-1).numpy(), *_kernel_tables(t))


def _kernel_tables(t) -> tuple:
    """A map's tables (cpu_tables) as the kernels take them."""
    return t.code, t.first, t.mids, t.fixups, t.packed, t.registers, t.guessed


# Each rule's constants: float32 scalars, each rounded from the Python double torch would use
# (torch casts a Python scalar operand to the float32 tensor's type), and int flags.

_f32 = np.float32


def _decay_mode(hp: Hyper) -> int:
    if not hp.weight_decay:
        return _NO_DECAY
    return _DECOUPLED if hp.decoupled else _L2


def _adam_constants(hp: Hyper) -> tuple:
    return (
        _f32(hp.weight_decay),
        _f32(hp.beta1),
        _f32(1.0 - hp.beta1),
        _f32(hp.beta2),
        _f32(1.0 - hp.beta2),
        _f32(1.0 - hp.lr * hp.weight_decay),
        _f32(math.sqrt(1.0 - hp.beta2**hp.step)),
        _f32(hp.eps),
        _f32(hp.lr / (1.0 - hp.beta1**hp.step)),
        _decay_mode(hp),
    )


def _ademamix_constants(hp: Hyper) -> tuple:
    return (
        _f32(hp.beta1),
        _f32(1.0 - hp.beta1),
        _f32(hp.beta3),
        _f32(1.0 - hp.beta3),
        _f32(hp.beta2),
        _f32(1.0 - hp.beta2),
        int(bool(hp.weight_decay)),
        _f32(1.0 - hp.lr * hp.weight_decay),
        _f32(1.0 - hp.beta1**hp.step),
        _f32(math.sqrt(1.0 - hp.beta2**hp.step)),
        _f32(hp.eps),
        _f32(hp.alpha),
        _f32(hp.lr),
    )


def _lion_constants(hp: Hyper) -> tuple:
    return (
        int(bool(hp.weight_decay)),
        _f32(1.0 - hp.lr * hp.weight_decay),
        _f32(hp.beta1),
        _f32(1.0 - hp.beta1),
        _f32(hp.beta2),
        _f32(1.0 - hp.beta2),
        _f32(hp.lr),
    )


def _momentum_constants(hp: Hyper) -> tuple:
    return (
        int(bool(hp.weight_decay)),
        _f32(hp.weight_decay),
        int(hp.trust_ratio != 1.0),
        _f32(hp.trust_ratio),
        int(hp.step == 1),
        _f32(hp.momentum),
        _f32(1.0 - hp.dampening),
        int(bool(hp.nesterov)),
        _f32(hp.lr),
    )


def _rmsprop_constants(hp: Hyper) -> tuple:
    return (int(bool(hp.weight_decay)), _f32(hp.weight_decay), _f32(hp.smoothing), _f32(1.0 - hp.smoothing), _f32(hp.eps), _f32(hp.lr))


def _adagrad_constants(hp: Hyper) -> tuple:
    lr = hp.lr / (1.0 + (hp.step - 1) * hp.lr_decay)
    return (int(bool(hp.weight_decay)), _f32(hp.weight_decay), _f32(hp.eps), _f32(lr))


def _lamb_constants(hp: Hyper) -> tuple:
    return (
        _decay_mode(hp),
        _f32(hp.weight_decay),
        _f32(hp.beta1),
        _f32(1.0 - hp.beta1),
        _f32(hp.beta2),
        _f32(1.0 - hp.beta2),
        _f32(1.0 - hp.beta1**hp.step if hp.bias_correction else 1.0),
        _f32(1.0 - hp.beta2**hp.step if hp.bias_correction else 1.0),
        _f32(hp.eps),
        _f32(hp.lr * hp.trust_ratio),
    )


def _inverse(scale: np.float32) -> np.float32:
    return np.float32(1.0) / scale if scale > 0 else np.float32(0.0)


# ---- bit-level helpers (compiled into the kernels) ----------------------------------------


@intrinsic
def _bits(typingctx, x):
    """The bit pattern of a float32, as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _magnitude(typingctx, x):
    """The bit pattern of |x| for a float32, as uint32: it orders non-negative floats as
    their values, with NaN above inf. (``_bits(x) & mask`` would be a uint64 in Numba, and
    a loop of uint64 maxima vectorizes at half the width.)"""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(builder.bitcast(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, b):
    """The float32 whose bit pattern is the low 32 bits of integer ``b``."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if b.bitwidth > 32 else builder.zext(args[0], ir.IntType(32)) if b.bitwidth < 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(b), codegen


@intrinsic
def _unowned(typingctx, a):
    """Array ``a`` (or each array in tuple ``a``) without its owner, so that no code, with
    Numba's reference counting or without, ever touches the owner's count through it. Only
    for arrays that the caller keeps alive while the result is in use."""
    if not isinstance(a, (types.Array, types.BaseTuple)):
        return None

    def unowned(context, builder, ty, value):
        if isinstance(ty, types.BaseTuple):
            for i, item in enumerate(ty.types):
                value = builder.insert_value(value, unowned(context, builder, item, builder.extract_value(value, i)), i)
            return value
        if not isinstance(ty, types.Array):
            return value
        ary = context.make_array(ty)(context, builder, value=value)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()

    def codegen(context, builder, signature, args):
        return unowned(context, builder, a, args[0])

    return a(a), codegen


@intrinsic(prefer_literal=True)
def _stack_array(typingctx, dtype, n):
    """A 1-d array of ``n`` (a literal) elements of ``dtype`` in the calling function's stack
    frame: no allocation and no owner, valid until that function returns (it must not leave it)."""
    if not isinstance(dtype, types.NumberClass) or not isinstance(n, types.IntegerLiteral):
        return None
    array = types.Array(dtype.instance_type, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(dtype.instance_type)
        with builder.goto_entry_block():
            data = builder.alloca(ir.ArrayType(element, n.literal_value))
            data.align = 64
        intp = context.get_value_type(types.intp)
        ary = context.make_array(array)(context, builder)
        size = context.get_abi_sizeof(element)
        populate_array(ary, data=builder.bitcast(data, element.as_pointer()), shape=[ir.Constant(intp, n.literal_value)],
                       strides=[ir.Constant(intp, size)], itemsize=ir.Constant(intp, size), meminfo=None)  # fmt: skip
        return ary._getvalue()

    return array(dtype, n), codegen


# Blocks ahead whose memory a task asks for while it works on one: the hardware prefetchers
# alone leave a step waiting on memory for ~10% of its time (16.7M elements, one thread).
AHEAD = 4


def _prefetch_block(rule, p, g, states, lo, path):
    """Ask for the parameter, gradient and 8-bit codes of the block at ``lo`` (vector paths)."""


@overload(_prefetch_block, jit_options=dict(forceinline=True))
def _prefetch_block_impl(rule, p, g, states, lo, path):
    if _path_is(path, PortablePath):
        return lambda rule, p, g, states, lo, path: None

    def ask(rule, p, g, states, lo, path):
        ns = _state_count(rule)
        _prefetch(p, lo, lo + BLOCK)
        _prefetch(g, lo, lo + BLOCK)
        _prefetch(states[0][0], lo, lo + BLOCK)
        if ns > 1:
            _prefetch(states[1][0], lo, lo + BLOCK)
        if ns > 2:
            _prefetch(states[2][0], lo, lo + BLOCK)

    return ask


@intrinsic
def _prefetch(typingctx, a, start, end):
    """Ask for the cache lines of a[start:end] (a contiguous array) ahead of their use;
    indices past the end are not touched (a prefetch of them would be harmless, but an
    address past the array is not ours to compute)."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        start, end = args[1], args[2]
        end = builder.select(builder.icmp_signed("<", end, array.nitems), end, array.nitems)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8")
        size = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        step = ir.Constant(start.type, 64 // size)
        with cgutils.for_range_slice(builder, start, end, step) as (index, _):
            address = builder.bitcast(builder.gep(array.data, [index]), ir.IntType(8).as_pointer())
            builder.call(fn, [address, ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3), ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.none(a, start, end), codegen


@njit(**_KERNEL)
def _bf16_to_f32(h):
    return _float(np.uint32((np.int64(h) & 0xFFFF) << 16))


@njit(**_KERNEL)
def _f32_to_bf16(x):
    """Round to nearest-even, NaN to torch's 0x7FC0."""
    if x != x:
        return np.int64(0x7FC0)
    b = np.int64(_bits(x))
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(**_KERNEL)
def _f16_to_f32(h):
    h = np.int64(h)
    magnitude = (h & 0x7FFF) << 13
    if (h & 0x7C00) == 0x7C00:  # inf, NaN
        x = _float(np.uint32(magnitude | 0x7F800000))
    else:  # the bits already line up; one exact multiply rebiases normals and subnormals alike
        x = _float(np.uint32(magnitude)) * _TWO_POW_112
    return _float(np.uint32(np.int64(_bits(x)) | ((h & 0x8000) << 16)))


@njit(**_KERNEL)
def _f32_to_f16(x):
    """Round to nearest-even, as torch's conversion (F16C) does."""
    b = np.int64(_bits(x))
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep it quiet, with its top payload bits
        return sign | 0x7E00 | ((a >> 13) & 0x3FF)
    if a >= 0x47800000:  # 65536 and up (and inf) overflow
        return sign | 0x7C00
    if a >= 0x38800000:  # normal fp16: rebias the exponent, round off 13 mantissa bits
        r = a - 0x38000000
        return sign | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    # subnormal fp16: adding 0.5 makes the hardware round at 2**-24, the fp16 subnormal step
    t = _float(np.uint32(a)) + _HALF
    return sign | (np.int64(_bits(t)) - 0x3F000000)


# ---- vector gathers (the vectorized path) ---------------------------------------------------


def _splat(builder, scalar, ty):
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


def _gather(builder, base, elem, index, load_as):
    """LANES values of type ``load_as`` read from ``base`` (an array of ``elem``) at ``index``
    (a vector of element offsets): one llvm.masked.gather, vpgatherdd on AVX2."""
    pointers = builder.gep(base, [index], source_etype=elem)
    pointers.type = ir.VectorType(ir.PointerType(), LANES)  # llvmlite cannot infer a vector GEP's type
    vector = ir.VectorType(load_as, LANES)
    mask = ir.VectorType(ir.IntType(1), LANES)
    kind = "f32" if isinstance(load_as, ir.FloatType) else "i32"
    fnty = ir.FunctionType(vector, [pointers.type, ir.IntType(32), mask, vector])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.gather.v{LANES}{kind}.v{LANES}p0")
    return builder.call(fn, [pointers, ir.Constant(ir.IntType(32), 1), ir.Constant(mask, [1] * LANES), ir.Constant(vector, ir.Undefined)])


def _lanes_at(builder, data, start, ty):
    return builder.bitcast(builder.gep(data, [start]), ir.VectorType(ty, LANES).as_pointer())


@intrinsic
def _quantize_lanes(typingctx, values, start, inv, first, mids, out):
    """The scalar quantizer of ``_quantize`` on LANES elements from ``start`` at once:
    u = values * inv; idx = first[bits(u) >> 16]; idx += mids[idx] < u; NaN -> NAN_INDEX.
    ``first`` (bytes) is read 4 bytes at a time and masked: cpu_tables pads it for that."""
    sig = types.void(values, start, inv, first, mids, out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]
        values, start, inv, first, mids, out = arrays
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        vf, vi = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)
        x = builder.load(_lanes_at(builder, values.data, start, f32), align=4)
        u = builder.fmul(x, _splat(builder, inv, vf))
        bucket = builder.lshr(builder.bitcast(u, vi), ir.Constant(vi, [16] * LANES))
        idx = builder.and_(_gather(builder, first.data, i8, bucket, i32), ir.Constant(vi, [0xFF] * LANES))
        below = builder.fcmp_ordered("<", _gather(builder, mids.data, f32, idx, f32), u)
        idx = builder.add(idx, builder.zext(below, vi))
        idx = builder.select(builder.fcmp_unordered("uno", u, u), ir.Constant(vi, [NAN_INDEX] * LANES), idx)
        builder.store(builder.trunc(idx, ir.VectorType(i8, LANES)), _lanes_at(builder, out.data, start, i8), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _quantize_packed_lanes(typingctx, values, start, inv, packed, out):
    """``_quantize_lanes`` with one table read (cpu_tables' ``packed``, for maps with at most
    one midpoint per bucket): idx = (e & 0xFF) + (key(u) > e >> 16), e = packed[bits(u) >> 16]."""
    sig = types.void(values, start, inv, packed, out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]
        values, start, inv, packed, out = arrays
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        vf, vi = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)

        def const(x):
            return ir.Constant(vi, [x] * LANES)

        x = builder.load(_lanes_at(builder, values.data, start, f32), align=4)
        u = builder.fmul(x, _splat(builder, inv, vf))
        bits = builder.bitcast(u, vi)
        entry = _gather(builder, packed.data, i32, builder.lshr(bits, const(16)), i32)
        key = builder.and_(builder.xor(bits, builder.ashr(bits, const(31))), const(0xFFFF))  # low bits, inverted if negative
        above = builder.icmp_unsigned(">", key, builder.lshr(entry, const(16)))
        idx = builder.add(builder.and_(entry, const(0xFF)), builder.zext(above, vi))
        idx = builder.select(builder.fcmp_unordered("uno", u, u), const(NAN_INDEX), idx)
        builder.store(builder.trunc(idx, ir.VectorType(i8, LANES)), _lanes_at(builder, out.data, start, i8), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _lookup_lanes(typingctx, q, start, code, out):
    """out[start:start+LANES] = code[q[start:start+LANES]]."""
    sig = types.void(q, start, code, out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]
        q, start, code, out = arrays
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        idx = builder.zext(builder.load(_lanes_at(builder, q.data, start, i8), align=1), ir.VectorType(i32, LANES))
        builder.store(_gather(builder, code.data, f32, idx, f32), _lanes_at(builder, out.data, start, f32), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _load(a, i):
    """Element ``i`` of a parameter-dtype array, as float32."""


def _store(a, i, x):
    """Write float32 ``x`` into element ``i`` of a parameter-dtype array."""


@overload(_load)
def _load_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.int16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.uint16:
        return lambda a, i: _f16_to_f32(a[i])
    return None


@overload(_store)
def _store_impl(a, i, x):
    if a.dtype == types.float32:

        def store_f32(a, i, x):
            a[i] = x

        return store_f32
    if a.dtype == types.int16:

        def store_bf16(a, i, x):
            a[i] = np.int16(_f32_to_bf16(x))

        return store_bf16
    if a.dtype == types.uint16:

        def store_f16(a, i, x):
            a[i] = np.uint16(_f32_to_f16(x))

        return store_f16
    return None


# ---- the math: one function per rule, op for op as in reference.py ------------------------


@njit(**_KERNEL)
def _adam(p, g, m, v, unused, c):
    """reference.adam."""
    wd, beta1, one_minus_beta1, beta2, one_minus_beta2, shrink, bias_correction2_sqrt, eps, step_size, decay = c
    if decay == _L2:
        g = g + p * wd
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    if decay == _DECOUPLED:
        p = p * shrink
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (m / denom) * step_size
    return p, m, v, unused


@njit(**_KERNEL)
def _ademamix(p, g, m1, m2, nu, c):
    """reference.ademamix."""
    beta1, one_minus_beta1, beta3, one_minus_beta3, beta2, one_minus_beta2, decays, shrink, bias_correction1, bias_correction2_sqrt, eps, alpha, lr = c
    m1 = m1 * beta1 + g * one_minus_beta1
    m2 = m2 * beta3 + g * one_minus_beta3
    nu = nu * beta2 + (g * g) * one_minus_beta2
    if decays:
        p = p * shrink
    denom = np.sqrt(nu) / bias_correction2_sqrt + eps
    p = p - ((m1 / bias_correction1 + m2 * alpha) / denom) * lr
    return p, m1, m2, nu


@njit(**_KERNEL)
def _lion(p, g, m, unused1, unused2, c):
    """reference.lion: the sign comes from the old momentum. torch's sign is
    (0 < x) - (x < 0): +0 for -0 and for NaN."""
    decays, shrink, beta1, one_minus_beta1, beta2, one_minus_beta2, lr = c
    if decays:
        p = p * shrink
    u = m * beta1 + g * one_minus_beta1
    sign = (_ONE if _ZERO < u else _ZERO) - (_ONE if u < _ZERO else _ZERO)
    p = p - sign * lr
    m = m * beta2 + g * one_minus_beta2
    return p, m, unused1, unused2


@njit(**_KERNEL)
def _momentum(p, g, buf, unused1, unused2, c):
    """reference.momentum (SGD; LARS with its trust ratio)."""
    decays, wd, scales, ratio, first_step, beta1, one_minus_dampening, nesterov, lr = c
    if decays:
        g = g + p * wd
    if scales:
        g = g * ratio
    if first_step:
        buf = g
    else:
        buf = buf * beta1 + g * one_minus_dampening
    step = g + buf * beta1 if nesterov else buf
    p = p - step * lr
    return p, buf, unused1, unused2


@njit(**_KERNEL)
def _rmsprop(p, g, square_avg, unused1, unused2, c):
    """reference.rmsprop."""
    decays, wd, alpha, one_minus_alpha, eps, lr = c
    if decays:
        g = g + p * wd
    square_avg = square_avg * alpha + (g * g) * one_minus_alpha
    p = p - (g / (np.sqrt(square_avg) + eps)) * lr
    return p, square_avg, unused1, unused2


@njit(**_KERNEL)
def _adagrad(p, g, sum_sq, unused1, unused2, c):
    """reference.adagrad."""
    decays, wd, eps, lr = c
    if decays:
        g = g + p * wd
    sum_sq = sum_sq + g * g
    p = p - (g / (np.sqrt(sum_sq) + eps)) * lr
    return p, sum_sq, unused1, unused2


@njit(**_KERNEL)
def _lamb(p, g, m, v, unused, c):
    """reference.lamb; the last constant is lr * trust_ratio."""
    direction, m, v = _lamb_direction(p, g, m, v, c)
    p = p - direction * c[-1]
    return p, m, v, unused


@njit(**_KERNEL)
def _lamb_direction(p, g, m, v, c):
    """reference.lamb_direction: the update direction and the new moments."""
    decay, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction1, bias_correction2, eps, scale = c
    if decay == _L2:
        g = g + p * wd
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    direction = (m / bias_correction1) / (np.sqrt(v / bias_correction2) + eps)
    if decay == _DECOUPLED:
        direction = direction + p * wd
    return direction, m, v


# rule name -> its marker (with its number of states) and constants; a new rule is a function
# above, a marker class, a constants function, and one line in each table here.
_FAMILIES: dict[str, _Family] = {
    "adam": _Family(AdamRule(2), _adam_constants),
    "ademamix": _Family(AdEMAMixRule(3), _ademamix_constants),
    "lion": _Family(LionRule(1), _lion_constants),
    "momentum": _Family(MomentumRule(1), _momentum_constants),
    "lars": _Family(MomentumRule(1), _momentum_constants),  # + the trust ratio of reference._trust_ratio
    "rmsprop": _Family(RMSpropRule(1), _rmsprop_constants),
    "adagrad": _Family(AdagradRule(1), _adagrad_constants),
    "lamb": _Family(LAMBRule(2), _lamb_constants),  # + the trust ratio of reference._trust_ratio
}
_MATH = {
    AdamRule: _adam,
    AdEMAMixRule: _ademamix,
    LionRule: _lion,
    MomentumRule: _momentum,
    RMSpropRule: _rmsprop,
    AdagradRule: _adagrad,
    LAMBRule: _lamb,
}
_COUNTS = {type(f.marker): f.marker.states for f in _FAMILIES.values()}
_MAX_STATES = 3
# a task's stack scratch: four block buffers (the states', or the trust pass's terms and states)
_SCRATCH = 4 * BLOCK
assert all(f.marker.states == RULES[name].states <= _MAX_STATES for name, f in _FAMILIES.items()) and set(_FAMILIES) == set(RULES)


def _math(rule, p, g, s0, s1, s2, c):
    """The per-element function of ``rule`` (a marker), chosen at compile time."""


def _state_count(rule):
    """How many states ``rule`` (a marker) keeps, as a compile-time constant."""


@overload(_state_count)
def _state_count_impl(rule):
    if getattr(rule, "instance_class", None) not in _MATH:
        return None
    count = _COUNTS[rule.instance_class]
    return lambda rule: count


@overload(_math)
def _math_impl(rule, p, g, s0, s1, s2, c):
    fn = _MATH.get(getattr(rule, "instance_class", None))
    if fn is None:
        return None
    return lambda rule, p, g, s0, s1, s2, c: fn(p, g, s0, s1, s2, c)


@njit(**_KERNEL)
def _peak(acc, x):
    """max(acc, |x|), NaN sticking as in torch.amax."""
    a = abs(x)
    return a if (a > acc or a != a) else acc


@njit(**_INLINE)
def _has_nonfinite(g):
    peak = np.uint32(0)
    for j in range(g.size):
        peak = max(peak, _magnitude(_load(g, j)))
    return peak >= _INF_BITS  # the largest magnitude is inf or NaN


@njit(**_KERNEL)
def _task_blocks(t, ntasks, nblocks):
    per = (nblocks + ntasks - 1) // ntasks
    return t * per, min(nblocks, (t + 1) * per)

@njit(**_INLINE)
def _block_peak(values):
    peak = np.uint32(0)
    for j in range(values.size):
        peak = max(peak, _magnitude(values[j]))
    return _float(peak)


@njit(**_INLINE)
def _lookup(q, t, out, path):
    """out[j] = code[q[j]], ``t`` a state's tables."""
    code = t[0]
    for j in range(_lookup_lanes_prefix(q, t, out, path), q.size):
        out[j] = code[q[j]]


@njit(**_INLINE)
def _quantize(values, inv, finite, t, out, path):
    """out[j] = index of the code nearest to values[j] * inv (see cpu_tables), ``t`` a state's
    tables; ``finite``: the caller knows every values[j] * inv is finite. The first fix-up is
    fused into the main loop (all the standard maps need just it); maps with more midpoints
    per table bucket get the rest in a second pass (the permute path is exact for any map)."""
    code, first, mids, fixups, packed, registers, guessed = t
    done = _quantize_lanes_prefix(values, inv, finite, t, out, path)
    for j in range(done, values.size):
        u = values[j] * inv
        idx = np.int32(first[_bits(u) >> 16])
        idx += np.int32(mids[idx] < u)
        out[j] = NAN_INDEX if u != u else idx
    start = _fixups_from(done, path)
    for _ in range(1, fixups):
        for j in range(start, values.size):
            u = values[j] * inv
            idx = np.int32(out[j])
            out[j] = idx + np.int32(mids[idx] < u)


def _lookup_lanes_prefix(q, t, out, path):
    """Do ``_lookup``'s work many lanes at a time on a vector path; return how many elements
    were done (none on the portable path)."""


def _quantize_lanes_prefix(values, inv, finite, t, out, path):
    """Do ``_quantize``'s main loop many lanes at a time on a vector path; return how many
    elements were done (none on the portable path)."""


def _fixups_from(done, path):
    """Where the fix-up passes of ``_quantize`` start: after the elements the permute path's
    exact search did, at 0 on the others."""


def _path_is(path, marker) -> bool:
    return isinstance(path, types.BaseNamedTuple) and path.instance_class is marker


@overload(_lookup_lanes_prefix, jit_options=dict(forceinline=True))
def _lookup_lanes_prefix_impl(q, t, out, path):
    if _path_is(path, PermutePath):
        return lambda q, t, out, path: cpu_avx512.lookup_planes(q, t[5], out)
    if not _path_is(path, VectorPath):
        return lambda q, t, out, path: 0

    def vector(q, t, out, path):
        done = q.size // LANES * LANES
        for j in range(0, done, LANES):
            _lookup_lanes(q, j, t[0], out)
        return done

    return vector


@overload(_quantize_lanes_prefix, jit_options=dict(forceinline=True))
def _quantize_lanes_prefix_impl(values, inv, finite, t, out, path):
    if _path_is(path, PermutePath):

        def permute(values, inv, finite, t, out, path):
            if t[6]:
                return cpu_avx512.quantize_guessed(values, inv, t[5], finite, out)
            return cpu_avx512.quantize_search(values, inv, t[5], finite, out)

        return permute
    if not _path_is(path, VectorPath):
        return lambda values, inv, finite, t, out, path: 0

    def vector(values, inv, finite, t, out, path):
        code, first, mids, fixups, packed, registers, guessed = t
        done = values.size // LANES * LANES
        if packed.size:
            for j in range(0, done, LANES):
                _quantize_packed_lanes(values, j, inv, packed, out)
        else:
            for j in range(0, done, LANES):
                _quantize_lanes(values, j, inv, first, mids, out)
        return done

    return vector


@overload(_fixups_from)
def _fixups_from_impl(done, path):
    if _path_is(path, PermutePath):
        return lambda done, path: done
    return lambda done, path: 0


@njit(**_INLINE)
def _reciprocal(scale):
    return _ONE / scale if scale > _ZERO else _ZERO



@njit(**_INLINE)
def _dequantize(state, lo, hi, s, buf, path):
    """buf = the codes of elements [lo, hi) looked up in the map; returns their scale."""
    _lookup(state[0][lo:hi], state[2], buf, path)
    return state[1][s]


@njit(inline="always", **_KERNEL)
def _scratch(s0, s1, s2):
    """A task's scratch, in its own stack frame (inlined into it): four block buffers; and
    its states, the caller's arrays without their owners (``_unowned``), 8-bit ones as
    (codes, scales, tables of the map)."""
    buffers = _stack_array(np.float32, _SCRATCH)
    s0, s1, s2 = _unowned((s0, s1, s2))
    states = (_parts(s0), _parts(s1), _parts(s2))
    return buffers[:BLOCK], buffers[BLOCK : 2 * BLOCK], buffers[2 * BLOCK : 3 * BLOCK], buffers[3 * BLOCK : 4 * BLOCK], states


def _parts(state):
    """An 8-bit state (codes, scales, code, first, mids, fixups, packed, registers, guessed)
    as (codes, scales, tables); an fp32 state as it is."""


@overload(_parts, inline="always")
def _parts_impl(state):
    if isinstance(state, types.Array):
        return lambda state: state
    return lambda state: (state[0], state[1], state[2:])


@njit(**_INLINE)
def _block_update(rule, p, g, states, lo, hi, s, gscale, c, keep, write_p, path, b0, b1, b2):
    """New states of block [lo, hi) into the buffers (the old ones if ``keep``), the new
    parameter into ``p`` (unless ``keep``, or not ``write_p``); returns the new peaks of the
    (up to 3) states.

    Written for LLVM's vectorizer: loops index from 0 over views (indices provably
    non-negative), the ``keep`` branch sits outside the loop, and the peaks are integer
    maxima of the magnitudes' bit patterns, which order non-negative floats exactly as their
    values and put NaN above inf (so NaN sticks, as in torch.amax). States past the rule's
    count (stand-ins) are neither read nor written."""
    ns = _state_count(rule)
    p = p[lo:hi]
    g = g[lo:hi]
    scale0 = _dequantize(states[0], lo, hi, s, b0, path)
    scale1 = _dequantize(states[1], lo, hi, s, b1, path) if ns > 1 else _ZERO
    scale2 = _dequantize(states[2], lo, hi, s, b2, path) if ns > 2 else _ZERO
    if keep:
        for j in range(p.size):
            b0[j] = b0[j] * scale0
            if ns > 1:
                b1[j] = b1[j] * scale1
            if ns > 2:
                b2[j] = b2[j] * scale2
        return _block_peak(b0), _block_peak(b1), _block_peak(b2)
    peak0 = np.uint32(0)
    peak1 = np.uint32(0)
    peak2 = np.uint32(0)
    for j in range(p.size):
        s1 = b1[j] * scale1 if ns > 1 else _ZERO
        s2 = b2[j] * scale2 if ns > 2 else _ZERO
        pf, x0, x1, x2 = _math(rule, _load(p, j), _load(g, j) * gscale, b0[j] * scale0, s1, s2, c)
        if write_p:
            _store(p, j, pf)
        b0[j] = x0
        peak0 = max(peak0, _magnitude(x0))
        if ns > 1:
            b1[j] = x1
            peak1 = max(peak1, _magnitude(x1))
        if ns > 2:
            b2[j] = x2
            peak2 = max(peak2, _magnitude(x2))
    return _float(peak0), _float(peak1), _float(peak2)


@njit(**_INLINE)
def _requantize(state, values, peak, inv, lo, hi, path):
    """A block's new codes from its new values, their peak and the scale's reciprocal."""
    _quantize(values, inv, peak * inv < np.inf, state[2], state[0][lo:hi], path)


@njit(**_INLINE)
def _fp32_block(rule, p, g, states, lo, hi, gscale, c):
    ns = _state_count(rule)
    p = p[lo:hi]
    g = g[lo:hi]
    a0 = states[0][lo:hi]
    a1 = states[1][lo:hi]
    a2 = states[2][lo:hi]
    for j in range(p.size):
        pf, x0, x1, x2 = _math(rule, _load(p, j), _load(g, j) * gscale, a0[j], a1[j], a2[j], c)
        _store(p, j, pf)
        a0[j] = x0
        if ns > 1:
            a1[j] = x1
        if ns > 2:
            a2[j] = x2


def _state_values(state, lo, hi, block, buf, path):
    """buf = the fp32 values of a state's elements [lo, hi), of block ``block``."""


@overload(_state_values)
def _state_values_impl(state, lo, hi, block, buf, path):
    if isinstance(state, types.Array):

        def fp32(state, lo, hi, block, buf, path):
            for j in range(buf.size):
                buf[j] = state[lo + j]

        return fp32

    def eight_bit(state, lo, hi, block, buf, path):  # (codes, scales, tables): one scale per block, or one in all
        scale = _dequantize(state, lo, hi, block if state[1].size > 1 else 0, buf, path)
        for j in range(buf.size):
            buf[j] = buf[j] * scale

    return eight_bit


@njit(**_KERNEL)
def _trust_terms_block(rule, p, g, gscale, x0, x1, c, keep, a, b):
    """a, b = the rule's trust terms of a block (reference.TRUST_RATIOS): (param, direction)
    for LAMB, (param, gradient) for LARS; a skipped block (not ``keep``) counts as the
    reference counts it, param * 0 and 0."""
    for j in range(p.size):
        pj, gj = _load(p, j), _load(g, j) * gscale
        a[j] = pj if keep else pj * _ZERO
        b[j] = _trust_term(rule, pj, gj, x0[j], x1[j], c) if keep else _ZERO


def _trust_term(rule, p, g, s0, s1, c):
    """The second trust term of an element (the first is the parameter)."""


@overload(_trust_term)
def _trust_term_impl(rule, p, g, s0, s1, c):
    kind = getattr(rule, "instance_class", None)
    if kind is LAMBRule:
        return lambda rule, p, g, s0, s1, c: _lamb_direction(p, g, s0, s1, c)[0]
    if kind is MomentumRule:  # LARS
        return lambda rule, p, g, s0, s1, c: g
    return None


@njit(fastmath={"reassoc"}, **_KERNEL)
def _sum_squares(x):
    """Σ x² in float64 (each square exact), summed in the order LLVM vectorizes to (reassoc):
    fixed by the code, not by the data or the thread count."""
    total = 0.0
    for j in range(x.size):
        v = np.float64(x[j])
        total += v * v
    return total


@njit(**_KERNEL)
def _trust_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, c, skip, path, sums):
    """Task ``t``'s blocks of the trust pass: sums[b] = the sums of squares of block b's two
    trust terms. Nothing else is written."""
    ns = _state_count(rule)
    p, g = _unowned((p, g))
    a, b, x0, x1, states = _scratch(s0, s1, s2)
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    for k in range(first, last):
        lo, hi = k * BLOCK, min(p.size, (k + 1) * BLOCK)
        size = hi - lo
        if ns > 1:  # LAMB: both moments (LARS needs no state)
            _state_values(states[0], lo, hi, k, x0[:size], path)
            _state_values(states[1], lo, hi, k, x1[:size], path)
        keep = not (skip and _has_nonfinite(g[lo:hi]))
        _trust_terms_block(rule, p[lo:hi], g[lo:hi], gscale, x0[:size], x1[:size], c, keep, a[:size], b[:size])
        sums[k, 0] = _sum_squares(a[:size])
        sums[k, 1] = _sum_squares(b[:size])
    return 0


# ---- the kernels --------------------------------------------------------------------------
#
# Each step is split into tasks, contiguous runs of 256-blocks. A task is one plain function,
# run by ``_launch`` on the calling thread and worker threads (and by cpu_batch's drivers).
# The same tasks serve every rule: the rule is a marker argument, compiled in.


@njit(**_KERNEL)
def _fp32_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, c, skip):
    """Blocks of task ``t`` with fp32 states; returns how many were skipped."""
    p, g = _unowned((p, g))
    states = _unowned((s0, s1, s2))
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    count = 0
    for b in range(first, last):
        lo, hi = b * BLOCK, min(p.size, (b + 1) * BLOCK)
        if skip and _has_nonfinite(g[lo:hi]):
            count += 1
            continue
        _fp32_block(rule, p, g, states, lo, hi, gscale, c)
    return count


@njit(**_KERNEL)
def _8bit_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, c, skip, whole, measure, inverse, path, peaks):
    """Blocks of task ``t`` with 8-bit states; returns how many were skipped. Block-wise:
    each block takes its own new scale, and a skipped block keeps everything. ``whole``: the
    new scales' reciprocals are given (``inverse``), and a skipped block keeps its parameter
    and old state values but is requantized with the new scale, as in the reference.
    ``measure`` (first pass of a ``whole`` step): only the peaks of the task's new states,
    into ``peaks[t]``; nothing else is written."""
    ns = _state_count(rule)
    p, g = _unowned((p, g))
    b0, b1, b2, _, states = _scratch(s0, s1, s2)
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    count = 0
    acc0 = _ZERO
    acc1 = _ZERO
    acc2 = _ZERO
    for b in range(first, last):
        lo, hi = b * BLOCK, min(p.size, (b + 1) * BLOCK)
        if b + AHEAD < last:
            _prefetch_block(rule, p, g, states, lo + AHEAD * BLOCK, path)
        bad = skip and _has_nonfinite(g[lo:hi])
        count += bad
        if bad and not whole:
            continue
        s = 0 if whole else b
        size = hi - lo
        peak0, peak1, peak2 = _block_update(rule, p, g, states, lo, hi, s, gscale, c, bad, not measure, path, b0[:size], b1[:size], b2[:size])
        if measure:
            acc0 = _peak(acc0, peak0)
            acc1 = _peak(acc1, peak1)
            acc2 = _peak(acc2, peak2)
            continue
        if whole:
            inv0, inv1, inv2 = inverse
        else:
            states[0][1][b] = peak0
            inv0 = _reciprocal(peak0)
            inv1 = inv2 = _ZERO
            if ns > 1:
                states[1][1][b] = peak1
                inv1 = _reciprocal(peak1)
            if ns > 2:
                states[2][1][b] = peak2
                inv2 = _reciprocal(peak2)
        _requantize(states[0], b0[:size], peak0, inv0, lo, hi, path)
        if ns > 1:
            _requantize(states[1], b1[:size], peak1, inv1, lo, hi, path)
        if ns > 2:
            _requantize(states[2], b2[:size], peak2, inv2, lo, hi, path)
    if measure:
        peaks[t, 0] = acc0
        peaks[t, 1] = acc1
        peaks[t, 2] = acc2
    return count


def update_many(jobs: list) -> list[UpdateResult]:
    """Many parameters' updates at once, small tensors batched into one call: see cpu_batch
    (imported here, not at the top: it builds on this module)."""
    from .cpu_batch import update_many as batched

    return batched(jobs)
