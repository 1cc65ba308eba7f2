"""`qoptim memory`: how much optimizer state a model needs with fp32 Adam, 8-bit Adam and
paged 8-bit Adam, and on which common GPUs its training state fits.

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

from ..paging import PAGED_MIN_NUMEL
from ..quant.blockwise import BLOCK

GPUS = [("24 GB (RTX 4090)", 24), ("40 GB (A100)", 40), ("48 GB (L40S)", 48), ("80 GB (H100)", 80), ("141 GB (H200)", 141)]
SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclass
class Estimate:
    name: str
    state_bytes: int  # all optimizer state
    resident_bytes: int  # state that must stay in GPU memory (paged state can be evicted)


def tensor_sizes(spec: str) -> tuple[str, list[int]]:
    """(description, element count of every parameter tensor) for a count or a config path."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
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


def estimate(sizes: list[int], min_8bit_size: int = 4096) -> list[Estimate]:
    n = sum(sizes)
    fp32 = Estimate("Adam / AdamW (fp32 states)", 8 * n, 8 * n)
    big = [s for s in sizes if s >= min_8bit_size]
    small = n - sum(big)
    quantized = sum(2 * s + 8 * math.ceil(s / BLOCK) for s in big)
    eight = Estimate("Adam8bit / AdamW8bit", quantized + 8 * small, quantized + 8 * small)
    # Paged buffers (state1/state2 of tensors of PAGED_MIN_NUMEL elements or more) can be evicted
    # to host memory; scales and small tensors' states stay on the GPU.
    pageable = sum(2 * s for s in big if s >= PAGED_MIN_NUMEL)
    paged = Estimate("PagedAdamW8bit", eight.state_bytes, eight.state_bytes - pageable)
    return [fp32, eight, paged]


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
    lines += ["", "on GPU: state that must stay resident; paged state pages to host memory under pressure (at PCIe speed)."]
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

