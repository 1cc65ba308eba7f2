"""The CPU backend's choice of lookup path for each kind of kernel (``calibrate``): a named path,
the measured ones (kept in the cache file and read back), the margin, and ``paths.current``:
measuring once and never inside ``force``, each kind on its path, a fall-back moving them all."""

import json

import numba
import pytest
import torch

import qoptim
from qoptim.kernels.cpu import calibrate, layout, paths


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder, and no path named in the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QOPTIM_CPU_PATH", raising=False)
    return tmp_path


MEASURED = {paths.EIGHT_BIT: paths.AVX2, paths.EIGHT_BIT_DRAWN: paths.AVX512, paths.FOUR_BIT: paths.AVX512}


@pytest.fixture
def measured(monkeypatch):
    """``faster_path`` replaced by one that counts its calls and answers ``MEASURED``."""
    calls = []

    def fake(kind):
        calls.append(kind)
        return MEASURED[kind]

    monkeypatch.setattr(calibrate, "faster_path", fake)
    return calls


@pytest.mark.parametrize("name", ["avx2", "portable", " AVX2 "])
def test_a_named_path_is_taken_without_measuring(name, monkeypatch, measured):
    monkeypatch.setenv("QOPTIM_CPU_PATH", name)
    assert calibrate.choose(paths.AVX512) == dict.fromkeys(paths.KINDS, calibrate.NAMES[name.strip().lower()])
    assert not measured


def test_a_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("QOPTIM_CPU_PATH", "sse4")
    with pytest.raises(ValueError, match="QOPTIM_CPU_PATH must be one of"):
        calibrate.choose(paths.AVX512)


@pytest.mark.skipif(paths.HAS_AVX512, reason="this CPU has AVX-512 VBMI")
def test_avx512_named_on_a_cpu_without_it_is_refused(monkeypatch):
    monkeypatch.setenv("QOPTIM_CPU_PATH", "avx512")
    with pytest.raises(ValueError, match="lacks"):
        calibrate.choose(paths.AVX512)


@pytest.mark.parametrize("default", [paths.AVX2, paths.PORTABLE])
def test_nothing_is_measured_without_a_choice(default, measured):
    assert calibrate.choose(default) == {}
    assert not measured


def test_the_measured_paths_are_remembered(measured):
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert json.loads(calibrate.cache_file().read_text()) == {calibrate.key(): {paths.EIGHT_BIT: "avx2", paths.EIGHT_BIT_DRAWN: "avx512", paths.FOUR_BIT: "avx512"}}
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert sorted(measured) == sorted(paths.KINDS)  # (once each: the second answers came from the file)


def test_other_cpus_answers_are_kept(measured):
    calibrate.cache_file().parent.mkdir(parents=True)
    calibrate.cache_file().write_text(json.dumps({"znver5/x/y": "avx512"}))
    calibrate.choose(paths.AVX512)
    assert json.loads(calibrate.cache_file().read_text()) == {"znver5/x/y": "avx512", calibrate.key(): {paths.EIGHT_BIT: "avx2", paths.EIGHT_BIT_DRAWN: "avx512", paths.FOUR_BIT: "avx512"}}


@pytest.mark.parametrize("mine", [None, "avx2", {paths.EIGHT_BIT: "avx2"}, {paths.EIGHT_BIT: "avx2", paths.FOUR_BIT: "sse"},
                                  {paths.EIGHT_BIT: "avx2", paths.FOUR_BIT: "avx512"}])  # (the last: a complete entry of two kinds)
def test_an_unreadable_or_foreign_answer_means_measuring(mine, measured):
    """A file that is not JSON, a list, or this CPU's entry incomplete or of an older layout."""
    calibrate.cache_file().parent.mkdir(parents=True)
    calibrate.cache_file().write_text("not json" if mine is None else json.dumps([1, 2]) if mine == "avx2" else json.dumps({calibrate.key(): mine}))
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert len(measured) == len(paths.KINDS)


