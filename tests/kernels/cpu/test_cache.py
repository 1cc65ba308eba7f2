"""The guard of Numba's on-disk cache (qoptim.kernels.cpu.cache): after an edit to any source file
of the kernels, every cache file written before it is dropped, and nothing newer."""

import os
import shutil
import time

from qoptim.kernels.cpu import cache


def make_package(tmp_path):
    """A copy of the package's sources, and a Numba cache of two functions of two of its files
    (indexes and code), written after the sources."""
    package = tmp_path / "cpu"
    package.mkdir()
    for source in cache.sources():
        shutil.copy(source, package / source.name)
    cached = package / "__pycache__"
    cached.mkdir()
    names = ["tasks.eight_bit_task-300.py311.nbi", "tasks.eight_bit_task-300.py311.1.nbc", "batch.fp32_batch_task-200.py311.nbi",
             "batch.fp32_batch_task-200.py311.1.nbc", "tasks.cpython-311.pyc"]  # fmt: skip
    for name in names:
        (cached / name).write_bytes(b"x")
    return package, [cached / name for name in names]


def stamp(path, seconds):
    os.utime(path, (seconds, seconds))


def test_a_fresh_cache_is_kept(tmp_path):
    package, files = make_package(tmp_path)
    now = time.time()
    for source in package.glob("*.py"):
        stamp(source, now - 100)
    for f in files:
        stamp(f, now - 10)
    assert cache.drop_stale(package, also=()) == []
    assert all(f.exists() for f in files)


def test_an_edit_to_any_file_drops_every_cache_file_written_before_it(tmp_path):
    """An edit to ``quantize.py``, inlined into the kernels of ``tasks.py`` and ``batch.py``,
    drops their cache files too (Numba itself would only notice edits to their own files);
    a cache file written after the edit (by another process, after its compile) stays, and so
    does everything that is not Numba's."""
    package, files = make_package(tmp_path)
    now = time.time()
    for source in package.glob("*.py"):
        stamp(source, now - 100)
    nbi, nbc, other_nbi, other_nbc, pyc = files
    for f in files:
        stamp(f, now - 50)
    stamp(package / "quantize.py", now - 20)  # the edit
    stamp(other_nbc, now - 10)  # compiled again since
    dropped = cache.drop_stale(package, also=())
    assert sorted(dropped) == sorted([nbi, nbc, other_nbi])
    assert not nbi.exists() and not nbc.exists() and not other_nbi.exists()
    assert other_nbc.exists() and pyc.exists()
    assert cache.drop_stale(package, also=()) == []  # nothing left to drop, and no error for what is gone


def test_an_edit_to_the_rule_table_counts_too(tmp_path):
    """The kernels compile constants of kernels/rules.py and kernels/types.py in."""
    package, files = make_package(tmp_path)
    table = tmp_path / "rules.py"
    table.write_text("")
    now = time.time()
    for source in package.glob("*.py"):
        stamp(source, now - 100)
    for f in files:
        stamp(f, now - 50)
    stamp(table, now - 20)
    assert len(cache.drop_stale(package, also=(table,))) == 4


def test_no_cache_folder_is_no_error(tmp_path):
    package = tmp_path / "cpu"
    package.mkdir()
    (package / "a.py").write_text("")
    assert cache.drop_stale(package, also=()) == []


def test_the_real_package_watches_its_own_files_and_the_rule_table():
    names = {path.name for path in cache.sources()}
    assert {"__init__.py", "tasks.py", "quantize.py", "rules.py", "types.py"} <= names
    assert cache.PACKAGE / "__pycache__" in cache.cache_dirs()
