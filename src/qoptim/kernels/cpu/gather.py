"""The AVX2 path's table lookups: ``llvm.masked.gather`` intrinsics, ``LANES`` elements at a time
(vpgatherdd), which LLVM's own vectorizer does not emit for these loops."""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .tables import NAN_INDEX

__all__ = ["LANES", "fixup_lanes", "lookup_lanes", "quantize_lanes", "quantize_packed_lanes"]

LANES = 8


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


def _arrays(context, builder, signature, args):
    return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]


@intrinsic
def quantize_lanes(typingctx, values, start, inv, first, mids, out):
    """The scalar quantizer of ``quantize.quantize`` on LANES elements from ``start`` at once:
    u = values * inv; idx = first[bits(u) >> 16]; idx += mids[idx] < u; NaN -> NAN_INDEX.
    ``first`` (bytes) is read 4 bytes at a time and masked: ``tables`` pads it for that."""
    sig = types.void(values, start, inv, first, mids, out)

    def codegen(context, builder, signature, args):
        values, start, inv, first, mids, out = _arrays(context, builder, signature, args)
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
def fixup_lanes(typingctx, values, start, inv, mids, out):
    """One more fix-up of ``quantize_lanes``' indices on LANES elements from ``start``, for maps
    with two midpoints in some table bucket (stochastic rounding's floor tables of the unsigned
    map have one such): idx += mids[idx] < u, NaN's NAN_INDEX kept (mids[255] is +inf)."""
    sig = types.void(values, start, inv, mids, out)

    def codegen(context, builder, signature, args):
        values, start, inv, mids, out = _arrays(context, builder, signature, args)
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        vf, vi = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)
        u = builder.fmul(builder.load(_lanes_at(builder, values.data, start, f32), align=4), _splat(builder, inv, vf))
        at = _lanes_at(builder, out.data, start, i8)
        idx = builder.zext(builder.load(at, align=1), vi)
        idx = builder.add(idx, builder.zext(builder.fcmp_ordered("<", _gather(builder, mids.data, f32, idx, f32), u), vi))
        builder.store(builder.trunc(idx, ir.VectorType(i8, LANES)), at, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def quantize_packed_lanes(typingctx, values, start, inv, packed, out):
    """``quantize_lanes`` with one table read (the tables' ``packed``, for maps with at most
    one midpoint per bucket): idx = (e & 0xFF) + (key(u) > e >> 16), e = packed[bits(u) >> 16]."""
    sig = types.void(values, start, inv, packed, out)

    def codegen(context, builder, signature, args):
        values, start, inv, packed, out = _arrays(context, builder, signature, args)
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
def lookup_lanes(typingctx, q, start, code, out):
    """out[start:start+LANES] = code[q[start:start+LANES]]."""
    sig = types.void(q, start, code, out)

    def codegen(context, builder, signature, args):
        q, start, code, out = _arrays(context, builder, signature, args)
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        idx = builder.zext(builder.load(_lanes_at(builder, q.data, start, i8), align=1), ir.VectorType(i32, LANES))
        builder.store(_gather(builder, code.data, f32, idx, f32), _lanes_at(builder, out.data, start, f32), align=4)
        return context.get_dummy_value()

    return sig, codegen
