"""The three paths of the table lookups, the CPU features that pick one, and the fall-back.

Dequantizing and quantizing look entries up in small tables, which LLVM's own vectorizer leaves
scalar. On CPUs with AVX-512 VBMI the kernels look them up in tables held in registers, 64 and
16 lanes at a time (``avx512``); on CPUs with AVX2, with ``llvm.masked.gather`` intrinsics (256-
entry maps, ``gather``) and two-register ``vpermps`` lookups (16-entry ones, ``nibble_lanes``), 8
lanes at a time; elsewhere, or with ``QOPTIM_CPU_PORTABLE=1`` (read at import), with plain
scalar loops. The rules' math is auto-vectorized on all of them.

A path is a marker argument of the kernels, told apart by its type, so each path is its own
compiled (and cached) specialization and the portable one never contains an intrinsic: if a
vectorized one fails to compile (another numba/llvmlite), ``on_best_path`` hands over to the
next path down, for good, with a warning. Tests and benchmarks pick a path with ``force``.
Features say which paths a CPU can run, not which is fastest: where it can run both vector
paths, the first step takes the one ``calibrate`` measures faster (``measure_with``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable, Iterator, NamedTuple, TypeVar

import numba
from llvmlite import binding as llvm_binding
from numba.core import types

from .gather import LANES

__all__ = ["AVX2", "AVX512", "EIGHT_BIT", "EIGHT_BIT_DRAWN", "FOUR_BIT", "HAS_AVX2", "HAS_AVX512", "KINDS", "PORTABLE", "PermutePath", "PortablePath", "VectorPath", "current", "force", "is_path", "lower", "measure_with", "on_best_path", "target_features"]


class PermutePath(NamedTuple):
    """Marker argument: compile the kernels with the register-permute lookups (AVX-512 VBMI, ``avx512``)."""

    lanes: int


class VectorPath(NamedTuple):
    """Marker argument: compile the kernels with AVX2's lookups: gathers (``gather``) and, for
    16-code maps, two-register ``vpermps`` (``nibble_lanes``)."""

    lanes: int


class PortablePath(NamedTuple):
    """Marker argument: compile the kernels from plain scalar loops only."""

    lanes: int


AVX512, AVX2, PORTABLE = PermutePath(16), VectorPath(LANES), PortablePath(1)


def target_features() -> dict[str, bool]:
    """The CPU features Numba compiles for: ``NUMBA_CPU_FEATURES``'s where set (an LLVM feature
    string, "+avx2,-avx512f,..."; ``NUMBA_CPU_NAME=generic`` sets none), else the host's. An
    intrinsic of a feature the target lacks does not fall back: LLVM aborts the process."""
    named = numba.core.config.CPU_FEATURES
    if named is None:
        return dict(llvm_binding.get_host_cpu_features())
    return {f[1:]: f[0] == "+" for f in named.split(",") if len(f) > 1 and f[0] in "+-"}


AVX512_FEATURES = ("avx512f", "avx512bw", "avx512vbmi")  # what the permute path needs of the CPU
_FEATURES = target_features()
HAS_AVX512 = all(_FEATURES.get(f) for f in AVX512_FEATURES)
# AVX2's hardware gathers and ``vpermps`` (without AVX2 LLVM emulates the gathers, the 4-bit lookups
# take the scalar loops, and the portable path runs unless forced)
HAS_AVX2 = bool(_FEATURES.get("avx2"))
PORTABLE_ONLY = os.environ.get("QOPTIM_CPU_PORTABLE", "") not in ("", "0")


# The kernels whose path is chosen apart: their lookups differ (256-entry maps, 16-entry ones; an
# 8-bit state rounded stochastically looks up two more tables per block, its floor code's value and
# step), and so does which path is fastest (an Intel Xeon: AVX2 for the 8-bit ones rounded to
# nearest, AVX-512 for those with a draw and for the 4-bit ones)
EIGHT_BIT, EIGHT_BIT_DRAWN, FOUR_BIT = "8-bit", "8-bit drawn", "4-bit"
KINDS = (EIGHT_BIT, EIGHT_BIT_DRAWN, FOUR_BIT)


class _Selection:
    """The path steps take now: the best this CPU has, until a fall-back or ``force`` moves it;
    and for each kind of kernel the one measured fastest on it (``measure_with``), where lower."""

    path: NamedTuple = PORTABLE if PORTABLE_ONLY or not HAS_AVX2 else AVX512 if HAS_AVX512 else AVX2
    chosen: dict[str, NamedTuple] = {}  # kind -> its measured path
    measure: Callable[[NamedTuple], dict[str, NamedTuple]] | None = None  # (``measure_with``) None: measured, or nothing to
    forced = 0  # ``force`` blocks open: their steps take the forced path, and measure nothing


_MEASURING = threading.Lock()


def measure_with(choose: Callable[[NamedTuple], dict[str, NamedTuple]]) -> None:
    """The first step that runs outside ``force`` asks ``choose(the path the features pick)`` for
    each kind's path (``calibrate``: features tell which paths a CPU can run, not which is fastest)."""
    _Selection.measure = choose if not PORTABLE_ONLY else None


