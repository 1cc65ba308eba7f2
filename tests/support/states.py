"""An optimizer state's values, and checkpoints."""

import io

import torch

import qoptim.functional as F


def dequantized(state, i):
    """fp32 values of state{i} of one parameter, whatever its layout (4-bit: both states' codes
    in state1's bytes, the first's in the low 4 bits)."""
    if state["state1"].dtype == torch.uint8 and state["qmap1"].numel() == 16:
        codes = (state["state1"].long() >> (4 * (i - 1))) & 0xF
        scales = state[f"absmax{i}"].repeat_interleave(128)[: codes.numel()].view(codes.shape)
        return state[f"qmap{i}"][codes] * scales
    values = state[f"state{i}"]
    if values.dtype != torch.uint8:
        return values.float()
    if f"absmax{i}" in state:
        return F.dequantize_blockwise(values, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
    return state[f"qmap{i}"][values.long()] * state[f"max{i}"]


def block_scales(state, i, n: int) -> torch.Tensor:
    """Each element's scale of quantized state{i} (flat): its block's absmax, or the one scale."""
    if f"absmax{i}" not in state:
        return state[f"max{i}"].expand(n)
    blocksize = 128 if state[f"qmap{i}"].numel() == 16 else 256
    return state[f"absmax{i}"].repeat_interleave(blocksize)[:n]


def round_trip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
