"""How the CPU kernels are compiled: the options every ``njit`` of this package takes.

Numba inlines across modules as within one (``forceinline`` asks LLVM to inline a function
into its callers whatever module they are in), so the kernels can span several files.
"""

from __future__ import annotations

__all__ = ["JIT", "KERNEL", "INLINE"]

# error_model="numpy": float division by zero gives inf/NaN as in torch instead of raising
JIT = dict(cache=True, error_model="numpy")
# The kernels themselves run without Numba's reference counting: they allocate nothing (their
# scratch is on the stack) and only borrow the arrays their caller holds. With it, every slice
# and every array passed down cost a call to NRT_incref / NRT_decref (an atomic add), some
# hundreds per 256-block: once more than all the arithmetic of a step. They release the GIL
# (``launch.run`` runs them on several threads).
KERNEL = dict(_nrt=False, nogil=True, **JIT)
# The helpers of the block loops are inlined into them: a call passes every array of every
# state (tables included) field by field, some hundred words per call and block. (Costs
# ~1 s of compiling per kernel; saves ~25% of a step.)
INLINE = dict(forceinline=True, **KERNEL)