def current(kind: str = EIGHT_BIT) -> NamedTuple:
    """The path the next step of a ``kind`` kernel takes (read on every step): the forced one in
    ``force``, else its measured one, unless a fall-back has since moved every kernel below it."""
    if _Selection.measure is not None and not _Selection.forced:
        with _MEASURING:  # (steps of other threads wait for the measurement, and take its answer)
            measure, _Selection.measure = _Selection.measure, None  # (once: the measuring steps run forced)
            try:
                _Selection.chosen = dict(measure(_Selection.path)) if measure is not None else _Selection.chosen
            except BaseException:  # (a bad QOPTIM_CPU_PATH, say: every step says so, none goes on unmeasured)
                _Selection.measure = measure
                raise
    base = _Selection.path
    return base if _Selection.forced else lower(_Selection.chosen.get(kind, base), base)


def lower(a: NamedTuple, b: NamedTuple) -> NamedTuple:
    """The lower of two paths (AVX512 above AVX2 above PORTABLE): a measured path, unless a
    fall-back has moved every kernel below it."""
    rank = {id(AVX512): 2, id(AVX2): 1, id(PORTABLE): 0}
    return a if rank[id(a)] <= rank[id(b)] else b


@contextlib.contextmanager
def force(path: NamedTuple) -> Iterator[NamedTuple]:
    """Steps in the block take ``path`` (AVX512, AVX2 or PORTABLE), for tests and benchmarks;
    the path before is back afterwards. AVX2 runs on any x86 CPU (LLVM emulates gathers where
    the hardware has none: slower, still correct); AVX512 only where ``HAS_AVX512``."""
    before = _Selection.path
    _Selection.path = path
    _Selection.forced += 1
    try:
        yield path
    finally:
        _Selection.path = before
        _Selection.forced -= 1


R = TypeVar("R")


def on_best_path(run: Callable[[NamedTuple], R], kind: str = EIGHT_BIT) -> R:
    """``run(path)`` on the best path for a ``kind`` kernel that compiles (a kernel that fails
    to compile has written nothing)."""
    while True:
        path = current(kind)
        try:
            return run(path)
        except (numba.core.errors.NumbaError, RuntimeError) as e:
            if path is PORTABLE:
                raise
            _give_up(path, e, kind)


def _give_up(path: NamedTuple, error: Exception, kind: str) -> None:
    """After a vectorized kernel failed to compile: the AVX-512 path hands over to the AVX2
    one, the AVX2 one to the portable one; for every kernel where it was the path the features
    picked, else for the kernels of ``kind`` (their measured path)."""
    below, failed, instead = (AVX2, "AVX-512", "the AVX2 one") if path is AVX512 else (PORTABLE, "AVX2", "the portable one")
    if path is _Selection.path:
        _Selection.path = below
    else:
        _Selection.chosen[kind] = below
    warnings.warn(
        f"qoptim: the {failed} CPU kernel failed to compile ({type(error).__name__}: {str(error)[:200]}); using {instead}",
        RuntimeWarning,
        stacklevel=4,
    )


def is_path(path, marker: type) -> bool:
    """Whether the Numba type ``path`` is that of the path marker class ``marker`` (in overloads)."""
    return isinstance(path, types.BaseNamedTuple) and path.instance_class is marker
