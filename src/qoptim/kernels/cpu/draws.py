"""The draw of 8-bit stochastic rounding (``quantize.round_up_by_draw``) on the AVX-512 path, 16
lanes at a time.

LLVM vectorizes the draw's loop by itself, but for CPUs with AVX-512 it prefers 256-bit vectors
(8 lanes), and the hash (``codec.lowbias32_ir``: two 32-bit multiplies, three shifts) is most of
its work: spelled out on 16 lanes here, the loop takes ~half the instructions, the same ones
``nibble_lanes.STOCHASTIC`` uses for 4-bit codes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .codec import lowbias32_ir

__all__ = ["DRAW_LANES", "draw_lanes"]

DRAW_LANES = 16  # one 512-bit vector of 32-bit lanes

_F32, _I32, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
_FLOATS, _INTS, _BYTES = ir.VectorType(_F32, DRAW_LANES), ir.VectorType(_I32, DRAW_LANES), ir.VectorType(_I8, DRAW_LANES)


def _splat(builder, value, vector):
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(_INTS, [0] * DRAW_LANES))


def _const(x):
    return ir.Constant(_INTS, [x] * DRAW_LANES)


@intrinsic
def draw_lanes(typingctx, values, start, inv, low, step, key, first, codes):
    """codes[i] += r_i < (values[i] * inv - low[i]) * step[i] for the 16 lanes i from ``start``,
    r_i the low 16 bits of lowbias32((first + i) ^ key) (``codec.state_random_bits``: 32-bit
    index, wrapping around)."""
    sig = types.void(values, start, inv, low, step, key, first, codes)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]
        values, start, inv, low, step, key, first, codes = arrays

        def at(array, vector):
            return builder.bitcast(builder.gep(array.data, [start]), vector.as_pointer())

        def floats(array):
            return builder.load(at(array, _FLOATS), align=4)

        u = builder.fmul(floats(values), _splat(builder, inv, _FLOATS))
        gap = builder.fmul(builder.fsub(u, floats(low)), floats(step))
        base = builder.add(builder.trunc(first, _I32), builder.trunc(start, _I32))  # (the low 32 bits, as the reference's index)
        index = builder.add(_splat(builder, base, _INTS), ir.Constant(_INTS, list(range(DRAW_LANES))))
        hashed = lowbias32_ir(builder, builder.xor(index, _splat(builder, builder.trunc(key, _I32), _INTS)), _const)
        r = builder.sitofp(builder.and_(hashed, _const(0xFFFF)), _FLOATS)
        up = builder.zext(builder.fcmp_ordered("<", r, gap), _BYTES)
        pointer = at(codes, _BYTES)
        builder.store(builder.add(builder.load(pointer, align=1), up), pointer, align=1)
        return context.get_dummy_value()

    return sig, codegen
