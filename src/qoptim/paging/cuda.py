"""The CUDA pager: paged optimizer states in CUDA managed (unified) memory.

A paged state buffer is memory from ``cudaMallocManaged``, which the driver migrates between the
GPU and the host page by page: under GPU memory pressure it is evicted to the host instead of the
allocation failing, and a prefetch before use brings it back ahead of the kernel that reads it.

The buffer is exposed as an ordinary torch CUDA tensor (through ``__cuda_array_interface__``),
tagged ``is_paged = True``. The tensor's storage keeps the object that owns the allocation alive,
and that object frees the memory (``cudaFree``) when it is collected: when the last tensor or
view of the buffer goes, e.g. on optimizer deletion or state reset.

The CUDA calls sit behind a small allocator interface (:class:`CudaRuntime`) so that which
buffers are paged, what is prefetched and what is released can be tested with a fake allocator
on the CPU. No compiled extension: the CUDA runtime library torch has already loaded is called
through ctypes.

:mod:`qoptim.paging` registers this module as the pager of ``"cuda"`` by its path: it is imported,
and the CUDA runtime loaded, when the first paged CUDA buffer is asked for; importing qoptim on a
CPU-only machine loads neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import warnings
import weakref
from typing import Any, Iterable, Protocol

import torch

__all__ = ["Allocator", "CudaRuntime", "LazyCudaPager", "ManagedPager", "PAGER", "prefetch", "synchronize", "zeros"]


class Allocator(Protocol):
    """What the pager needs from the memory system (a real CUDA runtime, or a fake in tests)."""

    def allocate(self, nbytes: int, device: torch.device) -> int: ...  # a pointer to nbytes of managed memory
    def free(self, ptr: int) -> None: ...
    def wrap(self, owner: "ManagedBuffer", device: torch.device) -> torch.Tensor: ...  # uint8 tensor over owner's bytes
    def can_prefetch(self, device: torch.device) -> bool: ...
    def prefetch(self, ptr: int, nbytes: int, device: torch.device) -> None: ...  # asynchronous, current stream
    def synchronize(self, device: torch.device) -> None: ...


class ManagedBuffer:
    """One managed allocation. Tensors made from it keep it alive; when it is collected, it is freed."""

    def __init__(self, allocator: Allocator, nbytes: int, device: torch.device):
        self.ptr = allocator.allocate(nbytes, device)
        self.nbytes = nbytes
        self.device = device
        release = weakref.finalize(self, allocator.free, self.ptr)
        release.atexit = False  # at interpreter exit the CUDA context may already be gone; the driver reclaims it

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 2, "strides": None}

    @property
    def __array_interface__(self) -> dict[str, Any]:  # the same bytes seen from the host, for fake allocators
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}


class ManagedPager:
    """A pager (see :mod:`qoptim.paging`) over an :class:`Allocator`."""

    def __init__(self, allocator: Allocator):
        self.allocator = allocator

    def zeros(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = torch.Size(shape)
        element_size = torch.empty((), dtype=dtype).element_size()
        nbytes = max(1, shape.numel()) * element_size
        buffer = ManagedBuffer(self.allocator, nbytes, device)
        flat = self.allocator.wrap(buffer, device)
        if flat.data_ptr() != buffer.ptr:  # e.g. torch copied it to another device: not paged at all
            raise RuntimeError("the managed buffer could not be wrapped as a tensor without a copy")
        t = flat.view(dtype).view(shape)
        t.zero_()  # managed memory comes uninitialized; zeroing on the device also places it there
        t.is_paged = True
        return t

    def prefetch(self, tensors: Iterable[torch.Tensor], device: torch.device) -> None:
        tensors = list(tensors)
        if not tensors or not self.allocator.can_prefetch(device):
            return  # without concurrent managed access the driver migrates on demand
        for t in tensors:
            self.allocator.prefetch(t.data_ptr(), t.numel() * t.element_size(), device)

    def synchronize(self, device: torch.device) -> None:
        self.allocator.synchronize(device)


# ---- the real CUDA runtime -------------------------------------------------------------

_ATTACH_GLOBAL = 1  # cudaMemAttachGlobal: accessible from any stream on any device
_DEV_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
_MEM_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice


class _MemLocation(ctypes.Structure):  # cudaMemLocation, taken by value by CUDA 13's cudaMemPrefetchAsync
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaRuntime:
    """:class:`Allocator` on the CUDA runtime (libcudart) that torch has loaded, via ctypes."""

    def __init__(self, lib: ctypes.CDLL | None = None):
        self.lib = lib if lib is not None else ctypes.CDLL(_find_cudart())
        self._declare()
        version = ctypes.c_int()
        self._check(self.lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
        self.version = version.value
        self._prefetch_access: dict[int, bool] = {}

    def allocate(self, nbytes: int, device: torch.device) -> int:
        ptr = ctypes.c_void_p()
        with torch.cuda.device(device):
            status = self.lib.cudaMallocManaged(ctypes.byref(ptr), ctypes.c_size_t(nbytes), _ATTACH_GLOBAL)
        self._check(status, "cudaMallocManaged")
        return ptr.value

    def free(self, ptr: int) -> None:
        # cudaFree waits for the device, so no kernel still using the buffer can be cut short
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def wrap(self, owner: ManagedBuffer, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(owner, device=device)

    def can_prefetch(self, device: torch.device) -> bool:
        index = _index(device)
        if index not in self._prefetch_access:
            value = ctypes.c_int()
            status = self.lib.cudaDeviceGetAttribute(ctypes.byref(value), _DEV_ATTR_CONCURRENT_MANAGED_ACCESS, index)
            self._check(status, "cudaDeviceGetAttribute")
            self._prefetch_access[index] = bool(value.value)
        return self._prefetch_access[index]

    def prefetch(self, ptr: int, nbytes: int, device: torch.device) -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        index = _index(device)
        if self.version >= 13000:  # CUDA 13: (ptr, count, location, flags, stream)
            status = self.lib.cudaMemPrefetchAsync(
                ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), _MemLocation(_MEM_LOCATION_DEVICE, index), 0, stream
            )
        else:  # CUDA 11-12: (ptr, count, device, stream)
            status = self.lib.cudaMemPrefetchAsync(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), index, stream)
        self._check(status, "cudaMemPrefetchAsync")

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def _declare(self) -> None:
        lib = self.lib
        lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        # cudaMemPrefetchAsync's arguments depend on the runtime's version: left undeclared and
        # passed as explicit ctypes values

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise RuntimeError(f"{what} failed with CUDA error {status}: {message}")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _find_cudart() -> str:
    """Path of the libcudart that torch uses: the one already mapped into this process when
    there is one (after CUDA is initialized), else the copy next to torch or on the loader path."""
    torch.cuda.init()
    mapped = _mapped_library("libcudart")
    if mapped:
        return mapped
    candidates = []
    for root in {os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(torch.__file__))}:
        candidates += glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
        candidates += glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libcudart.so*"))
        candidates += glob.glob(os.path.join(root, "lib", "libcudart*.so*"))
    found = ctypes.util.find_library("cudart")
    candidates += [found] if found else []
    if not candidates:
        raise OSError("could not find the CUDA runtime library (libcudart) that torch uses")
    return sorted(candidates)[-1]


def _mapped_library(stem: str) -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(stem + ".so"):
                    return path
    except OSError:
        pass
    return None


# ---- the registered pager ---------------------------------------------------------------


class LazyCudaPager:
    """The CUDA pager, loading the CUDA runtime on first use. Where it cannot be loaded (a ROCm
    build of torch, a missing library), paged buffers are ordinary ones, with one warning."""

    def __init__(self):
        self.loaded: ManagedPager | None = None
        self.failed = False

    def load(self) -> ManagedPager | None:
        if self.loaded is None and not self.failed:
            try:
                if torch.version.cuda is None:
                    raise OSError("this torch build has no CUDA runtime")
                self.loaded = ManagedPager(CudaRuntime())
            except (OSError, AttributeError, RuntimeError) as e:
                self.failed = True
                warnings.warn(f"qoptim: paged optimizer states are unavailable ({e}); using ordinary GPU memory", RuntimeWarning)
        return self.loaded

    def zeros(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pager = self.load()
        return pager.zeros(shape, dtype, device) if pager else torch.zeros(shape, dtype=dtype, device=device)

    def prefetch(self, tensors: Iterable[torch.Tensor], device: torch.device) -> None:
        tensors = list(tensors)
        if tensors and self.load():
            self.loaded.prefetch(tensors, device)

    def synchronize(self, device: torch.device) -> None:
        if self.loaded is not None:
            self.loaded.synchronize(device)


# This module is the pager that qoptim.paging registers for "cuda" (by its path, imported on
# first use): its three functions are the one LazyCudaPager's.
PAGER = LazyCudaPager()
zeros, prefetch, synchronize = PAGER.zeros, PAGER.prefetch, PAGER.synchronize
