"""An optimizer state's values, and checkpoints."""

import io

import torch

import qoptim.functional as F


def dequantized(state, i):
    """fp32 values of state{i} of one parameter, whatever its layout."""
    values = state[f"state{i}"]
    if values.dtype != torch.uint8:
        return values.float()
    if f"absmax{i}" in state:
        return F.dequantize_blockwise(values, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
    return state[f"qmap{i}"][values.long()] * state[f"max{i}"]


def round_trip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
