"""Where a step's tasks run (``launch.run``): on torch's OpenMP threads (``team.TEAM``) where torch
runs on libgomp, else on worker threads of our own; every task once, the first error raised."""

import threading
import time

import pytest
import torch
from support.cpu_states import torch_threads

from qoptim.kernels.cpu import launch, team

needs_team = pytest.mark.skipif(team.TEAM is None, reason="torch does not run on libgomp here")


def test_torch_on_linux_runs_on_libgomp_and_the_team_is_found():
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" in info and torch.__file__.startswith("/") and "libgomp" in open("/proc/self/maps").read():
        assert team.TEAM is not None


def sleepy_task(seen: list):
    """A task that records (task, thread) and sleeps a little (releasing the GIL, as the kernels do)."""

    def task(t: int, ntasks: int) -> int:
        seen.append((t, threading.get_native_id()))
        time.sleep(0.005)
        return 10 * t + ntasks

    return task


def run_on_two_threads(seen: list):
    """``launch.run`` of 8 ``sleepy_task``s on two threads; returns their results."""
    results = torch.zeros(8, dtype=torch.int64).numpy()
    with torch_threads(2):
        if launch.threads() < 2:
            pytest.skip("one thread only")
        launch.run(sleepy_task(seen), 8, results, ())
    return results


@pytest.fixture(params=["team", "workers"])
def runner(request, monkeypatch):
    """Tasks on torch's OpenMP team, or (``launch.TEAM`` unset) on worker threads of ours."""
    if request.param == "team" and team.TEAM is None:
        pytest.skip("torch does not run on libgomp here")
    if request.param == "workers":
        monkeypatch.setattr(launch, "TEAM", None)
    return request.param


def test_every_task_runs_once_and_both_threads_take_part(runner):
    seen: list = []
    results = run_on_two_threads(seen)
    assert sorted(t for t, _ in seen) == list(range(8))
    assert results.tolist() == [10 * t + 8 for t in range(8)]
    assert len({thread for _, thread in seen}) == 2


@needs_team
def test_the_team_starts_no_thread_of_ours():
    before = {t.ident for t in threading.enumerate()}
    results = torch.zeros(8, dtype=torch.int64).numpy()
    with torch_threads(2):
        launch.run(sleepy_task([]), 8, results, ())
    assert {t.ident for t in threading.enumerate()} == before


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_the_first_error_is_raised_and_the_other_threads_stop(runner, error):
    ran = []

    def task(t: int, ntasks: int) -> int:
        ran.append(t)
        if t == 1:
            raise error("task 1 failed")
        time.sleep(0.002)
        return 0

    results = torch.zeros(64, dtype=torch.int64).numpy()
    with torch_threads(2), pytest.raises(error, match="task 1 failed"):
        launch.run(task, 64, results, ())
    assert len(ran) < 64


@needs_team
def test_a_step_on_the_team_equals_one_on_our_threads(monkeypatch):
    """The same large 8-bit step (several tasks) through the team and through worker threads."""
    import qoptim

    out = []
    for use_team in (True, False):
        if not use_team:
            monkeypatch.setattr(launch, "TEAM", None)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1 << 19))
        opt = qoptim.AdamW8bit([p], lr=1e-2)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["state1"].clone(), opt.state[p]["state2"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*out))


@needs_team
def test_a_forked_child_does_not_use_its_parents_team(monkeypatch):
    """libgomp's threads do not survive a fork: a process other than the team's uses worker threads."""
    monkeypatch.setattr(team.TEAM, "pid", -1)  # (as a forked child sees it)
    assert not team.TEAM.usable
    seen: list = []
    run_on_two_threads(seen)
    workers = {t.native_id for t in threading.enumerate() if t.name.startswith("qoptim-cpu")}
    assert {thread for _, thread in seen} & workers
