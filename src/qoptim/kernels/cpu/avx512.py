"""The AVX-512 path of the CPU kernel: the table lookups from registers, without gathers.

A gather fetches one table entry per lane from memory; on the CPUs we measured (Zen 5) it
costs ~2 cycles per lane, more than everything else in a step. The tables of the 8-bit states
are small enough to sit in vector registers instead, where AVX-512 permutes index them:

* Dequantizing, ``code[q]`` (256 floats = 1 KB) is split into four byte planes, byte ``k`` of
  every code. ``vpermi2b`` looks 64 codes up in 128 bytes at once (AVX512_VBMI); two of
  them and a blend on the code's top bit cover 256, and byte interleaves put the four planes
  back together as floats (``_plane_floats``). About 0.5 instructions per element, against
  one 4-byte gather.

* Quantizing, ``T(u) = #{midpoints < u}``: a first guess from a table of 512 bins (``guess``),
  indexed by u's top 16 bits in 16-bit lanes and read with ``vpermi2b``, exact after one
  comparison with ``midpoints[guess]``, looked up in byte planes like the codes
  (``quantize_guessed``, ~1.5 instructions per element). For a map whose bins do not fit,
  an 8-level branchless binary search with its midpoints in registers
  (``quantize_search``, ~3.5 per element): ``search`` holds the 255 midpoints in
  breadth-first (Eytzinger) order, node ``n`` at ``search[n]`` with children ``2n`` and
  ``2n + 1``; every level compares with the float itself (the sign of node - u), so the
  index is exact by construction, as ``torch.bucketize``'s. NaN and infinite u are settled
  apart on both.

A map's register tables are built once, in numpy, and laid out in one byte array
(``tables.register_tables``, which owns the offsets).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import guess
from .tables import BINS, CODE_PLANES, MID_PLANES, NAN_INDEX, OFFSETS, SEARCH, SHIFTS

__all__ = ["lookup_planes", "quantize_guessed", "quantize_search"]

SEARCH_GROUP = 16  # vectors of 16 searched side by side, to hide a level's latency
GUESS_UNITS = 4  # units of 64 guessed side by side (a 256-block), to hide a fix-up's latency

_F32, _I32, _I16, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8)
_BYTES, _WORDS, _FLOATS, _INTS = ir.VectorType(_I8, 64), ir.VectorType(_I16, 32), ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


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


# ---- byte-plane lookups -------------------------------------------------------------------

# Unpacking bytes, then words, of four planes works within 128-bit lanes, so its output vector m
# holds the floats of source dwords 4 * lane + m. Feeding it the indices with their dwords
# transposed (dword 4 * lane + m from dword 4 * m + lane) brings every float to its own place.
_TRANSPOSED = [4 * m + lane for lane in range(4) for m in range(4)]


def _load_registers(builder, tables, offset, count, vector_type=_BYTES):
    """``count`` 64-byte registers (as ``vector_type``) from ``offset`` of a register-tables array."""
    return [builder.load(_at(builder, tables.data, ir.Constant(_I32, offset + 64 * r), vector_type), align=1) for r in range(count)]


def _load_planes(builder, tables, offset):
    """The 16 registers of a byte-plane table at ``offset`` of a register-tables array."""
    return _load_registers(builder, tables, offset, 16)


def _plane_floats(builder, planes, indices):
    """The table entries at 64 byte ``indices``, as four vectors of 16 floats in order."""
    indices = builder.bitcast(indices, _INTS)
    indices = builder.bitcast(_shuffle(builder, indices, indices, _TRANSPOSED), _BYTES)
    upper = builder.icmp_signed("<", indices, ir.Constant(_BYTES, [0] * 64))  # entries 128-255
    b = []
    for k in range(4):  # byte k of each entry
        t = planes[4 * k : 4 * k + 4]
        b.append(builder.select(upper, _permute2(builder, t[2], indices, t[3]), _permute2(builder, t[0], indices, t[1])))

    def words(lo, high):  # bytes lo and lo + 1 of the entries, interleaved
        return builder.bitcast(_interleave(builder, b[lo], b[lo + 1], high), _WORDS)

    low01, high01, low23, high23 = words(0, False), words(0, True), words(2, False), words(2, True)
    return [builder.bitcast(_interleave(builder, x, y, high), _FLOATS) for x, y in ((low01, low23), (high01, high23)) for high in (False, True)]


def _concat(builder, parts):
    """One vector of the lanes of ``parts`` (a power of two of them), in order."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [_shuffle(builder, parts[i], parts[i + 1], list(range(2 * n))) for i in range(0, len(parts), 2)]
    return parts[0]


