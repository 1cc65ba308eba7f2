"""Block-wise 8-bit quantization in plain torch ops: the reference every kernel agrees with.

A tensor is read in flat (row-major) order and cut into blocks of ``blocksize`` elements;
the last block may be shorter. Each block keeps one float32 scale, its largest magnitude
(``absmax``), and each element the uint8 index of the code nearest to ``x / absmax``.

Rounding is exact and the same everywhere: ``u = x * (1 / absmax)`` in float32 (0 for an
all-zero block), and the code index is the number of float32 midpoints between neighbouring
codes that lie strictly below ``u``. Zero therefore stays exactly zero.

The optimizers' states that are never negative (the divisors: second moments, RMSprop's and
Adagrad's sums; ``kernels.rules.RuleSpec.signed``) add one rule when they are requantized
(``raise_positive_from_zero``): a positive value never takes code 0, the unsigned map's zero, but
at least code 1, its smallest positive code. Rounded to zero, a small second moment next to a
block's large one would make the step ``lr * m / eps`` (the "zero-point problem", Li et al. 2023);
code 1 overestimates it, which can only shrink the step. An exact zero stays code 0, and the maps
and the checkpoint layout are unchanged. The public ``quantize_blockwise`` keeps plain
round-to-nearest, as bitsandbytes' ``quantize_blockwise``.

A format may round a state stochastically instead (``formats.StateFormat.unsigned_rounding``;
``quantize_stochastic``), so that its codes are right on average: with ``u`` as above, ``k`` is
the last code at or below ``u`` (the first code where ``u`` lies below them all, the last for NaN),
and the element takes code ``k + 1`` when its 16 random bits ``r`` (``master.state_random_bits``)
satisfy ``r < (u - code[k]) * step[k]`` in float32, where ``step[k]`` is the float32 of ``65536 /
(code[k + 1] - code[k])`` and 0 after the last code (``stochastic_steps``): up with probability
(u - code[k]) / (code[k + 1] - code[k]), to 2**-16. Between the first and last codes the code's
expected value is ``u``; below the first code the first is taken (a zero-free map's floor), above
the last the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .maps import midpoints, signed_map
from .master import Draw, state_random_bits

__all__ = [
    "QuantState",
    "quantize_blockwise",
    "dequantize_blockwise",
    "check_blocksize",
    "check_code",
    "num_blocks",
    "block_absmax",
    "quantize_with_absmax",
    "quantize_stochastic",
    "stochastic_steps",
    "raise_positive_from_zero",
    "SMALLEST_POSITIVE_CODE",
    "dequantize_flat",
    "VALID_BLOCKSIZES",
    "BLOCK",
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# The block size of 8-bit optimizer states (one absmax per 256 elements, as in bitsandbytes), and
# so the granularity of non-finite gradient skipping.
BLOCK = 256

# The code a positive value of a never-negative optimizer state takes at least (the unsigned
# map's smallest positive code; code 0 is its zero): see the module docstring.
SMALLEST_POSITIVE_CODE = 1


@dataclass
class QuantState:
    """What dequantizing needs besides the codes (the fields bitsandbytes' QuantState has)."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype


def check_blocksize(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def check_code(code: object) -> torch.Tensor:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor of 256 float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"code must be a float32 tensor of shape (256,), got {code.dtype} of shape {tuple(code.shape)}")
    return code


def num_blocks(n: int, blocksize: int) -> int:
    return max(1, math.ceil(n / blocksize)) if n else 0


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 max |x| of each block of a flat float32 tensor (the last block may be partial)."""
    n = x.numel()
    full = n // blocksize * blocksize
    parts = []
    if full:
        parts.append(x[:full].view(-1, blocksize).abs().amax(dim=1))
    if full < n:
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _scaled(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """u = x * (1 / its block's scale) in float32, 0 in an all-zero block: what both roundings round."""
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return x * inv.repeat_interleave(blocksize)[: x.numel()]


def quantize_with_absmax(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 codes of a flat float32 tensor, given each block's scale."""
    return torch.bucketize(_scaled(x, absmax, blocksize), midpoints(code)).to(torch.uint8)


def stochastic_steps(code: torch.Tensor) -> torch.Tensor:
    """float32 65536 / (code[k + 1] - code[k]) per code, 0 for the last (the module doc): the
    one table of stochastic rounding, which every backend reads rather than divides itself. It is
    divided on the CPU, IEEE-rounded (a GPU may divide as a reciprocal times 65536), and so is the
    same table wherever it is used."""
    host = code.detach().to("cpu", torch.float32)
    return torch.cat([65536.0 / (host[1:] - host[:-1]), host.new_zeros(1)]).to(code.device)


def quantize_stochastic(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, draw: Draw) -> torch.Tensor:
    """uint8 codes of a flat float32 tensor, given each block's scale, rounded stochastically
    (the module doc); element i draws ``state_random_bits(draw.key, draw.first_index + i)``."""
    u = _scaled(x, absmax, blocksize)
    last = code.numel() - 1
    below = torch.bucketize(u, code[1:], right=True)  # the codes after the first at or below u
    k = torch.where(u.isnan(), last, below)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + draw.first_index
    r = state_random_bits(draw.key, index).to(torch.float32)
    up = r < (u - code[k]) * stochastic_steps(code)[k]
    return (k + up).to(torch.uint8)


def raise_positive_from_zero(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The codes of a never-negative optimizer state's values ``x`` (unsigned map), where a
    positive value that rounded to code 0 takes ``SMALLEST_POSITIVE_CODE`` (module docstring)."""
    return torch.where((codes < SMALLEST_POSITIVE_CODE) & (x > 0), SMALLEST_POSITIVE_CODE, codes).to(torch.uint8)


def dequantize_flat(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 values of flat codes: code[q] * absmax of the element's block."""
    return code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = BLOCK,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` block-wise to uint8 codes of the dynamic map (or ``code``).

    Returns ``(codes, QuantState)``: the codes have ``A``'s shape; ``QuantState.absmax`` holds
    one float32 scale per block. ``absmax`` and ``out`` are optional output buffers.
    """
    if not isinstance(A, torch.Tensor) or not A.is_floating_point():
        raise TypeError(f"A must be a floating point tensor, got {getattr(A, 'dtype', type(A).__name__)}")
    blocksize = check_blocksize(blocksize)
    code = signed_map(A.device) if code is None else check_code(code).to(A.device)
    x = A.detach().reshape(-1).float()
    blocks = num_blocks(x.numel(), blocksize)
    scales = block_absmax(x, blocksize) if x.numel() else torch.zeros(0, device=A.device)
    codes = quantize_with_absmax(x, scales, code, blocksize) if x.numel() else torch.zeros(0, dtype=torch.uint8)
    if absmax is not None:
        _check_buffer("absmax", absmax, (blocks,), torch.float32, A.device)
        absmax.copy_(scales)
        scales = absmax
    if out is not None:
        _check_buffer("out", out, tuple(A.shape), torch.uint8, A.device)
        out.copy_(codes.view(A.shape))
        codes = out
    return codes.view(A.shape), QuantState(absmax=scales, code=code, blocksize=blocksize, dtype=A.dtype)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = BLOCK,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax`` per block, as float32
    (or as ``quant_state.dtype`` when a QuantState is given)."""
    if not isinstance(A, torch.Tensor) or A.dtype != torch.uint8:
        raise TypeError(f"A must be a uint8 tensor of codes, got {getattr(A, 'dtype', type(A).__name__)}")
    dtype = torch.float32
    if quant_state is not None:
        absmax, code, blocksize, dtype = quant_state.absmax, quant_state.code, quant_state.blocksize, quant_state.dtype
    if absmax is None:
        raise ValueError("dequantize_blockwise needs either quant_state or absmax")
    blocksize = check_blocksize(blocksize)
    code = signed_map(A.device) if code is None else check_code(code).to(A.device)
    blocks = num_blocks(A.numel(), blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks or not absmax.is_floating_point():
        raise ValueError(
            f"absmax must be a float tensor with one scale per block of {blocksize}: "
            f"{blocks} for {A.numel()} elements, got {getattr(absmax, 'shape', absmax)}"
        )
    values = dequantize_flat(A.reshape(-1), absmax.reshape(-1).float().to(A.device), code, blocksize)
    values = values.view(A.shape).to(dtype)
    if out is not None:
        _check_buffer("out", out, tuple(A.shape), out.dtype, A.device)
        out.copy_(values)
        return out
    return values


def _check_buffer(name: str, t: object, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device}, got {got}")
