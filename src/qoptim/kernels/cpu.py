"""The fused CPU backend: one Numba kernel pass over memory per optimizer step.

Each thread takes a contiguous run of 256-blocks. Per block it dequantizes both states
(``code[q] * absmax``), applies the Adam math in float32 in exactly the reference's order of
operations, writes the parameter back, takes the block's new absmax and requantizes with the
table quantizer of ``cpu_tables`` (exactly the reference's rounding). The only temporaries are
three 256-float buffers per thread, so a step reads and writes each byte of parameter, gradient
and state once.

Agreement with ``reference.update`` is bit for bit: no fast-math (it would let LLVM contract
``a*b + c`` into an FMA or reorder sums), float32 constants rounded from the same Python doubles
torch uses, and the same float32 reciprocal for the quantizer scale. Parameters in bf16/fp16 are
read and written through 16-bit integer views (numpy has no bf16), rounding to nearest-even.

Two paths, chosen per call (``VECTORIZE``): on CPUs with AVX2 gathers the table lookups of
dequantizing and quantizing run 8 lanes at a time through ``llvm.masked.gather`` intrinsics
(LLVM's own vectorizer will not emit gathers for these loops); elsewhere, or with
``QOPTIM_CPU_PORTABLE=1``, plain scalar loops. The Adam math itself is auto-vectorized on
both. Where the time goes (one thread, AVX-512 Zen 5, per element): the four table lookups
(two dequantize, two quantize) about 1.7 ns, everything else about 0.3 ns.

Kernels are compiled lazily per parameter dtype, state layout and path, and cached on disk
(``cache=True``): a fresh process with a warm cache pays ~0.4 s on its first step.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import NamedTuple

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from . import reference
from .cpu_tables import NAN_INDEX, tables_for
from .types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult

__all__ = ["update", "grad_norm_sq", "supports"]

# The vectorized path gathers table entries 8 at a time (llvm.masked.gather): taken where the
# CPU has hardware gathers (AVX2); elsewhere LLVM would emulate them, so the portable scalar
# loops run instead. QOPTIM_CPU_PORTABLE=1 (at import) forces the portable path; so does a
# vectorized kernel that fails to compile. The flag is read on every call.
VECTORIZE = bool(llvm_binding.get_host_cpu_features().get("avx2")) and os.environ.get("QOPTIM_CPU_PORTABLE", "") in ("", "0")
LANES = 8


class VectorPath(NamedTuple):
    """Marker argument: compile the kernels with the gather intrinsics."""

    lanes: int


class PortablePath(NamedTuple):
    """Marker argument: compile the kernels from plain scalar loops only."""

    lanes: int


# The path is told apart by the marker's type, so each path is its own compiled (and cached)
# specialization and the portable one never contains an intrinsic: if the vectorized one fails
# to compile (another numba/llvmlite), the portable one still works.
_VECTOR, _PORTABLE = VectorPath(LANES), PortablePath(1)

# Below this many elements (~0.5 ms of work for one thread) a step runs on the calling thread
# only: a launch through Numba's pool costs ~0.1 ms at best, and with busy cores it can stall
# for a scheduler tick (~8 ms measured under load with the OpenMP layer).
PARALLEL_MIN = 1 << 18

# How the kernels see a parameter's memory: bf16 and fp16 both as 16-bit integers, told apart by signedness.
_VIEWS = {torch.float32: (torch.float32, np.float32), torch.bfloat16: (torch.int16, np.int16), torch.float16: (torch.int16, np.uint16)}

# weight decay modes of the kernels
_NO_DECAY, _L2, _DECOUPLED = 0, 1, 2

# error_model="numpy": float division by zero gives inf/NaN as in torch instead of raising
_JIT = dict(cache=True, error_model="numpy")
_PARALLEL = dict(parallel=True, **_JIT)

_TWO_POW_112 = np.float32(2.0**112)  # rebias of an fp16 exponent (15) to a float32 one (127)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_MAGNITUDE = np.uint32(0x7FFFFFFF)  # all bits of a float32 but its sign


# ---- the seam -----------------------------------------------------------------------


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """Adam with both states fp32, both 8-bit in 256-blocks, or both 8-bit with one scale,
    on a flat contiguous CPU parameter; anything else goes to the reference."""
    if rule != "adam" or len(slots) != 2 or p.device.type != "cpu" or p.dtype not in _VIEWS:
        return False
    if p.dim() != 1 or not p.is_contiguous() or p.numel() == 0:
        return False
    return _layout(p.numel(), slots) is not None


def update(rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True) -> UpdateResult:
    """One Adam step of ``p`` in place (same result as ``reference.update``)."""
    if not supports(rule, p, slots) or not _flat_cpu(g, p.dtype, p.numel()):
        return reference.update(rule, p, g, slots, hp, skip_nonfinite)
    with _threads_for(p.numel()) as ntasks:
        skipped = _step(_layout(p.numel(), slots), p, g, slots, hp, skip_nonfinite, ntasks)
    return UpdateResult(skipped_blocks=skipped)


def _driver(parallel, serial, ntasks: int):
    return parallel if ntasks > 1 else serial


def _step(layout: str, p, g, slots, hp, skip_nonfinite, ntasks) -> int:
    skipped = np.zeros(ntasks, dtype=np.int64)
    args = (_as_numpy(p), _as_numpy(g))
    constants, decay = _constants(hp), _decay_mode(hp)
    if layout == "fp32":
        m, v = (s.values.detach().numpy() for s in slots)
        _driver(_adam_fp32_states, _adam_fp32_states_serial, ntasks)(*args, m, v, constants, decay, skip_nonfinite, ntasks, skipped)
        return int(skipped.sum())
    states = tuple(_quantized(s) for s in slots)
    whole = layout == "whole"
    run = (args, states, constants, decay, skip_nonfinite, whole, ntasks, skipped)
    if not VECTORIZE:
        peaks = _run_8bit(*run, _PORTABLE)
    else:
        try:
            peaks = _run_8bit(*run, _VECTOR)
        except (numba.core.errors.NumbaError, RuntimeError) as e:  # compiling failed: nothing was written
            _give_up_vectorizing(e)
            peaks = _run_8bit(*run, _PORTABLE)
    if whole:
        for slot, peak in zip(slots, peaks):
            slot.absmax.fill_(float(peak))
    return int(skipped.sum())


def _run_8bit(args, states, constants, decay, skip_nonfinite, whole, ntasks, skipped, path):
    """The 8-bit kernels; returns the new one-per-tensor scales (``whole``) or None."""
    peaks, inverse = None, (_ZERO, _ZERO)
    if whole:  # one scale per tensor: a first pass finds the new scales, as in the reference
        peaks = _whole_tensor_peaks(args, states, constants, decay, skip_nonfinite, path, ntasks)
        inverse = tuple(_inverse(x) for x in peaks)
    _driver(_adam_8bit, _adam_8bit_serial, ntasks)(*args, *states, constants, decay, skip_nonfinite, whole, inverse, path, ntasks, skipped)
    return peaks


def _give_up_vectorizing(error: Exception) -> None:
    global VECTORIZE
    VECTORIZE = False
    warnings.warn(
        f"qoptim: the vectorized CPU kernel failed to compile ({type(error).__name__}: {str(error)[:200]}); "
        "using the portable one",
        RuntimeWarning,
        stacklevel=4,
    )


def grad_norm_sq(g: torch.Tensor) -> float:
    """The reference's sum of squares (chunked BLAS dot, already memory-bound), so that
    percentile clipping decides exactly as it does on the reference backend."""
    return reference.grad_norm_sq(g)


# ---- host-side preparation ------------------------------------------------------------


def _layout(n: int, slots: list[StateSlot]) -> str | None:
    """'fp32', 'block' or 'whole' when both states share a layout the kernels cover."""
    if all(not s.quantized and _flat_cpu(s.values, torch.float32, n) for s in slots):
        return "fp32"
    if not all(s.quantized and _flat_cpu(s.values, torch.uint8, n) for s in slots):
        return None
    if any(s.code is None or s.code.shape != (256,) or s.code.dtype != torch.float32 or s.code.device.type != "cpu" for s in slots):
        return None
    if any(tables_for(s.code) is None for s in slots):
        return None
    if all(s.blocksize == BLOCK and _flat_cpu(s.absmax, torch.float32, -(-n // BLOCK)) for s in slots):
        return "block"
    if all(s.blocksize == WHOLE_TENSOR and _flat_cpu(s.absmax, torch.float32, 1) for s in slots):
        return "whole"
    return None


def _flat_cpu(t: torch.Tensor | None, dtype: torch.dtype, n: int) -> bool:
    return t is not None and t.dtype == dtype and t.numel() == n and t.is_contiguous() and t.device.type == "cpu"


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    view_dtype, np_dtype = _VIEWS[t.dtype]
    return t.detach().view(view_dtype).numpy().view(np_dtype)


def _quantized(slot: StateSlot) -> tuple:
    """What the kernels need of an 8-bit state: codes, scales, and the quantizer tables."""
    t = tables_for(slot.code)
    return (slot.values.detach().numpy(), slot.absmax.detach().view(-1).numpy(), t.code, t.first, t.mids, t.fixups, t.packed)


def _constants(hp: Hyper) -> tuple:
    """The step's scalars as float32, each rounded from the Python double torch would use."""
    f = np.float32
    return (
        f(hp.gnorm_scale),
        f(hp.weight_decay),
        f(hp.beta1),
        f(1.0 - hp.beta1),
        f(hp.beta2),
        f(1.0 - hp.beta2),
        f(1.0 - hp.lr * hp.weight_decay),
        f(math.sqrt(1.0 - hp.beta2**hp.step)),
        f(hp.eps),
        f(hp.lr / (1.0 - hp.beta1**hp.step)),
    )


