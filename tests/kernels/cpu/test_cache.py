"""Numba's cache of the kernels is stamped with the package's sources (qoptim.kernels.cpu.cache):
code cached by a process that imported other sources is never loaded, whichever file changed
and whenever that process wrote its cache."""

import importlib.util
import sys

import pytest
from numba import njit

from qoptim.kernels.cpu import batch, cache


def test_the_digest_covers_every_byte_of_every_source(tmp_path):
    files = []
    for name in ("a.py", "b.py"):
        files.append(tmp_path / name)
        files[-1].write_text(f"x = '{name}'\n")
    before = cache.sources_digest(files)
    assert cache.sources_digest(files) == before
    files[1].write_text("x = 'b.py' \n")  # one byte more, in the file that does not define the kernel
    assert cache.sources_digest(files) != before
    assert cache.SOURCES_DIGEST == cache.sources_digest(cache.sources())


def test_the_kernels_have_the_sources_stamp_and_other_functions_numbas():
    locator = batch.eight_bit_batch_task._cache._impl.locator
    assert isinstance(locator, cache.SourcesLocator)
    assert locator.get_source_stamp() == ("qoptim sources", cache.SOURCES_DIGEST)

    @njit(cache=True)
    def elsewhere(x):  # pragma: no cover (compiled by Numba)
        return x + 1

    assert not isinstance(elsewhere._cache._impl.locator, cache.SourcesLocator)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package folder of one cached function, standing in for the kernels'."""
    monkeypatch.setattr(cache, "PACKAGE", tmp_path.resolve())
    (tmp_path / "kernel.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("qoptim_test_kernel")]:
        del sys.modules[name]


def test_code_cached_from_other_sources_is_compiled_again(package, monkeypatch):
    monkeypatch.setattr(cache, "SOURCES_DIGEST", "sources of an earlier process")
    first = load(package / "kernel.py", "qoptim_test_kernel_1").twice
    assert first(3) == 6 and first.stats.cache_misses  # compiled, and saved with that stamp
    assert any((package / "__pycache__").glob("kernel.twice-*.nbi"))

    same = load(package / "kernel.py", "qoptim_test_kernel_2").twice
    assert same(3) == 6 and sum(same.stats.cache_hits.values()) == 1  # the same sources: loaded

    monkeypatch.setattr(cache, "SOURCES_DIGEST", "the sources after an edit")
    edited = load(package / "kernel.py", "qoptim_test_kernel_3").twice
    assert edited(3) == 6 and not edited.stats.cache_hits and edited.stats.cache_misses  # stale: compiled again

    again = load(package / "kernel.py", "qoptim_test_kernel_4").twice
    assert again(3) == 6 and sum(again.stats.cache_hits.values()) == 1  # and saved over the stale entry
