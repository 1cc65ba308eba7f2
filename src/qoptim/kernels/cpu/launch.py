"""Where a step's work runs: tasks (contiguous runs of 256-blocks) on torch's own OpenMP threads
(``team``, where torch runs on libgomp), else on the calling thread and worker threads of our own.

The kernels release the GIL. Our own threads sleep between steps (Numba's OpenMP threads
spin-wait between parallel regions, which starved torch's own pool: training ran up to ~100x
slower), but right after a torch operation torch's threads spin and ours fight them for the
cores; torch's threads, given the tasks, do not. A Numba parallel driver would also compile each
kernel a second time, inlined into its gufunc: ~2 s more per kernel on a cold cache.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from ..types import BLOCK
from .team import TEAM

__all__ = ["PARALLEL_MIN", "TASKS_PER_THREAD", "run", "tasks_for", "threads"]

# Below this many elements (~0.2 ms of work for one thread) a step runs on the calling thread
# only: a hand-off to another thread costs tens of microseconds, and with busy cores it can
# stall for a scheduler tick (~8 ms measured under load with Numba's OpenMP layer).
PARALLEL_MIN = 1 << 18

# Tasks per thread of a parallel step: threads take the next task as they finish one, so a
# thread slowed down (by another process on its core) holds up the step by one task at most.
TASKS_PER_THREAD = 4


def threads() -> int:
    """Threads for a step: torch's thread count, at most one per core the process may use."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def tasks_for(n: int) -> int:
    """How many tasks a step of ``n`` elements is split into: ``TASKS_PER_THREAD`` per
    thread, one for small tensors (``PARALLEL_MIN``) or one thread."""
    count = threads()
    if n < PARALLEL_MIN or count == 1:
        return 1
    return min(count * TASKS_PER_THREAD, -(-n // BLOCK))


def run(task, ntasks: int, results: np.ndarray, args: tuple) -> None:
    """results[t] = task(t, ntasks, *args) for each task, on ``threads()`` threads (torch's
    OpenMP team, else the calling thread and worker threads), each taking the next task when
    done with one. Returns when all are done, re-raising the first error."""
    if ntasks == 1:
        results[0] = task(0, 1, *args)
        return
    if TEAM is not None and TEAM.usable:

        def one(t: int) -> None:
            results[t] = task(t, ntasks, *args)

        TEAM.run(one, ntasks, min(threads(), ntasks))
        return
    pending = queue.SimpleQueue()
    for t in range(ntasks):
        pending.put(t)

    def work():
        while True:
            try:
                t = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results[t] = task(t, ntasks, *args)
            except BaseException:  # (Ctrl-C too) no thread takes another task
                _drain(pending)
                raise

    helpers = min(threads(), ntasks) - 1
    futures = []
    try:
        for _ in range(helpers):
            futures.append(_Workers.at_least(helpers).submit(work))
    except RuntimeError:  # no new threads at interpreter shutdown: fewer threads do it all
        pass
    error = None
    try:
        work()
    except BaseException as e:  # wait for the other threads: they may still be writing
        error = e
    for future in futures:
        try:
            future.result()
        except Exception as e:
            error = error or e
    if error is not None:
        raise error


def _drain(pending: queue.SimpleQueue) -> None:
    while True:
        try:
            pending.get_nowait()
        except queue.Empty:
            return


class _Workers:
    """The worker threads, made on first need (a new pool after a fork: the threads stay behind in the parent)."""

    pool: ThreadPoolExecutor | None = None
    key = (0, 0)  # (process id, threads) of the pool
    lock = threading.Lock()

    @classmethod
    def at_least(cls, size: int) -> ThreadPoolExecutor:
        """The pool, with at least ``size`` threads."""
        with cls.lock:
            pid, count = cls.key
            if cls.pool is None or pid != os.getpid() or count < size:
                count = max(size, numba.config.NUMBA_NUM_THREADS - 1)
                cls.pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="qoptim-cpu")
                cls.key = (os.getpid(), count)
            return cls.pool
