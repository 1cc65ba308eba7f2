"""The paths of the table lookups (qoptim.kernels.cpu.paths): the fall-back from a vector path
that does not compile, and ``force``."""

import os
import subprocess
import sys

import numba
import pytest
import torch
from support.cpu_states import assert_same, copy_state, make_state, torch_threads
from support.cpu_states import adam_hyper as hyper

from qoptim.kernels import cpu, reference
from qoptim.kernels.cpu import paths, tasks


@pytest.mark.parametrize("working", ["avx2", "portable"])
def test_a_vector_kernel_that_does_not_compile_leaves_the_next_one(working, monkeypatch):
    """Another numba/llvmlite may not lower the permute or gather intrinsics: the step still
    runs, on the next path down that compiles (AVX-512, then AVX2, then portable), with a
    warning for each that did not, and later steps go there directly."""
    real = tasks.eight_bit_task  # a small tensor: the task is called directly
    failing = (paths.PermutePath,) if working == "avx2" else (paths.PermutePath, paths.VectorPath)

    def vector_fails_to_compile(*args):
        if any(isinstance(a, failing) for a in args):
            raise numba.core.errors.LoweringError("no such intrinsic here")
        return real(*args)

    monkeypatch.setattr(tasks, "eight_bit_task", vector_fails_to_compile)
    p, slots = make_state(1000, torch.float32, "whole")
    p_ref, slots_ref = copy_state(p, slots)
    g = torch.randn(1000)
    with paths.force(paths.AVX512):
        with pytest.warns(RuntimeWarning) as warned:
            cpu.update("adam", p, g, slots, hyper(1, True), True)
        assert [str(w.message).split("; ")[-1] for w in warned] == ["using the AVX2 one", "using the portable one"][: len(failing)]
        assert paths.current() is (paths.AVX2 if working == "avx2" else paths.PORTABLE)
    with torch_threads(1):
        reference.update("adam", p_ref, g, slots_ref, hyper(1, True), True)
    assert_same(p, p_ref)
    for ours, theirs in zip(slots, slots_ref):
        assert_same(ours.values, theirs.values)
        assert_same(ours.absmax, theirs.absmax)


def test_force_picks_a_path_and_puts_the_one_before_back():
    before = paths.current()
    with paths.force(paths.PORTABLE) as path:
        assert path is paths.PORTABLE and paths.current() is paths.PORTABLE
        with paths.force(paths.AVX2):
            assert paths.current() is paths.AVX2
        assert paths.current() is paths.PORTABLE
    assert paths.current() is before


@pytest.mark.parametrize("named, avx2, avx512", [("", False, False), ("+avx2,+fma,-avx512f", True, False),
                                                ("+avx2,+avx512f,+avx512bw,+avx512vbmi", True, True)])
def test_the_features_are_those_numba_compiles_for(named, avx2, avx512, monkeypatch):
    """NUMBA_CPU_FEATURES (NUMBA_CPU_NAME=generic sets it empty) decides which intrinsics may be
    compiled: one of a feature the target lacks makes LLVM abort the process, not fail."""
    monkeypatch.setattr(numba.core.config, "CPU_FEATURES", named)
    features = paths.target_features()
    assert bool(features.get("avx2")) is avx2
    assert all(features.get(f) for f in paths.AVX512_FEATURES) is avx512


def test_a_generic_target_takes_neither_vector_path():
    code = "from qoptim.kernels.cpu import paths; print(paths.HAS_AVX2, paths.HAS_AVX512, paths.current() is paths.PORTABLE)"
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}
    env.pop("NUMBA_CPU_FEATURES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300).stdout.split()
    assert out[-3:] == ["False", "False", "True"]