@intrinsic
def lookup_planes(typingctx, q, tables, out):
    """out[j] = code[q[j]] for the leading multiple of 64 elements; returns how many."""
    if not _contiguous(q, tables, out):
        return None
    sig = types.intp(q, tables, out)

    def codegen(context, builder, signature, args):
        q, tables, out = _arrays(context, builder, signature, args)
        planes = _load_planes(builder, tables, CODE_PLANES)

        def body(start):
            floats = _plane_floats(builder, planes, builder.load(_at(builder, q.data, start, _BYTES), align=1))
            for m, x in enumerate(floats):
                builder.store(x, _at(builder, out.data, builder.add(start, ir.Constant(start.type, 16 * m)), _FLOATS), align=4)

        return _chunked(builder, q.nitems, 64, body)

    return sig, codegen


# ---- quantizing: shared --------------------------------------------------------------------


def _settle_nonfinite(builder, n, u, above_all):
    """n where u is finite; else u's own index: NAN_INDEX for NaN (as torch.bucketize), 0 for
    -inf, ``above_all`` (the number of midpoints below +inf) for +inf. (The guess and the
    search may err on them: inf - inf is NaN.)"""
    infinite = builder.select(builder.fcmp_ordered(">", u, ir.Constant(_FLOATS, [0.0] * 16)), above_all, _ints(0))
    special = builder.select(builder.fcmp_unordered("uno", u, u), _ints(NAN_INDEX), infinite)
    magnitude = _call(builder, "llvm.fabs.v16f32", _FLOATS, [u])
    return builder.select(builder.fcmp_ordered("<", magnitude, ir.Constant(_FLOATS, [float("inf")] * 16)), n, special)


def _store_codes(builder, out, start, codes, us, above_all, finite):
    """out[start:] = ``codes`` (byte vectors, as many lanes as ``us`` has floats), settled where
    u is not finite (``_settle_nonfinite``). That takes a few instructions per vector, so it
    is done only where the caller cannot promise finite values (``finite``) and one test
    finds some non-finite u."""
    bytes16 = ir.VectorType(_I8, 16)

    def store_all():
        for i, c in enumerate(codes):
            at = builder.add(start, ir.Constant(start.type, c.type.count * i))
            builder.store(c, _at(builder, out.data, at, c.type), align=1)

    def store_settled():
        lanes = _concat(builder, codes) if len(codes) > 1 else codes[0]
        for i, u in enumerate(us):
            n = builder.zext(_shuffle(builder, lanes, lanes, list(range(16 * i, 16 * i + 16))), _INTS)
            at = builder.add(start, ir.Constant(start.type, 16 * i))
            builder.store(builder.trunc(_settle_nonfinite(builder, n, u, above_all), bytes16), _at(builder, out.data, at, bytes16), align=1)

    with builder.if_else(finite, likely=True) as (promised, unknown):
        with promised:
            store_all()
        with unknown:
            inf = ir.Constant(_FLOATS, [float("inf")] * 16)
            nonfinite = [builder.fcmp_unordered(">=", _call(builder, "llvm.fabs.v16f32", _FLOATS, [u]), inf) for u in us]  # NaN, ±inf
            mask = builder.bitcast(nonfinite[0], ir.IntType(16))
            for more in nonfinite[1:]:
                mask = builder.or_(mask, builder.bitcast(more, ir.IntType(16)))
            with builder.if_else(builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(16), 0)), likely=False) as (rare, common):
                with rare:
                    store_settled()
                with common:
                    store_all()