def test_a_cache_folder_that_cannot_be_written_only_costs_a_measurement(own_cache, measured):
    (own_cache / "qoptim").write_text("a file where the folder should be")
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert len(measured) == 2 * len(paths.KINDS)


@pytest.mark.parametrize("avx512, avx2, expected", [(1.0, 0.96, paths.AVX2), (1.0, 0.98, paths.AVX512), (1.0, 1.5, paths.AVX512),
                                                    (1.0, 0.5, paths.AVX2)])  # fmt: skip
def test_avx2_is_taken_only_beyond_the_margin(avx512, avx2, expected):
    assert calibrate.pick(avx512, avx2) is expected


@pytest.mark.skipif(not paths.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI: nothing to time against")
@pytest.mark.parametrize("kind", paths.KINDS)
def test_faster_path_times_both_paths(kind):
    assert calibrate.faster_path(kind) in (paths.AVX512, paths.AVX2)


def test_the_first_unforced_step_measures_once():
    """``paths.current`` asks the measuring function once, outside ``force`` blocks only; each kind
    then takes its path, a kind not measured the base one."""
    before = {kind: paths.current(kind) for kind in paths.KINDS}
    asked = []

    def measure(default):
        asked.append(default)
        return {paths.FOUR_BIT: paths.PORTABLE}

    paths.measure_with(measure)
    try:
        with paths.force(paths.AVX2):
            assert paths.current(paths.FOUR_BIT) is paths.AVX2
        assert not asked
        assert paths.current(paths.FOUR_BIT) is paths.PORTABLE and paths.current(paths.FOUR_BIT) is paths.PORTABLE
        assert len(asked) == 1
        with paths.force(paths.AVX2):  # (forced: the measured path does not count)
            assert paths.current(paths.FOUR_BIT) is paths.AVX2
        assert paths.current(paths.EIGHT_BIT) is asked[0]  # (not measured: the base path)
    finally:
        paths.measure_with(lambda default: before)
        assert {kind: paths.current(kind) for kind in paths.KINDS} == before


@pytest.mark.parametrize("measured_path, base, taken", [(paths.AVX512, paths.AVX2, paths.AVX2), (paths.AVX2, paths.AVX512, paths.AVX2),
                                                      (paths.AVX512, paths.PORTABLE, paths.PORTABLE), (paths.AVX512, paths.AVX512, paths.AVX512)])  # fmt: skip
def test_a_fall_back_moves_a_measured_path_down(measured_path, base, taken):
    """A kind measured fastest on AVX-512 goes down with every kernel once AVX-512 did not compile."""
    assert paths.lower(measured_path, base) is taken


def test_a_failed_measurement_is_asked_again():
    """A bad ``QOPTIM_CPU_PATH`` fails every step, not only the first."""
    before = {kind: paths.current(kind) for kind in paths.KINDS}

    def refuse(default):
        raise ValueError("QOPTIM_CPU_PATH must be one of ...")

    paths.measure_with(refuse)
    try:
        for _ in range(2):
            with pytest.raises(ValueError, match="QOPTIM_CPU_PATH"):
                paths.current()
    finally:
        paths.measure_with(lambda default: before)
        assert {kind: paths.current(kind) for kind in paths.KINDS} == before


def test_a_bad_path_name_changes_nothing(monkeypatch):
    """The first step measures (or fails to) before any parameter changes: fp32 states, which
    take no path, included."""
    before = {kind: paths.current(kind) for kind in paths.KINDS}
    monkeypatch.setenv("QOPTIM_CPU_PATH", "sse4")
    paths.measure_with(calibrate.choose)
    try:
        params = [torch.nn.Parameter(torch.randn(n)) for n in (100, 5000)]  # fp32 states (min_8bit_size), 8-bit states
        opt = qoptim.AdamW8bit(params)
        for p in params:
            p.grad = torch.ones_like(p)
        kept = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match="QOPTIM_CPU_PATH must be one of"):
            opt.step()
        assert all(torch.equal(p, k) for p, k in zip(params, kept))
    finally:
        paths.measure_with(lambda default: before)
        paths.current()


