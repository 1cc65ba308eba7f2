"""Running a step's tasks on torch's own OpenMP threads (issue #19's contention).

After each of its parallel operations torch's OpenMP threads keep spinning on the cores for a
while (libgomp's wait policy), so threads of our own, started right after a torch operation (a
step after backward, or gradient release inside backward), fight them for the cores: measured on
the lean GPT, the large tensors' updates inside backward ran at a third of their speed. Here the
tasks run on the very threads that spin: ``GOMP_parallel`` (libgomp's entry point of a
``#pragma omp parallel`` region) called through ctypes on the libgomp torch has loaded, with a
callback that takes the next task until none is left.

ctypes releases the GIL around the foreign call; each team thread takes it in the callback only
to call the task, and the tasks (Numba, ``nogil``) release it while they work. A callback cannot
raise through C: the first error is kept, the others stop taking tasks, and ``run`` raises it.

``TEAM`` is None where torch does not run on libgomp (another OpenMP runtime, another parallel
backend, no libgomp loaded): ``launch`` then uses worker threads of its own, as it does in a
process forked from the one that found the team (libgomp's threads do not survive a fork, and its
first parallel region in the child waits for them forever; ``usable``).
"""

from __future__ import annotations

import ctypes
import itertools
import os
from typing import Callable

import torch

__all__ = ["TEAM", "OpenMPTeam"]

_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*)(void *): a parallel region's body


class OpenMPTeam:
    """torch's OpenMP threads, through libgomp's ``GOMP_parallel``."""

    def __init__(self, libgomp: ctypes.CDLL):
        self.pid = os.getpid()  # the process whose libgomp threads these are
        self.parallel = libgomp.GOMP_parallel
        self.parallel.argtypes = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.parallel.restype = None

    @property
    def usable(self) -> bool:
        """Whether this is the process that found the team (not a child forked from it)."""
        return os.getpid() == self.pid

    def run(self, task: Callable[[int], None], ntasks: int, threads: int) -> None:
        """task(t) for t in range(ntasks) on ``threads`` threads of the team (the calling thread
        is one), each taking the next task when done with one; re-raises the first error."""
        next_task = itertools.count()  # (next() on a count is atomic under the GIL)
        errors: list[BaseException] = []

        def body(_data) -> None:
            try:
                while not errors and (t := next(next_task)) < ntasks:
                    task(t)
            except BaseException as e:  # (Ctrl-C too) kept, and the other threads stop taking tasks
                errors.append(e)

        self.parallel(_REGION(body), None, threads, 0)
        if errors:
            raise errors[0]


def _torchs_libgomp() -> OpenMPTeam | None:
    """The team of the libgomp torch has loaded, if torch's parallel backend is OpenMP on libgomp."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # only a libgomp already loaded (RTLD_NOLOAD): torch's own, not a second runtime
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError):  # not loaded (another runtime), or no RTLD_NOLOAD (not Linux)
        return None
    return OpenMPTeam(libgomp) if hasattr(libgomp, "GOMP_parallel") else None


TEAM = _torchs_libgomp()
