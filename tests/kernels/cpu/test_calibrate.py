"""The CPU backend's choice of lookup path (``calibrate``): a named path, the measured one (kept
in the cache file and read back), the margin, and measuring once and never inside ``force``."""

import json

import pytest

from qoptim.kernels.cpu import calibrate, paths


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder, and no path named in the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QOPTIM_CPU_PATH", raising=False)
    return tmp_path


@pytest.fixture
def measured(monkeypatch):
    """``faster_path`` replaced by one that counts its calls and answers AVX2."""
    calls = []

    def fake():
        calls.append(1)
        return paths.AVX2

    monkeypatch.setattr(calibrate, "faster_path", fake)
    return calls


@pytest.mark.parametrize("name", ["avx2", "portable", " AVX2 "])
def test_a_named_path_is_taken_without_measuring(name, monkeypatch, measured):
    monkeypatch.setenv("QOPTIM_CPU_PATH", name)
    assert calibrate.choose(paths.AVX512) is calibrate.NAMES[name.strip().lower()]
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
    assert calibrate.choose(default) is default
    assert not measured


def test_the_measured_path_is_remembered(measured):
    assert calibrate.choose(paths.AVX512) is paths.AVX2
    assert json.loads(calibrate.cache_file().read_text()) == {calibrate.key(): "avx2"}
    assert calibrate.choose(paths.AVX512) is paths.AVX2
    assert len(measured) == 1  # (the second answer came from the file)


def test_other_cpus_answers_are_kept(measured):
    calibrate.cache_file().parent.mkdir(parents=True)
    calibrate.cache_file().write_text(json.dumps({"znver5/x/y": "avx512"}))
    calibrate.choose(paths.AVX512)
    assert json.loads(calibrate.cache_file().read_text()) == {"znver5/x/y": "avx512", calibrate.key(): "avx2"}


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"": "avx2"})])
def test_an_unreadable_or_foreign_file_means_measuring(content, measured):
    calibrate.cache_file().parent.mkdir(parents=True)
    calibrate.cache_file().write_text(content)
    assert calibrate.choose(paths.AVX512) is paths.AVX2
    assert len(measured) == 1


def test_a_cache_folder_that_cannot_be_written_only_costs_a_measurement(own_cache, measured):
    (own_cache / "qoptim").write_text("a file where the folder should be")
    assert calibrate.choose(paths.AVX512) is paths.AVX2
    assert calibrate.choose(paths.AVX512) is paths.AVX2
    assert len(measured) == 2


@pytest.mark.parametrize("avx512, avx2, expected", [(1.0, 0.96, paths.AVX2), (1.0, 0.98, paths.AVX512), (1.0, 1.5, paths.AVX512),
                                                    (1.0, 0.5, paths.AVX2)])  # fmt: skip
def test_avx2_is_taken_only_beyond_the_margin(avx512, avx2, expected):
    assert calibrate.pick(avx512, avx2) is expected


@pytest.mark.skipif(not paths.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI: nothing to time against")
def test_faster_path_times_both_paths():
    assert calibrate.faster_path() in (paths.AVX512, paths.AVX2)


def test_the_first_unforced_step_measures_once():
    """``paths.current`` asks the measuring function once, outside ``force`` blocks only."""
    before = paths.current()
    asked = []

    def measure(default):
        asked.append(default)
        return paths.PORTABLE

    paths.measure_with(measure)
    try:
        with paths.force(paths.AVX2):
            assert paths.current() is paths.AVX2
        assert not asked
        assert paths.current() is paths.PORTABLE and paths.current() is paths.PORTABLE
        assert asked == [before]
    finally:
        paths.measure_with(lambda default: before)
        assert paths.current() is before