def _quantizer(body_size, unit):
    """An intrinsic (values, inv, tables, finite, out) -> elements done: the leading multiple
    of ``body_size`` vectors of ``out[j]`` = T(values[j] * inv), then of ``unit.vectors``;
    ``unit(builder, state, us)`` gives byte vectors of T for the u vectors ``us`` (exact for
    finite u), from what ``unit.prepare(builder, tables)`` loaded into registers."""

    def quantize(typingctx, values, inv, tables, finite, out):
        if not _contiguous(values, tables, out) or inv != types.float32 or finite != types.boolean:
            return None
        sig = types.intp(values, inv, tables, finite, out)

        def codegen(context, builder, signature, args):
            values, inv, tables, finite, out = _arrays(context, builder, signature, args)
            search = _at(builder, tables.data, ir.Constant(_I32, SEARCH), _F32)
            above_all = _splat(builder, builder.fptosi(builder.load(search, align=1), _I32), _INTS)
            scale = _splat(builder, inv, _FLOATS)
            finite = builder.trunc(finite, ir.IntType(1)) if finite.type != ir.IntType(1) else finite

            def vectors(count):
                def body(start):
                    us = []
                    for i in range(count):
                        at = builder.add(start, ir.Constant(start.type, 16 * i))
                        us.append(builder.fmul(builder.load(_at(builder, values.data, at, _FLOATS), align=4), scale))
                    # the tables are read here, in the loop, and so from L1 as the instructions
                    # need them: loaded once before it, they would be spilled to the stack
                    # at every call, ~100 cycles, as much as quantizing 64 elements
                    _store_codes(builder, out, start, unit(builder, unit.prepare(builder, tables), us), us, above_all, finite)

                return body

            n = values.nitems
            done = _chunked(builder, n, 16 * body_size, vectors(body_size))  # (body_size: in vectors)
            rest = _chunked(builder, builder.sub(n, done), 16 * unit.vectors, lambda start: vectors(unit.vectors)(builder.add(done, start)))
            return builder.add(done, rest)

        return sig, codegen

    return intrinsic(quantize)


# ---- quantizing: guess and fix up ------------------------------------------------------------


def _ternary(builder, a, b, c, f):
    """vpternlogd: the bitwise function f(a, b, c) of three int vectors, in one instruction."""
    imm = sum(f(x, y, z) << (4 * x + 2 * y + z) for x in (0, 1) for y in (0, 1) for z in (0, 1))
    return _call(builder, "llvm.x86.avx512.pternlog.d.512", _INTS, [a, b, c, ir.Constant(_I32, imm)])


def _words(builder, x):
    return builder.bitcast(x, _WORDS)


def _permute2_words(builder, low, index, high):
    """Words of the concatenation low | high at ``index`` (low 6 bits): vpermi2w."""
    return _call(builder, "llvm.x86.avx512.vpermi2var.hi.512", _WORDS, [low, index, high])


def _bin_indices(builder, shifts, offsets, pair):
    """The bin (``guess``) of each u of two vectors, as 32 words (the top halves of u's bits)."""
    w = _shuffle(builder, _words(builder, pair[0]), _words(builder, pair[1]), [2 * k + 1 for k in range(32)])

    def words(x):
        return ir.Constant(_WORDS, [x] * 32)

    m = builder.and_(w, words(0x7FFF))
    m = _call(builder, "llvm.umin.v32i16", _WORDS, [_call(builder, "llvm.umax.v32i16", _WORDS, [m, words(guess.LOW)]), words(guess.HIGH)])
    # the row, sign << 5 | exponent - 96: the exponent's low 5 bits are that difference (the
    # clamp keeps it within 96..127), and its bit 5, always set, is swapped for the sign
    exponent = builder.lshr(m, words(guess.MANTISSA_BITS))
    row = builder.bitcast(_ternary(builder, builder.bitcast(exponent, _INTS), builder.bitcast(builder.lshr(w, words(10)), _INTS), _ints(0x00200020), lambda e, s, k: (e & ~k) | (s & k)), _WORDS)
    shift = _permute2_words(builder, shifts[0], row, shifts[1])
    return builder.add(builder.lshr(m, shift), _permute2_words(builder, offsets[0], row, offsets[1]))


def _binned(builder, state, us):
    """T(u) for 64 u at a time: a guess from the bins of ``guess``, fixed up by one comparison
    with its midpoint (a guess is T(u) or T(u) - 1: one more where its midpoint is below u).

    A fix-up waits on its guess through a long chain of permutes (~30 cycles), so all the
    guesses of a call come first, and the core overlaps the next unit's guess with this one's
    fix-up: with four units per call (``GUESS_UNITS``), 0.139 -> 0.107 ns per element."""
    shifts, offsets, bins, mid_planes = state
    groups = [us[i : i + 4] for i in range(0, len(us), 4)]
    guesses = [_bin_guesses(builder, shifts, offsets, bins, group) for group in groups]
    codes = []
    for group, first in zip(groups, guesses):
        below = _concat(builder, [builder.fcmp_ordered("<", mid, u) for mid, u in zip(_plane_floats(builder, mid_planes, first), group)])
        codes.append(builder.add(first, builder.zext(below, _BYTES)))
    return codes