def _decay_mode(hp: Hyper) -> int:
    if not hp.weight_decay:
        return _NO_DECAY
    return _DECOUPLED if hp.decoupled else _L2


@contextlib.contextmanager
def _threads_for(n: int):
    """How many tasks to split a step into: one per thread of torch's (capped by Numba's
    pool), one for small tensors. With more than one, Numba's pool runs with that many
    threads for the step; Numba's setting is per calling thread and is restored afterwards."""
    threads = 1 if n < PARALLEL_MIN else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    ntasks = min(threads, -(-n // BLOCK))
    if ntasks == 1:  # the serial drivers: the pool is not involved
        yield 1
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(ntasks)
    try:
        yield ntasks
    finally:
        numba.set_num_threads(previous)


def _whole_tensor_peaks(args, states, constants, decay, skip, path, ntasks) -> tuple[np.float32, np.float32]:
    """Largest |new state| over the whole tensor for each state (NaN if any is NaN, as torch.amax)."""
    peaks = np.zeros((ntasks, 2), dtype=np.float32)
    _driver(_adam_8bit_peaks, _adam_8bit_peaks_serial, ntasks)(*args, *states, constants, decay, skip, path, ntasks, peaks)
    return tuple(np.float32(np.nan) if np.isnan(col).any() else col.max() for col in peaks.T)


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
def _float(typingctx, b):
    """The float32 whose bit pattern is the low 32 bits of integer ``b``."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if b.bitwidth > 32 else builder.zext(args[0], ir.IntType(32)) if b.bitwidth < 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(b), codegen


@njit(**_JIT)
def _bf16_to_f32(h):
    return _float(np.uint32((np.int64(h) & 0xFFFF) << 16))


@njit(**_JIT)
def _f32_to_bf16(x):
    """Round to nearest-even, NaN to torch's 0x7FC0."""
    if x != x:
        return np.int64(0x7FC0)
    b = np.int64(_bits(x))
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(**_JIT)
def _f16_to_f32(h):
    h = np.int64(h)
    magnitude = (h & 0x7FFF) << 13
    if (h & 0x7C00) == 0x7C00:  # inf, NaN
        x = _float(np.uint32(magnitude | 0x7F800000))
    else:  # the bits already line up; one exact multiply rebiases normals and subnormals alike
        x = _float(np.uint32(magnitude)) * _TWO_POW_112
    return _float(np.uint32(np.int64(_bits(x)) | ((h & 0x8000) << 16)))


@njit(**_JIT)
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


# ---- the math ---------------------------------------------------------------------------


@njit(**_JIT)
def _adam(p, g, m, v, c, decay):
    """One element of reference.adam, op for op (float32 in, float32 out)."""
    gscale, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, shrink, bias_correction2_sqrt, eps, step_size = c
    g = g * gscale
    if decay == _L2:
        g = g + p * wd
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    if decay == _DECOUPLED:
        p = p * shrink
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (m / denom) * step_size
    return p, m, v


@njit(**_JIT)
def _peak(acc, x):
    """max(acc, |x|), NaN sticking as in torch.amax."""
    a = abs(x)
    return a if (a > acc or a != a) else acc


@njit(**_JIT)
def _has_nonfinite(g):
    bad = False
    for j in range(g.size):
        x = _load(g, j)
        bad |= not (x - x == _ZERO)  # inf - inf and NaN - NaN are NaN
    return bad


@njit(**_JIT)
def _task_blocks(t, ntasks, nblocks):
    per = (nblocks + ntasks - 1) // ntasks
    return t * per, min(nblocks, (t + 1) * per)


@njit(**_JIT)
def _block_update(p, g, q1, q2, scale1, scale2, code1, code2, c, decay, keep, path, pbuf, mbuf, vbuf):
    """New param and states of one block (views of it) into the buffers (the old ones if
    ``keep``); returns the new peaks of both states.

    Written for LLVM's vectorizer: loops index from 0 over views (indices provably
    non-negative), the ``keep`` branch sits outside the loop, and the peaks are integer
    maxima of the magnitudes' bit patterns, which order non-negative floats exactly as their
    values and put NaN above inf (so NaN sticks, as in torch.amax)."""
    _lookup(q1, code1, mbuf, path)
    _lookup(q2, code2, vbuf, path)
    if keep:
        for j in range(p.size):
            pbuf[j] = _load(p, j)
            mbuf[j] = mbuf[j] * scale1
            vbuf[j] = vbuf[j] * scale2
        return _block_peak(mbuf), _block_peak(vbuf)
    peak1 = np.uint32(0)
    peak2 = np.uint32(0)
    for j in range(p.size):
        m = mbuf[j] * scale1
        v = vbuf[j] * scale2
        pf, m, v = _adam(_load(p, j), _load(g, j), m, v, c, decay)
        pbuf[j] = pf
        mbuf[j] = m
        vbuf[j] = v
        peak1 = max(peak1, _bits(m) & _MAGNITUDE)
        peak2 = max(peak2, _bits(v) & _MAGNITUDE)
    return _float(peak1), _float(peak2)


@njit(**_JIT)
def _block_peak(values):
    peak = np.uint32(0)
    for j in range(values.size):
        peak = max(peak, _bits(values[j]) & _MAGNITUDE)
    return _float(peak)


@njit(**_JIT)
def _lookup(q, code, out, path):
    """out[j] = code[q[j]]."""
    for j in range(_lookup_lanes_prefix(q, code, out, path), q.size):
        out[j] = code[q[j]]


@njit(**_JIT)
def _quantize(values, inv, first, mids, fixups, packed, out, path):
    """out[j] = index of the code nearest to values[j] * inv (see cpu_tables). The first
    fix-up is fused into the main loop (all the standard maps need just it); maps with more
    midpoints per table bucket get the rest in a second pass."""
    for j in range(_quantize_lanes_prefix(values, inv, first, mids, packed, out, path), values.size):
        u = values[j] * inv
        idx = np.int32(first[_bits(u) >> 16])
        idx += np.int32(mids[idx] < u)
        out[j] = NAN_INDEX if u != u else idx
    for _ in range(1, fixups):
        for j in range(values.size):
            u = values[j] * inv
            idx = np.int32(out[j])
            out[j] = idx + np.int32(mids[idx] < u)


def _lookup_lanes_prefix(q, code, out, path):
    """Do ``_lookup``'s work LANES at a time on the vector path; return how many elements
    were done (none on the portable path)."""


def _quantize_lanes_prefix(values, inv, first, mids, packed, out, path):
    """Do ``_quantize``'s main loop LANES at a time on the vector path; return how many
    elements were done (none on the portable path)."""


def _on_vector_path(path) -> bool:
    return isinstance(path, types.BaseNamedTuple) and path.instance_class is VectorPath


@overload(_lookup_lanes_prefix)
def _lookup_lanes_prefix_impl(q, code, out, path):
    if not _on_vector_path(path):
        return lambda q, code, out, path: 0

    def vector(q, code, out, path):
        done = q.size // LANES * LANES
        for j in range(0, done, LANES):
            _lookup_lanes(q, j, code, out)
        return done

    return vector


@overload(_quantize_lanes_prefix)
def _quantize_lanes_prefix_impl(values, inv, first, mids, packed, out, path):
    if not _on_vector_path(path):
        return lambda values, inv, first, mids, packed, out, path: 0

    def vector(values, inv, first, mids, packed, out, path):
        done = values.size // LANES * LANES
        if packed.size:
            for j in range(0, done, LANES):
                _quantize_packed_lanes(values, j, inv, packed, out)
        else:
            for j in range(0, done, LANES):
                _quantize_lanes(values, j, inv, first, mids, out)
        return done

    return vector


@njit(**_JIT)
def _store_block(p, pbuf):
    for j in range(p.size):
        _store(p, j, pbuf[j])


@njit(**_JIT)
def _fp32_block(p, g, m, v, c, decay):
    for j in range(p.size):
        pf, mf, vf = _adam(_load(p, j), _load(g, j), m[j], v[j], c, decay)
        _store(p, j, pf)
        m[j] = mf
        v[j] = vf


@njit(**_JIT)
def _reciprocal(scale):
    return _ONE / scale if scale > _ZERO else _ZERO


# ---- the kernels --------------------------------------------------------------------------
#
# Each step is split into tasks, contiguous runs of 256-blocks. A task is one plain function;
# the drivers run the tasks in parallel (prange, Numba's thread pool) or, for small tensors and
# one thread, in a loop that never touches the pool: a launch through the pool costs ~0.1 ms at
# best, and on a machine whose cores are busy it can stall for a scheduler tick (~8 ms).


@njit(**_JIT)
def _fp32_task(t, ntasks, p, g, m, v, c, decay, skip):
    """Blocks of task ``t`` with fp32 states; returns how many were skipped."""
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    count = 0
    for b in range(first, last):
        lo, hi = b * BLOCK, min(p.size, (b + 1) * BLOCK)
        if skip and _has_nonfinite(g[lo:hi]):
            count += 1
            continue
        _fp32_block(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], c, decay)
    return count


@njit(**_JIT)
def _8bit_task(t, ntasks, p, g, state1, state2, c, decay, skip, whole, inverse, path):
    """Blocks of task ``t`` with 8-bit states; returns how many were skipped. Block-wise:
    each block takes its own new scale, and a skipped block keeps everything. ``whole``: the
    new scales' reciprocals are given (``inverse``), and a skipped block keeps its parameter
    and old state values but is requantized with the new scale, as in the reference."""
    q1, scales1, code1, first1, mids1, fix1, packed1 = state1
    q2, scales2, code2, first2, mids2, fix2, packed2 = state2
    pbuf = np.empty(BLOCK, np.float32)
    mbuf = np.empty(BLOCK, np.float32)
    vbuf = np.empty(BLOCK, np.float32)
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    count = 0
    for b in range(first, last):
        lo, hi = b * BLOCK, min(p.size, (b + 1) * BLOCK)
        bad = skip and _has_nonfinite(g[lo:hi])
        count += bad
        if bad and not whole:
            continue
        s = 0 if whole else b
        block = slice(lo, hi)
        size = hi - lo
        peak1, peak2 = _block_update(
            p[block], g[block], q1[block], q2[block], scales1[s], scales2[s], code1, code2, c, decay, bad, path, pbuf[:size], mbuf[:size], vbuf[:size]
        )
        if not bad:
            _store_block(p[block], pbuf)
        if whole:
            inv1, inv2 = inverse
        else:
            scales1[b], scales2[b] = peak1, peak2
            inv1, inv2 = _reciprocal(peak1), _reciprocal(peak2)
        _quantize(mbuf[:size], inv1, first1, mids1, fix1, packed1, q1[block], path)
        _quantize(vbuf[:size], inv2, first2, mids2, fix2, packed2, q2[block], path)
    return count


@njit(**_JIT)
def _peaks_task(t, ntasks, p, g, state1, state2, c, decay, skip, path, peaks):
    """First pass of a one-scale (WHOLE_TENSOR) step: the peaks of task ``t``'s new states
    into ``peaks[t]``. Writes nothing else."""
    q1, scales1, code1 = state1[0], state1[1], state1[2]
    q2, scales2, code2 = state2[0], state2[1], state2[2]
    pbuf = np.empty(BLOCK, np.float32)
    mbuf = np.empty(BLOCK, np.float32)
    vbuf = np.empty(BLOCK, np.float32)
    first, last = _task_blocks(t, ntasks, (p.size + BLOCK - 1) // BLOCK)
    peak1 = _ZERO
    peak2 = _ZERO
    for b in range(first, last):
        lo, hi = b * BLOCK, min(p.size, (b + 1) * BLOCK)
        bad = skip and _has_nonfinite(g[lo:hi])
        block = slice(lo, hi)
        size = hi - lo
        b1, b2 = _block_update(
            p[block], g[block], q1[block], q2[block], scales1[0], scales2[0], code1, code2, c, decay, bad, path, pbuf[:size], mbuf[:size], vbuf[:size]
        )
        peak1 = _peak(peak1, b1)
        peak2 = _peak(peak2, b2)
    peaks[t, 0] = peak1
    peaks[t, 1] = peak2


@njit(**_PARALLEL)
def _adam_fp32_states(p, g, m, v, c, decay, skip, ntasks, skipped):
    for t in prange(ntasks):
        skipped[t] = _fp32_task(t, ntasks, p, g, m, v, c, decay, skip)


@njit(**_JIT)
def _adam_fp32_states_serial(p, g, m, v, c, decay, skip, ntasks, skipped):
    for t in range(ntasks):
        skipped[t] = _fp32_task(t, ntasks, p, g, m, v, c, decay, skip)


@njit(**_PARALLEL)
def _adam_8bit(p, g, state1, state2, c, decay, skip, whole, inverse, path, ntasks, skipped):
    for t in prange(ntasks):
        skipped[t] = _8bit_task(t, ntasks, p, g, state1, state2, c, decay, skip, whole, inverse, path)


@njit(**_JIT)
def _adam_8bit_serial(p, g, state1, state2, c, decay, skip, whole, inverse, path, ntasks, skipped):
    for t in range(ntasks):
        skipped[t] = _8bit_task(t, ntasks, p, g, state1, state2, c, decay, skip, whole, inverse, path)


@njit(**_PARALLEL)
def _adam_8bit_peaks(p, g, state1, state2, c, decay, skip, path, ntasks, peaks):
    for t in prange(ntasks):
        _peaks_task(t, ntasks, p, g, state1, state2, c, decay, skip, path, peaks)


@njit(**_JIT)
def _adam_8bit_peaks_serial(p, g, state1, state2, c, decay, skip, path, ntasks, peaks):
    for t in range(ntasks):
        _peaks_task(t, ntasks, p, g, state1, state2, c, decay, skip, path, peaks)
