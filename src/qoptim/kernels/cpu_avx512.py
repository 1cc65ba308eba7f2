"""The AVX-512 path of the CPU kernel: the table lookups from registers, without gathers.

A gather fetches one table entry per lane from memory; on the CPUs we measured (Zen 5) it
costs more than everything else in a step. Both tables of the 8-bit states are small enough
to sit in vector registers instead, where AVX-512 permutes index them:

* Dequantizing, ``code[q]`` (256 floats = 1 KB) is split into four byte planes, byte ``k`` of
  every code (``planes``: 4 x 256 bytes = 16 zmm registers). ``vpermi2b`` looks 64 codes up in
  128 bytes at once (AVX512_VBMI); two of them and a blend on the code's top bit cover 256,
  and byte interleaves put the four planes back together as floats. About 0.5 instructions
  per element, against one 4-byte gather.

* Quantizing, ``#{midpoints < u}``, is an 8-level branchless binary search whose midpoints
  come from registers: ``search`` holds the 255 midpoints in breadth-first (Eytzinger) order,
  node ``n`` at ``search[n]`` with children ``2n`` and ``2n + 1``, so every level reads
  ``search[n]`` with a ``vpermi2ps`` (two registers hold the 31 nodes of levels 0-4, two the
  32 of level 5, and a tree of selects joins the 64 and 128 nodes of the last two). Each
  level compares with the float itself (the sign of node - u), so the index is exact by
  construction, as ``torch.bucketize``'s; NaN and infinite u are settled apart. A level waits
  for the one before, so ``GROUP`` vectors are searched side by side. About 3.5 instructions
  per element, against a 4-byte gather from a 256 KB table and two more.

Both tables are derived from the map inside the kernel (``fill_tables``), once per task.
Numba's on-disk cache knows the source files of the kernels (cpu.py), not of this module:
after editing this file, touch cpu.py or clear the cache.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_tables import NAN_INDEX

PLANES = 4 * 256  # bytes of the dequantizing table
SEARCH = 256  # floats of the quantizing table (node 0 unused)
GROUP = 8  # vectors of 16 searched side by side: enough to hide a level's latency, few enough for the registers
FEATURES = ("avx512f", "avx512bw", "avx512vbmi")  # what the path needs of the CPU

_F32, _I32, _I16, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8)
_BYTES, _WORDS, _FLOATS, _INTS = ir.VectorType(_I8, 64), ir.VectorType(_I16, 32), ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


@njit(cache=True)
def fill_tables(code, mids, planes, search):
    """``planes`` (uint8[PLANES]) and ``search`` (float32[SEARCH]) of a map and its midpoints."""
    bits = code.view(np.uint32)
    for i in range(256):
        for k in range(4):
            planes[k * 256 + i] = (bits[i] >> (8 * k)) & 0xFF
    below_inf = 0
    for i in range(255):
        below_inf += mids[i] < np.inf
    search[0] = below_inf  # the index of +inf (node 0 is not part of the tree)
    level = 0
    for n in range(1, 256):
        if n >= 2 << level:
            level += 1
        step = 128 >> level  # the search's step at this level; node n splits [j * 2 * step, (j + 1) * 2 * step)
        search[n] = mids[(2 * (n - (1 << level)) + 1) * step - 1] + np.float32(0.0)  # -0 as +0: see _below


# ---- IR helpers ---------------------------------------------------------------------------------


def _arrays(context, builder, signature, args):
    return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a for t, a in zip(signature.args, args)]


def _at(builder, data, index, vector_type):
    """Pointer to a vector of ``vector_type`` at element ``index`` of ``data``."""
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


def _ints(x):
    return ir.Constant(_INTS, [x] * 16)


def _splat(builder, scalar, vector_type):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(_INTS, [0] * 16))


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _call(builder, name, returns, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, [a.type for a in args]), name)
    return builder.call(fn, args)


def _permute2(builder, low, index, high):
    """Lanes of the concatenation low | high at ``index`` (low bits): vpermi2b / vpermi2ps."""
    kind = "qi" if low.type == _BYTES else "ps"
    return _call(builder, f"llvm.x86.avx512.vpermi2var.{kind}.512", low.type, [low, index, high])


def _interleave(builder, a, b, high):
    """vpunpck{l,h}{bw,wd}: in each 128-bit lane, the low (``high``: upper) halves of ``a`` and
    ``b`` element by element."""
    n = a.type.count
    per_lane = n // 4
    mask = []
    for lane in range(4):
        base = lane * per_lane + (per_lane // 2 if high else 0)
        for j in range(per_lane // 2):
            mask += [base + j, n + base + j]
    return _shuffle(builder, a, b, mask)


def _chunked(builder, count, size, body):
    """Emit ``body(start)`` for ``start`` = 0, size, ... below ``count`` (an intp); returns
    the elements done."""
    chunks = builder.udiv(count, ir.Constant(count.type, size))
    with cgutils.for_range(builder, chunks) as loop:
        body(builder.mul(loop.index, ir.Constant(count.type, size)))
    return builder.mul(chunks, ir.Constant(count.type, size))


def _contiguous(*arrays):
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)


# ---- dequantizing -------------------------------------------------------------------------------

# Unpacking bytes, then words, of four planes works within 128-bit lanes, so its output vector m
# holds the floats of source dwords 4 * lane + m. Feeding it the codes with their dwords
# transposed (dword 4 * lane + m from dword 4 * m + lane) brings every float to its own place.
_TRANSPOSED = [4 * m + lane for lane in range(4) for m in range(4)]


@intrinsic
def lookup_planes(typingctx, q, planes, out):
    """out[j] = code[q[j]] for the leading multiple of 64 elements; returns how many."""
    if not _contiguous(q, planes, out):
        return None
    sig = types.intp(q, planes, out)

    def codegen(context, builder, signature, args):
        q, planes, out = _arrays(context, builder, signature, args)
        tables = [builder.load(_at(builder, planes.data, ir.Constant(_I32, 64 * r), _BYTES), align=1) for r in range(16)]

        def body(start):
            codes = builder.bitcast(builder.load(_at(builder, q.data, start, _BYTES), align=1), _INTS)
            codes = builder.bitcast(_shuffle(builder, codes, codes, _TRANSPOSED), _BYTES)
            upper = builder.icmp_signed("<", codes, ir.Constant(_BYTES, [0] * 64))  # codes 128-255
            b = []
            for k in range(4):  # byte k of each code
                t = tables[4 * k : 4 * k + 4]
                b.append(builder.select(upper, _permute2(builder, t[2], codes, t[3]), _permute2(builder, t[0], codes, t[1])))

            def words(lo, high):  # bytes lo and lo + 1 of the codes, interleaved
                return builder.bitcast(_interleave(builder, b[lo], b[lo + 1], high), _WORDS)

            low01, high01, low23, high23 = words(0, False), words(0, True), words(2, False), words(2, True)
            floats = [_interleave(builder, x, y, high) for x, y in ((low01, low23), (high01, high23)) for high in (False, True)]
            for m, x in enumerate(floats):
                index = builder.add(start, ir.Constant(start.type, 16 * m))
                builder.store(builder.bitcast(x, _FLOATS), _at(builder, out.data, index, _FLOATS), align=4)

        return _chunked(builder, q.nitems, 64, body)

    return sig, codegen


# ---- quantizing ---------------------------------------------------------------------------------


def _node(builder, tables, n):
    """search[n] for a vector of nodes ``n`` of one level: tables holds search as 16-float
    registers; a level with more than 32 nodes picks among vpermi2ps of register pairs by n's
    bits 5 and up."""
    candidates = [_permute2(builder, tables[i], n, tables[i + 1]) for i in range(0, len(tables), 2)]
    bit = 5
    while len(candidates) > 1:
        odd = builder.icmp_unsigned("!=", builder.and_(n, _ints(1 << bit)), _ints(0))
        candidates = [builder.select(odd, candidates[i + 1], candidates[i]) for i in range(0, len(candidates), 2)]
        bit += 1
    return candidates[0]


def _search(builder, tables, root, us):
    """For each float vector of ``us``, 256 + the number of midpoints below u, for finite u.
    The vectors advance level by level together."""
    levels = [tables[0:2]] * 5 + [tables[2:4], tables[4:8], tables[8:16]]  # nodes < 32, < 64, < 128, < 256
    ns = [_ints(1)] * len(us)
    for level, regs in enumerate(levels):
        for i, u in enumerate(us):
            node = root if level == 0 else _node(builder, regs, ns[i])
            ns[i] = builder.add(builder.add(ns[i], ns[i]), _below(builder, node, u))
    return ns


def _below(builder, node, u):
    """1 where node < u, else 0: the sign of node - u. It is exact for finite u (nodes hold +0
    for -0, so 0 - u has the sign of -u even for u = 0), and keeps the search out of mask
    registers (a compare's result on Zen 5 comes late, and the search is a chain of them)."""
    difference = builder.bitcast(builder.fsub(node, u), _INTS)
    return builder.lshr(difference, _ints(31))


def _settle_nonfinite(builder, n, u, above_all):
    """n where u is finite; else u's own index: NAN_INDEX for NaN (as torch.bucketize), 0 for
    -inf, ``above_all`` (the number of midpoints below +inf) for +inf. (The search may err
    on them: inf - inf is NaN.)"""
    infinite = builder.select(builder.fcmp_ordered(">", u, ir.Constant(_FLOATS, [0.0] * 16)), above_all, _ints(0))
    special = builder.select(builder.fcmp_unordered("uno", u, u), _ints(NAN_INDEX), infinite)
    magnitude = _call(builder, "llvm.fabs.v16f32", _FLOATS, [u])
    return builder.select(builder.fcmp_ordered("<", magnitude, ir.Constant(_FLOATS, [float("inf")] * 16)), n, special)


def _store_codes(builder, out, offsets, ns, us, above_all):
    """out at each offset = the low byte of n (the index), settled where u is not finite
    (``_settle_nonfinite``). That takes a few instructions per vector, so it is done only
    for a group with some non-finite u, told by one test for the group."""

    def store(settle):
        for at, n, u in zip(offsets, ns, us):
            n = _settle_nonfinite(builder, n, u, above_all) if settle else n
            builder.store(builder.trunc(n, ir.VectorType(_I8, 16)), _at(builder, out.data, at, ir.VectorType(_I8, 16)), align=1)

    inf = ir.Constant(_FLOATS, [float("inf")] * 16)
    nonfinite = [builder.fcmp_unordered(">=", _call(builder, "llvm.fabs.v16f32", _FLOATS, [u]), inf) for u in us]  # NaN, ±inf
    mask = builder.bitcast(nonfinite[0], ir.IntType(16))
    for more in nonfinite[1:]:
        mask = builder.or_(mask, builder.bitcast(more, ir.IntType(16)))
    with builder.if_else(builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(16), 0)), likely=False) as (rare, common):
        with rare:
            store(True)
        with common:
            store(False)


