"""Which lookup path steps take on a CPU that can run more than one: measured once, remembered.

A CPU's features say which paths it can run (``paths``), not which is fastest. On Zen 5 the
AVX-512 permutes step ~2.5x faster than the AVX2 gathers; on an Intel Xeon with AVX-512 VBMI
(LLVM's ``rocketlake``) the AVX2 gathers were 7-13% faster (8-bit Adam step, one thread, 4M
elements, fp32 and bf16 parameters). So the first step on a CPU with both times one 8-bit AdamW
step of ``ELEMENTS`` fp32 elements on each, one thread, alternating, best of ``ROUNDS``, and
takes the AVX2 path only if it is at least ``MARGIN`` faster (timings near a tie keep the
default). Both paths give the same results bit for bit: the choice changes speed only.

The answer is kept in ``cpu-paths.json`` of qoptim's cache folder (``$XDG_CACHE_HOME/qoptim``,
else ``~/.cache/qoptim``), keyed by LLVM's name of the CPU, its features and the kernels'
sources, so that later processes read it (a folder that cannot be written: measured in each
process). ``QOPTIM_CPU_PATH`` = ``avx512``, ``avx2`` or ``portable`` takes that path without
measuring (read at the first step).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numba
import torch
from llvmlite import binding as llvm_binding

from ...quant.maps import signed_map, unsigned_map
from ..types import Hyper, StateSlot
from . import paths, step
from .cache import SOURCES_DIGEST
from .layout import Layout

__all__ = ["ELEMENTS", "MARGIN", "NAMES", "ROUNDS", "cache_file", "choose", "faster_path", "key", "pick"]

ELEMENTS = 1 << 20  # elements of the timed step (~2 ms on one thread): large enough to stream from memory
ROUNDS = 5
MARGIN = 0.03  # how much faster the AVX2 path must be to be taken instead of the AVX-512 one
NAMES = {"avx512": paths.AVX512, "avx2": paths.AVX2, "portable": paths.PORTABLE}


def choose(default: NamedTuple) -> NamedTuple:
    """The path for this process (``paths.measure_with``): ``QOPTIM_CPU_PATH``'s, else where the
    features pick the AVX-512 one the faster of it and AVX2's (remembered), else ``default``."""
    named = os.environ.get("QOPTIM_CPU_PATH", "").strip().lower()
    if named:
        if named not in NAMES:
            raise ValueError(f"QOPTIM_CPU_PATH must be one of {sorted(NAMES)}, got {named!r}")
        if NAMES[named] is paths.AVX512 and not paths.HAS_AVX512:
            raise ValueError(f"QOPTIM_CPU_PATH=avx512, but this CPU lacks {', '.join(paths.AVX512_FEATURES)}")
        return NAMES[named]
    if default is not paths.AVX512:  # (no choice to measure)
        return default
    remembered = _read().get(key())
    if remembered in NAMES:
        return NAMES[remembered]
    chosen = faster_path()
    _remember(next(name for name, path in NAMES.items() if path is chosen))
    return chosen


def faster_path() -> NamedTuple:
    """AVX2 where its step is at least ``MARGIN`` faster than the AVX-512 one's, else AVX-512 (also
    where the AVX2 one does not compile)."""
    seconds = {paths.AVX512: [], paths.AVX2: []}
    p, g, slots, hp = _workload()
    try:
        for _ in range(ROUNDS + 1):  # (the first round compiles, or loads from the disk cache: not counted)
            for path, times in seconds.items():
                with paths.force(path):
                    start = time.perf_counter()
                    step.run("adam", Layout.BLOCK, p, g, slots, hp, True, 1)
                    times.append(time.perf_counter() - start)
    except (numba.core.errors.NumbaError, RuntimeError) as e:
        warnings.warn(f"qoptim: timing the CPU kernel's paths failed ({type(e).__name__}: {str(e)[:200]}); using the AVX-512 one",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return paths.AVX512
    return pick(*(min(times[1:]) for times in seconds.values()))


def pick(avx512_seconds: float, avx2_seconds: float) -> NamedTuple:
    """The AVX2 path where its step took at least ``MARGIN`` less time than the AVX-512 one's."""
    return paths.AVX2 if avx2_seconds < avx512_seconds * (1 - MARGIN) else paths.AVX512


def _workload() -> tuple:
    """An fp32 parameter with 8-bit AdamW states in 256-blocks, a gradient and a step's hyperparameters."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(ELEMENTS, generator=gen) * 0.1
    g = torch.randn(ELEMENTS, generator=gen) * 0.01
    blocks = -(-ELEMENTS // 256)
    slots = [StateSlot(torch.full((ELEMENTS,), 127, dtype=torch.uint8), code, torch.full((blocks,), 1e-3)) for code in (signed_map(), unsigned_map())]
    return p, g, slots, Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10, decoupled=True)


def key() -> str:
    """What a remembered answer holds for: this CPU (LLVM's name and features) and the kernels' sources."""
    features = hashlib.sha256(llvm_binding.get_host_cpu_features().flatten().encode()).hexdigest()[:16]
    return f"{llvm_binding.get_host_cpu_name()}/{features}/{SOURCES_DIGEST[:16]}"


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qoptim" / "cpu-paths.json"


def _read() -> dict:
    try:
        remembered = json.loads(cache_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure
        return {}
    return remembered if isinstance(remembered, dict) else {}


def _remember(name: str) -> None:
    """Add this CPU's answer to the file (written whole, then renamed: readers never see half of it)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({**_read(), key(): name}, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:  # a read-only home: measured again by the next process
        pass
