"""`qoptim memory`: how much optimizer state a model needs with fp32 Adam, 8-bit Adam, paged
8-bit Adam and 4-bit Adam, and on which common GPUs its training state fits; then its whole
training state (weights, gradients, master corrections, optimizer states) for each set-up of lean.py.

A model is given as a parameter count ("7B", "350M") or as a Hugging Face config.json read
from disk; a config gives the tensor shapes, so tensors below ``min_8bit_size`` (norms,
biases), which keep fp32 states, are counted as such.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paging import PAGED_MIN_NUMEL
from ..quant.formats import FORMATS
from ..quant.master import CORRECTION_DTYPES, HALF_PRECISION
from . import lean

GPUS = [("24 GB (RTX 4090)", 24), ("40 GB (A100)", 40), ("48 GB (L40S)", 48), ("80 GB (H100)", 80), ("141 GB (H200)", 141)]
SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
QMAP_BYTES = 256 * 4  # one map of an 8-bit state: 256 float32 code values (quant/maps.py), shared by all parameters
ADAM_STATES = 2


@dataclass
class Estimate:
    name: str
    state_bytes: int  # all optimizer state
    resident_bytes: int  # state that must stay in GPU memory (paged state can be evicted)


def tensor_sizes(spec: str) -> tuple[str, list[int]]:
    """(description, element count of every parameter tensor) for a count or a config path."""
    path = Path(spec)
    if names_a_config(spec):
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the model config {spec!r}: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"the model config {spec!r} must hold a JSON object, got {type(config).__name__}")
        return f"{config.get('model_type', 'model')} from {path.name}", _from_config(config)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", spec.lower())
    if not match:
        raise ValueError(f"MODEL_SPEC must be a parameter count like 7B or 350M, or a config.json path; got {spec!r}")
    value = float(match.group(1)) * SUFFIXES.get(match.group(2), 1)
    if not math.isfinite(value):
        raise ValueError(f"parameter count {spec!r} is too large")
    count = int(value)
    if count <= 0:
        raise ValueError(f"a model needs at least one parameter, got {spec!r}")
    return spec.strip(), [count]


def names_a_config(spec: str) -> bool:
    """Whether MODEL_SPEC is a config path (whose tensor shapes are known), not a bare count."""
    return Path(spec).suffix == ".json" or Path(spec).exists()


def _from_config(c: dict) -> list[int]:
    def get(*keys, default=None):
        for k in keys:
            value = c.get(k)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"the config's {k} must be a positive integer, got {value!r}")
            return value
        if default is None:
            raise ValueError(f"the config has none of {keys}")
        return default

    h = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    vocab = get("vocab_size")
    inner = get("intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    heads = get("num_attention_heads", "n_head", default=max(1, h // 64))
    kv = get("num_key_value_heads", default=heads) * get("head_dim", default=h // heads)
    experts = get("num_local_experts", "num_experts", default=1)
    sizes = [vocab * h]
    if c.get("model_type") == "gpt2":
        sizes += [get("n_positions", "max_position_embeddings") * h]
        per_layer = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * inner, inner, inner * h, h]
        sizes += per_layer * layers + [h, h]
    else:  # llama-style: q, k, v, o, gated MLP, two norms
        mlp = [h * inner, h * inner, inner * h] * experts + ([h * experts] if experts > 1 else [])
        sizes += ([h * h, h * kv, h * kv, h * h] + mlp + [h, h]) * layers + [h]
        if not c.get("tie_word_embeddings", True):  # transformers' default is tied
            sizes += [vocab * h]
    return sizes


def quantized_state_bytes(sizes: list[int], bits: int = 8, min_8bit_size: int = 4096) -> int:
    """State bytes of Adam / AdamW with ``bits``-bit states (``quant.formats``), by qoptim's layout:
    a tensor of ``min_8bit_size`` elements or more holds per state a code of ``bits`` bits per
    element (4-bit: both states' codes in one byte) and an fp32 absmax per block of the format,
    and the optimizer two maps shared by all such tensors; a smaller one two fp32 states."""
    fmt = FORMATS[bits]
    big = [s for s in sizes if s >= min_8bit_size]
    codes = sum(ADAM_STATES * s * bits // 8 + ADAM_STATES * 4 * math.ceil(s / fmt.blocksize) for s in big)
    maps = ADAM_STATES * 4 * fmt.codes if big else 0
    return codes + maps + ADAM_STATES * 4 * (sum(sizes) - sum(big))


def eight_bit_state_bytes(sizes: list[int], min_8bit_size: int = 4096) -> int:
    """State bytes of Adam8bit / AdamW8bit (``quantized_state_bytes`` at 8 bits)."""
    return quantized_state_bytes(sizes, 8, min_8bit_size)


def estimate(sizes: list[int], min_8bit_size: int = 4096) -> list[Estimate]:
    n = sum(sizes)
    fp32 = Estimate("Adam / AdamW (fp32 states)", 8 * n, 8 * n)
    eight_bit = eight_bit_state_bytes(sizes, min_8bit_size)
    eight = Estimate("Adam8bit / AdamW8bit", eight_bit, eight_bit)
    # Paged buffers (state1/state2 of tensors of PAGED_MIN_NUMEL elements or more) can be evicted
    # to host memory; scales, qmaps and small tensors' states stay on the GPU.
    pageable = sum(2 * s for s in sizes if s >= max(min_8bit_size, PAGED_MIN_NUMEL))
    paged = Estimate("PagedAdamW8bit", eight.state_bytes, eight.state_bytes - pageable)
    four_bit = quantized_state_bytes(sizes, 4, min_8bit_size)
    return [fp32, eight, paged, Estimate("Adam4bit / AdamW4bit", four_bit, four_bit)]


def training(
    sizes: list[int], min_8bit_size: int = 4096, *, largest_tensor: int | None
) -> list[tuple[lean.Setup, lean.TrainingBytes]]:
    """The whole training state of each set-up in lean.SETUPS, activations aside. Under gradient
    release at most the release bucket and the tensor whose gradient crossed it hold gradients at
    once; ``largest_tensor`` (elements) bounds that tensor, None where the shapes are unknown (then
    only the bucket is counted)."""
    n = sum(sizes)
    rows = []
    for setup in lean.SETUPS.values():
        dtype = getattr(torch, setup.weights)
        width = dtype.itemsize
        grads = width * n
        if setup.release:
            grads = min(grads, setup.release_bucket_bytes + width * (largest_tensor or 0))
        master = 0
        if setup.master_weight_bits is not None and dtype in HALF_PRECISION:  # fp32 weights are their own master
            master = n * CORRECTION_DTYPES[setup.master_weight_bits].itemsize
        bits = setup.state_bits
        smallest = min_8bit_size if setup.min_8bit_size is None else setup.min_8bit_size  # (a set-up's own, where it has one)
        states = 8 * n if bits == 32 else quantized_state_bytes(sizes, bits, smallest)
        rows.append((setup, lean.TrainingBytes(width * n, grads, master, states)))
    return rows


def training_lines(sizes: list[int], min_8bit_size: int, *, largest_tensor: int | None) -> list[str]:
    n = sum(sizes)
    lines = [
        "whole training state, bytes per parameter (activations not counted):",
        "",
        f"{'set-up':<30} {'weights':>7} {'grads':>6} {'master':>6} {'states':>6} {'total':>6} {'in all':>11}  fits on",
    ]
    for setup, b in training(sizes, min_8bit_size, largest_tensor=largest_tensor):
        columns = ((b.weights, 7), (b.grads, 6), (b.master, 6), (b.states, 6), (b.total, 6))
        parts = " ".join(f"{x / n:>{width}.2f}" for x, width in columns)
        fits = [name for name, gb in GPUS if b.total <= gb * 1e9] or ["none of these"]
        lines.append(f"{setup.name:<30} {parts} {_gib(b.total):>11}  {', '.join(fits)}")
    lines += [""] + [f"{setup.name}: {setup.description}" for setup in lean.SETUPS.values()]
    lines.append("master: the bf16 weight's int8 (24-bit master) or int16 (32-bit) correction; fp32 weights are their own.")
    release = "release: each gradient is applied and freed in backward, so the gradients held are one tensor's"
    if largest_tensor is None:
        release += " (a bare parameter count has no shapes: not counted; give a config.json)"
    lines.append(release + ".")
    return lines


def report(spec: str, dtype_bytes: int = 2, min_8bit_size: int = 4096) -> str:
    what, sizes = tensor_sizes(spec)
    n = sum(sizes)
    model_bytes = 2 * dtype_bytes * n  # weights and gradients
    lines = [
        f"{what}: {n:,} parameters, weights + gradients {_gib(model_bytes)} at {dtype_bytes} bytes each",
        "",
        f"{'optimizer':<28} {'state':>11} {'B/param':>8} {'on GPU':>11}  training state fits on (activations not counted)",
    ]
    for e in estimate(sizes, min_8bit_size):
        need = model_bytes + e.resident_bytes
        fits = [name for name, gb in GPUS if need <= gb * 1e9] or ["none of these"]
        lines.append(f"{e.name:<28} {_gib(e.state_bytes):>11} {e.state_bytes / n:>8.3f} {_gib(e.resident_bytes):>11}  {', '.join(fits)}")
    lines += ["", "on GPU: state that must stay resident; paged state pages to host memory under pressure (at PCIe speed).", ""]
    lines += training_lines(sizes, min_8bit_size, largest_tensor=max(sizes) if names_a_config(spec) else None)
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