@intrinsic
def quantize_search(typingctx, values, inv, search, out):
    """out[j] = index of the code nearest to values[j] * inv for the leading multiple of 16
    elements; returns how many."""
    if not _contiguous(values, search, out) or inv != types.float32:
        return None
    sig = types.intp(values, inv, search, out)

    def codegen(context, builder, signature, args):
        values, inv, search, out = _arrays(context, builder, signature, args)
        tables = [builder.load(_at(builder, search.data, ir.Constant(_I32, 16 * r), _FLOATS), align=4) for r in range(16)]
        root = _splat(builder, builder.extract_element(tables[0], ir.Constant(_I32, 1)), _FLOATS)
        above_all = _splat(builder, builder.fptosi(builder.extract_element(tables[0], ir.Constant(_I32, 0)), _I32), _INTS)
        scale = _splat(builder, inv, _FLOATS)

        def vectors(count):
            def body(start):
                offsets = [builder.add(start, ir.Constant(start.type, 16 * i)) for i in range(count)]
                us = [builder.fmul(builder.load(_at(builder, values.data, at, _FLOATS), align=4), scale) for at in offsets]
                _store_codes(builder, out, offsets, _search(builder, tables, root, us), us, above_all)

            return body

        n = values.nitems
        done = _chunked(builder, n, 16 * GROUP, vectors(GROUP))
        left = builder.sub(n, done)
        rest = _chunked(builder, left, 16, lambda start: vectors(1)(builder.add(done, start)))
        return builder.add(done, rest)

    return sig, codegen