@pytest.mark.skipif(not paths.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI: its path is never measured")
def test_a_kind_whose_measured_path_fails_to_compile_goes_down_alone():
    """8-bit measured on AVX2, 4-bit on AVX-512: AVX2 failing moves the 8-bit kernels to the
    portable path and leaves the 4-bit ones where they were."""
    before = {kind: paths.current(kind) for kind in paths.KINDS}
    paths.measure_with(lambda default: {paths.EIGHT_BIT: paths.AVX2, paths.FOUR_BIT: paths.AVX512})
    try:
        def run(path):
            if path is paths.AVX2:
                raise numba.core.errors.LoweringError("no such intrinsic here")
            return path

        with pytest.warns(RuntimeWarning, match="the AVX2 CPU kernel failed to compile"):
            assert paths.on_best_path(run, paths.EIGHT_BIT) is paths.PORTABLE
        assert paths.current(paths.EIGHT_BIT) is paths.PORTABLE and paths.current(paths.FOUR_BIT) is paths.AVX512
    finally:
        paths.measure_with(lambda default: before)
        assert {kind: paths.current(kind) for kind in paths.KINDS} == before


@pytest.mark.skipif(not paths.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI: nothing to time")
@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_the_measurement_does_not_take_the_default_dtype(default, recwarn):
    """A process with another default dtype (some model loaders leave bf16 set) times the same fp32 step."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        assert calibrate.faster_path(paths.EIGHT_BIT) in (paths.AVX512, paths.AVX2)
    finally:
        torch.set_default_dtype(before)
    assert not [w for w in recwarn if "timing the CPU kernel's paths failed" in str(w.message)]


def test_a_measurement_that_fails_leaves_the_default_path(monkeypatch):
    def broken(kind):
        raise MemoryError("no room for the timing tensors")

    monkeypatch.setattr(calibrate, "workload", broken)
    with pytest.warns(RuntimeWarning, match="timing the CPU kernel's paths failed"):
        assert calibrate.faster_path(paths.FOUR_BIT) is paths.AVX512


def test_no_home_only_costs_a_measurement(monkeypatch, measured):
    monkeypatch.delenv("XDG_CACHE_HOME")

    def homeless():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(calibrate.Path, "home", homeless)
    assert calibrate.choose(paths.AVX512) == MEASURED
    assert len(measured) == len(paths.KINDS)


@pytest.mark.parametrize("kind", paths.KINDS)
def test_each_kinds_workload_is_a_step_of_that_kind(kind, monkeypatch):
    """The timed step is the kernel the kind names: a step of its workload asks for that kind's path
    (``layout.kernel_kind``: 4-bit states, 8-bit ones with a draw, else 8-bit)."""
    monkeypatch.setattr(calibrate, "ELEMENTS", 4096)
    layout, p, g, slots, hp = calibrate.workload(kind)
    asked = []
    real = paths.on_best_path

    def spy(run, which=paths.EIGHT_BIT):
        asked.append(which)
        return real(run, which)

    monkeypatch.setattr(paths, "on_best_path", spy)
    with paths.force(paths.AVX2 if paths.HAS_AVX2 else paths.PORTABLE):  # (nothing measured)
        calibrate.step.run("adam", layout, p, g, slots, hp, True, 1)
    assert asked == [kind]


def test_the_trust_pass_takes_the_plain_kind_whatever_the_draws(monkeypatch):
    """The trust pass (LAMB, LARS) writes no codes: a draw changes nothing there."""
    monkeypatch.setattr(calibrate, "ELEMENTS", 4096)
    eight = calibrate.workload(paths.EIGHT_BIT_DRAWN)
    assert layout.kernel_kind(eight[0], eight[3]) == paths.EIGHT_BIT_DRAWN
    assert layout.kernel_kind(eight[0], eight[3], reads_only=True) == paths.EIGHT_BIT
    four = calibrate.workload(paths.FOUR_BIT)
    assert layout.kernel_kind(four[0], four[3], reads_only=True) == paths.FOUR_BIT
