"""The register lookups of 16-code maps (``nibbles``), many lanes at a time: a map's 16 float32
entries held in registers and looked up by a permute, never by a load per element.

On the AVX-512 path (``PermutePath``) the 16 entries fill one register and one ``vpermps`` looks
16 lanes up. On the AVX2 path (``VectorPath``) they fill two 8-lane registers: a lookup is a
``vpermps`` of each (by the index's low 3 bits) and a blend by its bit 3, 8 lanes at a time,
~1.5x the instructions per element of the AVX-512 one and ~4x fewer than the gathers
``gather`` does for 256-entry maps (``decode``) or the 15 comparisons of ``nibbles.code_index``
(``quantize``). Which path is faster differs by CPU (``calibrate`` measures it).

Each intrinsic comes in both widths (``DECODE``, ``SEARCH``, ``STOCHASTIC``: width -> intrinsic);
their results are those of ``nibbles``' scalar loops, bit for bit. The second moments' map,
{1, .., 16} / 16, rounds stochastically without the search (``STOCHASTIC_LINEAR``): its count is
an exact floor (``_Lanes.count_linear``), which spares the search's permutes and comparisons, all
on one port of Intel's cores (~1/3 of a 4-bit step's encoding).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .codec import lowbias32_ir

__all__ = ["DECODE", "LINEAR_CODES", "NAN_CODE", "SEARCH", "STOCHASTIC", "STOCHASTIC_LINEAR", "WIDTHS"]

NAN_CODE = np.int32(15)  # torch.bucketize's answer for NaN: after every one of a 16-code map's 15 midpoints
LINEAR_CODES = (np.arange(1, 17) / 16).astype(np.float32)  # the zero-free linear map (``quant.formats``' linear4)
WIDTHS = (16, 8)  # lanes per lookup: AVX-512's 16 float32, AVX2's 8
_PERMUTES = {16: "llvm.x86.avx512.permvar.sf.512", 8: "llvm.x86.avx2.permps"}


class _Lanes:
    """What the intrinsics build their code with, ``width`` lanes at a time: the arguments as
    arrays, the vector types, pointers to ``width`` elements, a scalar in every lane, a map's 16
    entries in registers and their lookup, the scaled values and the register binary search both
    quantizers share."""

    def __init__(self, context, builder, signature, args, width: int):
        self.builder, self.width = builder, width
        self.args = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]
        self.i32 = ir.IntType(32)
        self.ints, self.floats = ir.VectorType(self.i32, width), ir.VectorType(ir.FloatType(), width)
        self.bytes = ir.VectorType(ir.IntType(8), width)
        permute_type = ir.FunctionType(self.floats, [self.floats, self.ints])
        self.vpermps = cgutils.get_or_insert_function(builder.module, permute_type, _PERMUTES[width])

    def at(self, data, index, vector):
        """A pointer to the ``vector`` of elements of ``data`` from ``index``."""
        return self.builder.bitcast(self.builder.gep(data, [index]), vector.as_pointer())

    def const(self, x):
        return ir.Constant(self.ints, [x] * self.width)

    def splat(self, value, vector):
        """``value`` in every lane of ``vector``."""
        one = self.builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(self.i32, 0))
        return self.builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), self.const(0))

    def table(self, array):
        """The 16 float32 entries of ``array``, in registers: one of 16 lanes, or two of 8."""
        return tuple(self.builder.load(self.at(array.data, ir.Constant(self.i32, lo), self.floats), align=4) for lo in range(0, 16, self.width))

    def permute(self, table, index):
        """table[index], lane by lane (index in [0, 16))."""
        looked = [self.builder.call(self.vpermps, [part, index]) for part in table]  # (by the index's low bits)
        if len(looked) == 1:
            return looked[0]
        high = self.builder.icmp_unsigned("!=", self.builder.and_(index, self.const(8)), self.const(0))
        return self.builder.select(high, looked[1], looked[0])

    def scaled(self, values, start, inv):
        """u = values[start:start+width] * inv."""
        loaded = self.builder.load(self.at(values.data, start, self.floats), align=4)
        return self.builder.fmul(loaded, self.splat(inv, self.floats))

    def count(self, table, u, compare: str):
        """The count of the 15 sorted bounds in ``table`` (then +inf, never read) that ``compare`` u
        ("<": below it, "<=": at or below), by a branch-free binary search of 4 lookups. The
        comparisons are unordered ones, true for a NaN u, which so counts them all (the last
        code) without a test of its own."""
        builder, index = self.builder, self.const(0)
        for step in (8, 4, 2, 1):  # index + step - 1 bounds at least pass, where that one does
            passes = builder.fcmp_unordered(compare, self.permute(table, builder.or_(index, self.const(step - 1))), u)
            index = builder.select(passes, builder.or_(index, self.const(step)), index)
        return index

    def count_linear(self, u):
        """``count(bounds, u, "<=")`` where the bounds are the codes after the first of the map
        {1, 2, .., 16} / 16 (``LINEAR_CODES``): (j + 2) / 16 <= u exactly where j + 2 <= floor(16 u)
        (16 u is exact), so the count is floor(16 u) - 1 held in [0, 15], without a lookup; NaN
        fails both comparisons and counts 15, +inf 15, -inf and -0 none."""
        builder, floats = self.builder, (lambda x: ir.Constant(self.floats, [x] * self.width))
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.floats, [self.floats]), f"llvm.floor.v{self.width}f32")
        f = builder.call(floor, [builder.fmul(u, floats(16.0))])
        f = builder.select(builder.fcmp_ordered("<", f, floats(1.0)), floats(1.0), f)
        f = builder.select(builder.fcmp_ordered("<", f, floats(16.0)), f, floats(16.0))
        return builder.sub(builder.fptosi(f, self.ints), self.const(1))

    def store_codes(self, index, q, start):
        """q[start:start+width] = the lanes of ``index``, as bytes."""
        self.builder.store(self.builder.trunc(index, self.bytes), self.at(q.data, start, self.bytes), align=1)


def _decode(width: int):
    @intrinsic
    def decode_lanes(typingctx, codes, start, shift, code, out):
        """out[start:start+width] = code[(codes[start:start+width] >> shift) & 15]: a lookup of
        the 16 codes held in registers."""
        sig = types.void(codes, start, shift, code, out)

        def codegen(context, builder, signature, args):
            lanes = _Lanes(context, builder, signature, args, width)
            codes, start, shift, code, out = lanes.args
            raw = builder.zext(builder.load(lanes.at(codes.data, start, lanes.bytes), align=1), lanes.ints)
            amount = builder.trunc(shift, lanes.i32) if shift.type.width > 32 else builder.zext(shift, lanes.i32)
            index = builder.and_(builder.lshr(raw, lanes.splat(amount, lanes.ints)), lanes.const(0xF))
            builder.store(lanes.permute(lanes.table(code), index), lanes.at(out.data, start, lanes.floats), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return decode_lanes


def _search(width: int):
    @intrinsic
    def search_lanes(typingctx, values, start, inv, table, q):
        """``nibbles.code_index`` on ``width`` lanes from ``start``: q = the number of midpoints
        below u = values * inv, by a branch-free binary search of 4 lookups of ``table`` (the 15
        sorted midpoints, then +inf); NaN to the last code."""
        sig = types.void(values, start, inv, table, q)

        def codegen(context, builder, signature, args):
            lanes = _Lanes(context, builder, signature, args, width)
            values, start, inv, table, q = lanes.args
            lanes.store_codes(lanes.count(lanes.table(table), lanes.scaled(values, start, inv), "<"), q, start)
            return context.get_dummy_value()

        return sig, codegen

    return search_lanes


def _stochastic(width: int, linear: bool):
    @intrinsic
    def stochastic_lanes(typingctx, values, start, inv, bounds, code, steps, key, first, q):
        """``nibbles._quantize_stochastic`` on ``width`` lanes from ``start``: k = the count of
        ``bounds`` (the codes after the first, then +inf) at or below u = values * inv, by the
        binary search of ``search_lanes`` (NaN to the last code); code[k] and steps[k] by a lookup
        each; each lane's hash of index ``first + start + lane`` (``codec.lowbias32_ir`` on every
        lane), its low 16 bits below (u - code[k]) * steps[k] rounding up. ``linear``: the map is
        ``LINEAR_CODES``, whose count needs no search (``_Lanes.count_linear``)."""
        sig = types.void(values, start, inv, bounds, code, steps, key, first, q)

        def codegen(context, builder, signature, args):
            lanes = _Lanes(context, builder, signature, args, width)
            values, start, inv, bounds, code, steps, key, first, q = lanes.args
            u = lanes.scaled(values, start, inv)
            index = lanes.count_linear(u) if linear else lanes.count(lanes.table(bounds), u, "<=")
            gap = builder.fmul(builder.fsub(u, lanes.permute(lanes.table(code), index)), lanes.permute(lanes.table(steps), index))
            base = builder.add(builder.trunc(first, lanes.i32), builder.trunc(start, lanes.i32))
            element = builder.add(lanes.splat(base, lanes.ints), ir.Constant(lanes.ints, list(range(width))))
            hashed = lowbias32_ir(builder, builder.xor(element, lanes.splat(builder.trunc(key, lanes.i32), lanes.ints)), lanes.const)
            r = builder.sitofp(builder.and_(hashed, lanes.const(0xFFFF)), lanes.floats)
            lanes.store_codes(builder.add(index, builder.zext(builder.fcmp_ordered("<", r, gap), lanes.ints)), q, start)
            return context.get_dummy_value()

        return sig, codegen

    return stochastic_lanes


DECODE = {width: _decode(width) for width in WIDTHS}
SEARCH = {width: _search(width) for width in WIDTHS}
STOCHASTIC = {width: _stochastic(width, False) for width in WIDTHS}
STOCHASTIC_LINEAR = {width: _stochastic(width, True) for width in WIDTHS}
