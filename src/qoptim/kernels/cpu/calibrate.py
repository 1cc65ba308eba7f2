"""Which lookup path each kind of CPU kernel takes where the CPU can run more than one: measured
once, remembered.

A CPU's features say which paths it can run (``paths``), not which is fastest, and the answer
differs between kernels. On Zen 5 the AVX-512 permutes step ~2.5x faster than the AVX2 gathers;
on an Intel Xeon with AVX-512 VBMI (LLVM's ``rocketlake``), one thread, 1M bf16 elements, the
AVX2 path's 8-bit Adam step took 1.64-1.72 ns per element against 1.84-1.86 on the AVX-512 path,
but with the second moment rounded stochastically 2.65-2.74 against 2.27-2.31 (its two more
table lookups per block are gathers on AVX2), and the 4-bit one 2.08-2.15 against 1.66-1.67. So
the first step on a CPU with both times one AdamW step of ``ELEMENTS`` fp32 elements of each
kind (``paths.KINDS``: 8-bit states, 8-bit with the second moment rounded stochastically, 4-bit)
on each path, one thread, alternating, best of ``ROUNDS``, and gives a kind the AVX2 path only
if it is at least ``MARGIN`` faster there (timings near a tie keep the default). Both paths give
the same results bit for bit: the choice changes speed only.

The answers are kept in ``cpu-paths.json`` of qoptim's cache folder (``$XDG_CACHE_HOME/qoptim``,
else ``~/.cache/qoptim``), keyed by LLVM's name of the CPU, its features and the kernels'
sources, so that later processes read them (a folder that cannot be written: measured in each
process). ``QOPTIM_CPU_PATH`` = ``avx512``, ``avx2`` or ``portable`` gives every kernel that path
without measuring (read at the first step).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from llvmlite import binding as llvm_binding

from ...quant.formats import FORMATS, STOCHASTIC_ROUNDING, state_map
from ...quant.maps import signed_map, unsigned_map
from ...quant.master import Draw
from ..types import Hyper, StateSlot
from . import paths, step
from .cache import SOURCES_DIGEST
from .layout import Layout

__all__ = ["ELEMENTS", "MARGIN", "NAMES", "ROUNDS", "cache_file", "choose", "faster_path", "key", "pick", "workload"]

ELEMENTS = 1 << 20  # elements of the timed step (~2 ms on one thread): large enough to stream from memory
ROUNDS = 7
MARGIN = 0.03  # how much faster the AVX2 path must be to be taken instead of the AVX-512 one
_DRAW = Draw(0x9E3779B9)  # the timed steps' draw, where a kind rounds stochastically (any key times alike)
NAMES = {"avx512": paths.AVX512, "avx2": paths.AVX2, "portable": paths.PORTABLE}


def choose(default: NamedTuple) -> dict[str, NamedTuple]:
    """Each kind's path for this process (``paths.measure_with``): ``QOPTIM_CPU_PATH``'s, else
    where the features pick the AVX-512 one the faster of it and AVX2's (remembered), else none
    (every kernel on ``default``)."""
    named = os.environ.get("QOPTIM_CPU_PATH", "").strip().lower()
    if named:
        if named not in NAMES:
            raise ValueError(f"QOPTIM_CPU_PATH must be one of {sorted(NAMES)}, got {named!r}")
        if NAMES[named] is paths.AVX512 and not paths.HAS_AVX512:
            raise ValueError(f"QOPTIM_CPU_PATH=avx512, but this CPU lacks {', '.join(paths.AVX512_FEATURES)}")
        return dict.fromkeys(paths.KINDS, NAMES[named])
    if default is not paths.AVX512:  # (no choice to measure)
        return {}
    remembered = _read().get(key())
    if isinstance(remembered, dict) and set(remembered) == set(paths.KINDS) and set(remembered.values()) <= set(NAMES):
        return {kind: NAMES[name] for kind, name in remembered.items()}
    chosen = {kind: faster_path(kind) for kind in paths.KINDS}
    _remember({kind: next(name for name, path in NAMES.items() if path is chosen[kind]) for kind in paths.KINDS})
    return chosen


def faster_path(kind: str) -> NamedTuple:
    """For the kernels of ``kind``: AVX2 where its step is at least ``MARGIN`` faster than the
    AVX-512 one's, else AVX-512 (also where the AVX2 one does not compile)."""
    seconds = {paths.AVX512: [], paths.AVX2: []}
    try:
        layout, p, g, slots, hp = workload(kind)
        for _ in range(ROUNDS + 1):  # (the first round compiles, or loads from the disk cache: not counted)
            for path, times in seconds.items():
                with paths.force(path):
                    start = time.perf_counter()
                    step.run("adam", layout, p, g, slots, hp, True, 1)
                    times.append(time.perf_counter() - start)
    except Exception as e:  # (whatever it is, the step it runs in must not fail for it: the default path)
        warnings.warn(f"qoptim: timing the CPU kernel's paths failed ({type(e).__name__}: {str(e)[:200]}); using the AVX-512 one",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return paths.AVX512
    return pick(*(min(times[1:]) for times in seconds.values()))


def pick(avx512_seconds: float, avx2_seconds: float) -> NamedTuple:
    """The AVX2 path where its step took at least ``MARGIN`` less time than the AVX-512 one's."""
    return paths.AVX2 if avx2_seconds < avx512_seconds * (1 - MARGIN) else paths.AVX512


def workload(kind: str) -> tuple:
    """The layout of ``kind``'s states, an fp32 parameter with AdamW's states so kept (8-bit in
    256-blocks, or 4-bit sharing a byte, in 128-blocks; the second moment rounded stochastically
    where the kind draws, and in 4 bits, where that is the format's rounding), a gradient and a
    step's hyperparameters."""
    gen = torch.Generator().manual_seed(0)
    cpu32 = dict(dtype=torch.float32, device="cpu")  # (whatever the process's default dtype and device)
    p = torch.randn(ELEMENTS, generator=gen, **cpu32) * 0.1
    g = torch.randn(ELEMENTS, generator=gen, **cpu32) * 0.01
    hp = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10, decoupled=True)
    if kind == paths.FOUR_BIT:
        fmt = FORMATS[4]
        codes = torch.full((ELEMENTS,), 0x77, dtype=torch.uint8, device="cpu")  # (both states mid-map: any codes time alike)
        scales = -(-ELEMENTS // fmt.blocksize)
        drawn = _DRAW if fmt.unsigned_rounding == STOCHASTIC_ROUNDING else None
        slots = [StateSlot(codes, state_map(fmt.map_name(signed)), torch.full((scales,), 1e-3, **cpu32), fmt.blocksize, shift, draw)
                 for signed, shift, draw in ((True, 0, None), (False, 4, drawn))]  # fmt: skip
        return Layout.FOUR_BIT, p, g, slots, hp
    blocks = -(-ELEMENTS // 256)
    drawn = _DRAW if kind == paths.EIGHT_BIT_DRAWN else None
    slots = [StateSlot(torch.full((ELEMENTS,), 127, dtype=torch.uint8, device="cpu"), code, torch.full((blocks,), 1e-3, **cpu32), draw=draw)
             for code, draw in ((signed_map(), None), (unsigned_map(), drawn))]  # fmt: skip
    return Layout.BLOCK, p, g, slots, hp


def key() -> str:
    """What a remembered answer holds for: this CPU (LLVM's name and features) and the kernels' sources."""
    features = hashlib.sha256(llvm_binding.get_host_cpu_features().flatten().encode()).hexdigest()[:16]
    return f"{llvm_binding.get_host_cpu_name()}/{features}/{SOURCES_DIGEST[:16]}"


def cache_file() -> Path:
    """Where the answers are kept (``Path.home`` raises RuntimeError where there is no home)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qoptim" / "cpu-paths.json"


def _read() -> dict:
    try:
        remembered = json.loads(cache_file().read_text())
    except (OSError, RuntimeError, ValueError):  # none yet, unreadable, or no home: measure
        return {}
    return remembered if isinstance(remembered, dict) else {}


def _remember(chosen: dict[str, str]) -> None:
    """Add this CPU's answers to the file (written whole, then renamed: readers never see half of it)."""
    try:
        path = cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({**_read(), key(): chosen}, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except (OSError, RuntimeError):  # a read-only home, or none: measured again by the next process
        pass
