"""The fused CPU backend: one Numba kernel pass over memory per optimizer step (``qoptim.kernels.cpu``).

Agreement with ``reference.update`` is bit for bit: no fast-math (it would let LLVM contract
``a*b + c`` into an FMA or reorder sums), float32 constants rounded from the same Python
doubles torch uses, the same float32 reciprocal for the quantizer scale, and bf16/fp16
parameters rounded to nearest-even, or in their weight format (``types.WeightFormat``: a master
decoded and encoded again, stochastic rounding) in the same pass. Where the time goes (one thread, Zen 5, per element of an
Adam step, ~0.50 ns in all with the data in cache, ~0.58 ns streaming from memory): quantizing
the two states ~0.21 ns, the update's math ~0.16 ns, dequantizing ~0.08 ns, the gradient's
finiteness test ~0.02 ns; the AVX2 path takes ~1.3 ns, the portable one ~2.3 ns. Kernels are
compiled lazily per rule, parameter dtype, state layout and path (~3.9 s for the first) and
cached on disk: a fresh process with a warm cache pays ~0.4 s on its first step.

The registry asks ``supports`` first, then calls ``update``, which checks again (``layout.plan``,
~4 us): nothing passes between the two calls. ``update_many`` plans each parameter once.

Modules, from the seam down:

- ``__init__``: the seam (``supports``, ``update``, ``update_many``, ``grad_norm_sq``)
- ``batch``: many small tensors in one kernel call (``update_many``)
- ``step``: one parameter's passes (trust ratio, peaks, step)
- ``layout``: which parameters and states the kernels take (``plan``), and their memory as the kernels see it
- ``launch``: worker threads, and a step's split into tasks
- ``paths``: the AVX-512 / AVX2 / portable paths, the CPU's features, the fall-back, ``force``
- ``calibrate``: which of the AVX-512 and AVX2 paths is faster on this CPU, measured once and remembered
- ``tasks``: the task kernels (8-bit, fp32, trust pass) and their per-block work
- ``four_bit``: the task kernels of 4-bit states (step, trust pass)
- ``nibbles``: 4-bit states' maps, and a block's codes decoded from and encoded into shared bytes
- ``weights``: a parameter as the tasks read and write it, in its weight format
- ``codec``: a master weight decoded and encoded, stochastic rounding, element by element
- ``rules``: each rule's per-element math and its marker (the rest of a rule is ``kernels.rules``)
- ``quantize``: dequantizing and quantizing a block on each path (to nearest, or stochastically with a draw)
- ``draws``: the AVX-512 path's draw of 8-bit stochastic rounding, 16 lanes at a time
- ``gather``: the AVX2 path's gather intrinsics
- ``avx512``: the AVX-512 path's register-permute lookups and quantizers
- ``tables``: a code map's quantizer tables (incl. the AVX-512 path's register tables, and stochastic rounding's floor tables)
- ``guess``: the AVX-512 quantizer's first guess from a table of bins
- ``bits``: float bit patterns, stack arrays, prefetches, bf16/fp16 conversions
- ``jit``: the compile options of every kernel
- ``cache``: stamps Numba's cache of the kernels with the package's sources
"""

from __future__ import annotations

import torch

from .. import reference
from ..types import NEAREST, Hyper, Job, StateSlot, UpdateResult, WeightFormat
from . import cache

cache.install()  # before any kernel module is imported: Numba chooses a function's cache locator when it is decorated

from . import batch, calibrate, launch, paths, step  # noqa: E402
from .layout import Layout, flat_cpu, plan, weights_fit  # noqa: E402

paths.measure_with(calibrate.choose)  # (at the first step, where the CPU has more than one fast path)

__all__ = ["WEIGHT_FORMATS", "grad_norm_sq", "plan", "supports", "update", "update_many"]

# The weight formats (master corrections, stochastic rounding) are fused into the kernels'
# pass over memory (``weights``): ``kernels.update`` hands such jobs here.
WEIGHT_FORMATS = True


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """A rule of ``kernels.rules.RULES`` with all its states fp32, all 8-bit in 256-blocks, all
    8-bit with one scale, or all 4-bit sharing their bytes, on a flat contiguous CPU parameter
    (``layout.plan``); anything else goes to the reference."""
    return plan(rule, p, slots) is not None


def update(rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True,
           weights: WeightFormat = NEAREST) -> UpdateResult:  # fmt: skip
    """One step of ``rule`` on ``p`` in place, and on its correction with a master (same result
    as ``reference.update``)."""
    paths.current()  # (the first step's measurement, or its error, before anything changes)
    job = Job(rule, p, g, slots, hp, skip_nonfinite, weights)
    return _planned(job, plan(rule, p, slots))


def update_many(jobs: list[Job]) -> list[UpdateResult]:
    """Many parameters' updates at once, small tensors batched into one call (``batch``)."""
    paths.current()  # (the first step's measurement, or its error, before anything changes)
    return batch.update_many(jobs, _planned)


def _planned(job: Job, layout: Layout | None) -> UpdateResult:
    """``job`` on the one-at-a-time path, its states laid out as ``layout`` (None: the reference's job)."""
    rule, p, g, slots, hp, skip_nonfinite, weights = job
    reference.check_weights(p, weights)  # (a bad format is refused before anything changes)
    if layout is None or not flat_cpu(g, p.dtype, p.numel()) or not weights_fit(p, weights):
        return reference.update(rule, p, g, slots, hp, skip_nonfinite, weights)
    ntasks = launch.tasks_for(p.numel())
    return UpdateResult(skipped_blocks=step.run(rule, layout, p, g, slots, hp, skip_nonfinite, ntasks, weights))


def grad_norm_sq(g: torch.Tensor) -> float:
    """The reference's sum of squares (chunked BLAS dot, already memory-bound), so that
    percentile clipping decides exactly as it does on the reference backend."""
    return reference.grad_norm_sq(g)
