"""Bit-level helpers compiled into the kernels: float bit patterns, arrays without owners or on
the stack, prefetches, and the bf16 / fp16 conversions behind a parameter's element loads and
stores (numpy has no bf16: the kernels see 16-bit parameters as int16 (bf16) or uint16 (fp16))."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from .jit import KERNEL

__all__ = [
    "HALF", "INF_BITS", "ONE", "ZERO", "bf16_to_f32", "bits_of", "f16_to_f32", "f32_to_bf16", "f32_to_f16", "float_of",
    "load", "magnitude", "prefetch", "stack_array", "store", "unowned",
]  # fmt: skip

TWO_POW_112 = np.float32(2.0**112)  # rebias of an fp16 exponent (15) to a float32 one (127)
INF_BITS = np.uint32(0x7F800000)
HALF = np.float32(0.5)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


@intrinsic
def bits_of(typingctx, x):
    """The bit pattern of a float32, as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def magnitude(typingctx, x):
    """The bit pattern of |x| for a float32, as uint32: it orders non-negative floats as
    their values, with NaN above inf. (``bits_of(x) & mask`` would be a uint64 in Numba, and
    a loop of uint64 maxima vectorizes at half the width.)"""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(builder.bitcast(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.uint32(types.float32), codegen


@intrinsic
def float_of(typingctx, b):
    """The float32 whose bit pattern is the low 32 bits of integer ``b``."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if b.bitwidth > 32 else builder.zext(args[0], ir.IntType(32)) if b.bitwidth < 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(b), codegen


@intrinsic
def unowned(typingctx, a):
    """Array ``a`` (or each array in tuple ``a``) without its owner, so that no code, with
    Numba's reference counting or without, ever touches the owner's count through it. Only
    for arrays that the caller keeps alive while the result is in use."""
    if not isinstance(a, (types.Array, types.BaseTuple)):
        return None

    def strip(context, builder, ty, value):
        if isinstance(ty, types.BaseTuple):
            for i, item in enumerate(ty.types):
                value = builder.insert_value(value, strip(context, builder, item, builder.extract_value(value, i)), i)
            return value
        if not isinstance(ty, types.Array):
            return value
        ary = context.make_array(ty)(context, builder, value=value)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()

    def codegen(context, builder, signature, args):
        return strip(context, builder, a, args[0])

    return a(a), codegen


@intrinsic(prefer_literal=True)
def stack_array(typingctx, dtype, n):
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


@intrinsic
def prefetch(typingctx, a, start, end):
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


# ---- 16-bit floats ------------------------------------------------------------------------


@njit(**KERNEL)
def bf16_to_f32(h):
    return float_of(np.uint32((np.int64(h) & 0xFFFF) << 16))


@njit(**KERNEL)
def f32_to_bf16(x):
    """Round to nearest-even, NaN to torch's 0x7FC0."""
    if x != x:
        return np.int64(0x7FC0)
    b = np.int64(bits_of(x))
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(**KERNEL)
def f16_to_f32(h):
    h = np.int64(h)
    mantissa_and_exponent = (h & 0x7FFF) << 13
    if (h & 0x7C00) == 0x7C00:  # inf, NaN
        x = float_of(np.uint32(mantissa_and_exponent | 0x7F800000))
    else:  # the bits already line up; one exact multiply rebiases normals and subnormals alike
        x = float_of(np.uint32(mantissa_and_exponent)) * TWO_POW_112
    return float_of(np.uint32(np.int64(bits_of(x)) | ((h & 0x8000) << 16)))


@njit(**KERNEL)
def f32_to_f16(x):
    """Round to nearest-even, as torch's conversion (F16C) does."""
    b = np.int64(bits_of(x))
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
    t = float_of(np.uint32(a)) + HALF
    return sign | (np.int64(bits_of(t)) - 0x3F000000)


def load(a, i):
    """Element ``i`` of a parameter-dtype array, as float32."""


def store(a, i, x):
    """Write float32 ``x`` into element ``i`` of a parameter-dtype array."""


@overload(load)
def _load_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.int16:
        return lambda a, i: bf16_to_f32(a[i])
    if a.dtype == types.uint16:
        return lambda a, i: f16_to_f32(a[i])
    return None


@overload(store)
def _store_impl(a, i, x):
    if a.dtype == types.float32:

        def store_f32(a, i, x):
            a[i] = x

        return store_f32
    if a.dtype == types.int16:

        def store_bf16(a, i, x):
            a[i] = np.int16(f32_to_bf16(x))

        return store_bf16
    if a.dtype == types.uint16:

        def store_f16(a, i, x):
            a[i] = np.uint16(f32_to_f16(x))

        return store_f16
    return None