def _bin_guesses(builder, shifts, offsets, bins, group):
    """The bins' guesses for 64 u, as bytes."""
    first, second = (builder.bitcast(_bin_indices(builder, shifts, offsets, group[k : k + 2]), _BYTES) for k in (0, 2))
    low = _shuffle(builder, first, second, [2 * k for k in range(64)])  # bits 0-7 of each bin
    high = _shuffle(builder, first, second, [2 * k + 1 for k in range(64)])  # bit 8
    upper = builder.icmp_signed("<", low, ir.Constant(_BYTES, [0] * 64))  # bit 7
    quarters = [_permute2(builder, bins[2 * k], low, bins[2 * k + 1]) for k in range(4)]  # bins 128k + low 7 bits
    halves = [builder.select(upper, quarters[k + 1], quarters[k]) for k in (0, 2)]
    beyond = builder.icmp_unsigned("!=", builder.and_(high, ir.Constant(_BYTES, [1] * 64)), ir.Constant(_BYTES, [0] * 64))
    return builder.select(beyond, halves[1], halves[0])


def _prepare_bins(builder, tables):
    words = [_load_registers(builder, tables, offset, 2, _WORDS) for offset in (SHIFTS, OFFSETS)]
    return *words, _load_registers(builder, tables, BINS, 8), _load_planes(builder, tables, MID_PLANES)


_binned.prepare = _prepare_bins
_binned.vectors = 4
quantize_guessed = _quantizer(4 * GUESS_UNITS, _binned)


# ---- quantizing: binary search -------------------------------------------------------------


def _node(builder, registers, n):
    """search[n] for a vector of nodes ``n`` of one level, ``registers`` the level's part of
    the tree as 16-float registers. A level of up to 16 nodes is one register, read with
    vpermps (its index is n's low 4 bits, and it overwrites no operand); a larger one picks
    among vpermi2ps of register pairs by n's bits 5 and up."""
    if len(registers) == 1:
        return _call(builder, "llvm.x86.avx512.permvar.sf.512", _FLOATS, [registers[0], n])
    candidates = [_permute2(builder, registers[i], n, registers[i + 1]) for i in range(0, len(registers), 2)]
    bit = 5
    while len(candidates) > 1:
        odd = builder.icmp_unsigned("!=", builder.and_(n, _ints(1 << bit)), _ints(0))
        candidates = [builder.select(odd, candidates[i + 1], candidates[i]) for i in range(0, len(candidates), 2)]
        bit += 1
    return candidates[0]


def _searched(builder, tree, us):
    """For each u vector of ``us``, the number of midpoints below u (finite u). The vectors
    advance level by level together; a level appends its comparison's bit to n with one
    funnel shift (vpshldd), n = n << 1 | sign(node - u). The sign of node - u is exact for
    finite u: nodes hold +0 for -0, so 0 - u has the sign of -u even for u = 0. (It also keeps
    the search out of mask registers, whose results come late on Zen 5.)"""
    levels = [tree[0:1]] * 4 + [tree[1:2], tree[2:4], tree[4:8], tree[8:16]]  # nodes < 16, < 32, < 64, < 128, < 256
    root = _splat(builder, builder.extract_element(tree[0], ir.Constant(_I32, 1)), _FLOATS)
    ns = [_ints(1)] * len(us)
    for level, registers in enumerate(levels):
        for i, u in enumerate(us):
            node = root if level == 0 else _node(builder, registers, ns[i])
            difference = builder.bitcast(builder.fsub(node, u), _INTS)
            ns[i] = _call(builder, "llvm.fshl.v16i32", _INTS, [ns[i], difference, _ints(1)])
    return [builder.trunc(n, ir.VectorType(_I8, 16)) for n in ns]  # 256 + T after 8 levels: its low byte is T


def _prepare_search(builder, tables):
    return _load_registers(builder, tables, SEARCH, 16, _FLOATS)


_searched.prepare = _prepare_search
_searched.vectors = 1
quantize_search = _quantizer(SEARCH_GROUP, _searched)
