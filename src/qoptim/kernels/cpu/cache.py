"""Numba's on-disk cache of the kernels, stamped with the sources they were compiled from.

Numba stamps a cached function's index with its own file only, yet a kernel is compiled from
functions of several files of this package (``forceinline`` copies them into it) and from
constants of ``kernels/types.py`` and ``kernels/rules.py``. After an edit to one file, kernels
cached from the others would still load with the old code of the edited one compiled in. Nor
do file times help: a process started before an edit compiles the code it imported, not the
file on disk, and may write its cache after the edit (a long benchmark compiling a new
specialization): its entries are then newer than the edit, yet stale.

So the package's functions take ``SourcesLocator``: Numba's own locators (in-tree
``__pycache__``, or ``NUMBA_CACHE_DIR``), with the index stamped by ``SOURCES_DIGEST``, a
digest of every source file's bytes read when this module is imported (with the code the
process compiles). An index written by a process that imported other sources has another
stamp: Numba finds it stale, compiles afresh and writes over it. Nothing is deleted by hand,
and a fresh install or checkout pays one compile, as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core import caching

__all__ = ["PACKAGE", "SOURCES_DIGEST", "install", "sources", "sources_digest"]

PACKAGE = Path(__file__).resolve().parent
# the kernels' modules outside the package that they compile constants from
_ALSO = (PACKAGE.parent / "types.py", PACKAGE.parent / "rules.py")


def sources(package: Path = PACKAGE, also: tuple[Path, ...] = _ALSO) -> list[Path]:
    """The source files whose code or constants the package's kernels are compiled from."""
    return sorted(package.glob("*.py")) + list(also)


def sources_digest(paths: list[Path]) -> str:
    """sha256 over each file's name and bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


SOURCES_DIGEST = sources_digest(sources())


class _StampedBySources:
    """A locator of the package's functions whose stamp is ``SOURCES_DIGEST``."""

    def get_source_stamp(self):
        return ("qoptim sources", SOURCES_DIGEST)

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != PACKAGE:
            return None  # another library's function: Numba's own locators take it
        return super().from_function(py_func, py_file)


class SourcesLocator(_StampedBySources, caching.InTreeCacheLocator):
    """The package's ``__pycache__`` (Numba's default place), stamped by the sources."""


class UserSourcesLocator(_StampedBySources, caching.UserProvidedCacheLocator):
    """``NUMBA_CACHE_DIR``, where the user set it (Numba looks there first), stamped by the sources."""


def install() -> None:
    """Put the two locators before Numba's (once). Numba picks the first that takes a function
    when ``njit(cache=True)`` decorates it: this runs before the package's kernel modules load."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # (older Numba: _CacheImpl)
    locators = impl._locator_classes  # Numba's list of locators, read when each function's cache is made
    for locator in (SourcesLocator, UserSourcesLocator):
        if locator not in locators:
            locators.insert(0, locator)
