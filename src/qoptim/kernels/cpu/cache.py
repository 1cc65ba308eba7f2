"""Numba's on-disk cache of the kernels, kept from mixing code of different source versions.

Numba keys a cached function on its own file only (its index holds a hash of that file), yet
a kernel is compiled from functions of several files of this package (``forceinline`` copies
them into it) and from constants of ``kernels/types.py`` and ``kernels/rules.py``. After an
edit to one file, the kernels cached from the others would still load, with the old code of
the edited one compiled in. So before any kernel is compiled or loaded (Numba reads its cache
at a kernel's first call, not at import), ``drop_stale`` deletes every cache file of this
package older than its newest source file: an edit anywhere in the package means a fresh
compile of all of it (a few minutes), never stale machine code. A fresh install or checkout
stamps every file anew, so it only ever costs a compile.
"""

from __future__ import annotations

import os
from pathlib import Path

from numba.core import config
from numba.core.caching import UserProvidedCacheLocator

__all__ = ["PACKAGE", "cache_dirs", "drop_stale", "sources"]

PACKAGE = Path(__file__).resolve().parent
# the kernels' modules outside the package that they compile constants from
_ALSO = (PACKAGE.parent / "types.py", PACKAGE.parent / "rules.py")


def sources(package: Path = PACKAGE, also: tuple[Path, ...] = _ALSO) -> list[Path]:
    """The source files whose code or constants the package's kernels are compiled from."""
    return sorted(package.glob("*.py")) + list(also)


def cache_dirs(package: Path = PACKAGE) -> list[Path]:
    """Where Numba keeps the package's cache: its ``__pycache__``, or under ``NUMBA_CACHE_DIR``
    where that is set (as Numba's own locator names the folder)."""
    dirs = [package / "__pycache__"]
    if config.CACHE_DIR:
        dirs.append(Path(config.CACHE_DIR) / UserProvidedCacheLocator.get_suitable_cache_subpath(str(package / "__init__.py")))
    return dirs


def drop_stale(package: Path = PACKAGE, also: tuple[Path, ...] = _ALSO) -> list[Path]:
    """Delete the package's cache files (``*.nbi`` indexes, ``*.nbc`` code) older than its newest
    source file; returns those deleted. Safe with other processes doing the same or compiling
    at once: a file another one deleted first is skipped, and a file written after the newest
    edit is newer than it. (An index rewritten after the edit may still list code compiled
    before it: that code's file is older, so it goes, and Numba compiles the entry again.)"""
    stamps = []
    for path in sources(package, also):
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:  # (a source gone: nothing to compare with)
            pass
    if not stamps:
        return []
    newest = max(stamps)
    dropped = []
    for folder in cache_dirs(package):
        try:
            entries = list(os.scandir(folder))
        except OSError:  # no cache yet
            continue
        for entry in entries:
            if not entry.name.endswith((".nbi", ".nbc")):
                continue
            try:
                if entry.stat().st_mtime < newest:
                    os.unlink(entry.path)
                    dropped.append(Path(entry.path))
            except OSError:  # deleted by another process meanwhile, or not ours to delete
                pass
    return dropped
