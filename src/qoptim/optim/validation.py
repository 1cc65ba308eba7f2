"""Checks: of the constructor's arguments, of each param group and parameter before a step
changes anything, as bitsandbytes words its errors where it has them."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ..quant.formats import NEAREST_ROUNDING, STOCHASTIC_ROUNDING
from . import dtensor

__all__ = [
    "NONFINITE_MODES", "PARAM_DTYPES", "STATE_ROUNDINGS", "check_group", "check_hyper", "check_param", "check_settings",
    "check_state_rounding",
]  # fmt: skip

NONFINITE_MODES = ("skip", "raise", "propagate")  # what a NaN/Inf gradient does
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# How never-negative quantized states round to their codes (``state_rounding``): None, their
# format's own way (8-bit: to nearest, as bitsandbytes; 4-bit: stochastically), or either way.
STATE_ROUNDINGS = (None, NEAREST_ROUNDING, STOCHASTIC_ROUNDING)


def check_hyper(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")  # torch's text (bitsandbytes fails on it with a RuntimeError)
    lr_value = float(lr) if isinstance(lr, torch.Tensor) else lr
    if not _real(lr_value) or not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _real(eps) or not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or not 1 <= len(betas) <= 3:
        raise ValueError(f"Invalid betas: {betas!r}; expected a tuple of 2 (or 3) floats in [0, 1)")
    for i, beta in enumerate(betas):
        if not _real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not _real(weight_decay) or not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _real(x: Any) -> bool:
    """``isinstance(x, numbers.Real)``, a float's answer without the ABC's (checked every step)."""
    return type(x) is float or isinstance(x, numbers.Real)


def check_settings(*, optim_bits, min_8bit_size, percentile_clipping, max_unorm, skip_zeros, block_wise, is_paged, nonfinite,
                   state_rounding, spec, four_bit: bool) -> None:  # fmt: skip
    """The constructor's settings besides the hyperparameters, for a rule of ``spec`` (``kernels.rules.RuleSpec``:
    LAMB and LARS, layer-wise, take ``max_unorm``; rounding takes a never-negative state); ``four_bit``: the rule
    takes 4-bit states."""
    check_state_rounding(state_rounding)
    if state_rounding == STOCHASTIC_ROUNDING and all(spec.signed):
        raise ValueError("state_rounding='stochastic' rounds never-negative states (second moments, sums of squares); "
                         "this optimizer's states may all be negative, and round to nearest")  # fmt: skip
    if state_rounding == STOCHASTIC_ROUNDING and block_wise is not True:
        raise ValueError("state_rounding='stochastic' rounds block-wise states: block_wise=False (one scale per tensor) "
                         "is not supported with it")  # fmt: skip
    check_bits(optim_bits, block_wise, four_bit, ValueError)
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
    if isinstance(percentile_clipping, bool) or not isinstance(percentile_clipping, int) or not 1 <= percentile_clipping <= 100:
        raise ValueError(f"percentile_clipping must be an int in [1, 100] (100 disables it), got {percentile_clipping!r}")
    if not isinstance(max_unorm, numbers.Real) or max_unorm < 0 or (max_unorm and not spec.trust):
        raise ValueError(f"max_unorm must be 0, or >= 0 for LAMB and LARS (layer-wise), got max_unorm={max_unorm!r}")
    if skip_zeros:
        raise ValueError("skip_zeros=True is not supported: elements with zero gradient get the ordinary update")
    for flag, value in (("block_wise", block_wise), ("is_paged", is_paged)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")


def check_state_rounding(state_rounding: Any) -> None:
    if state_rounding not in STATE_ROUNDINGS:
        raise ValueError(f"state_rounding must be one of {STATE_ROUNDINGS}, got {state_rounding!r}")


def check_bits(optim_bits, block_wise, four_bit: bool, error: type[Exception]) -> None:
    """The state precision: 32 or 8, or 4 for the rules that take it (``names.OptimizerName``),
    block-wise; ``error``: bitsandbytes raises a ValueError in the constructor and a
    NotImplementedError on a parameter's override."""
    if optim_bits == 4 and four_bit:
        if block_wise is not True:
            raise ValueError("4-bit states are block-wise: block_wise=False is not supported with optim_bits=4")
        return
    if optim_bits not in (8, 32):
        if error is NotImplementedError:
            raise NotImplementedError(f"Amount of optimizer bits not supported: {optim_bits}")
        also = " (or 4: Adam and AdamW)" if not four_bit else " or 4"
        raise ValueError(f"optim_bits must be 8 or 32{also}, got {optim_bits!r}")


def check_group(gindex: int, group: dict[str, Any]) -> None:
    """Hyperparameters can change between steps (schedulers, user code): check them each step."""
    if all(key in group for key in ("lr", "betas", "eps", "weight_decay")):
        try:
            check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        except ValueError as e:
            raise ValueError(f"param group {gindex}: {e}") from None


def check_param(opt, gindex: int, pindex: int, group: dict[str, Any], p: torch.Tensor) -> None:
    """A parameter and its gradient, before ``opt`` (an ``Optimizer8bit``) steps: what it can
    update, and an existing state that fits it."""
    name = f"parameter {pindex} of param group {gindex}"
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients ({name})")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} has dtype {p.dtype}; supported parameter dtypes are float32, float16 and bfloat16")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"the gradient of {name} must match it: parameter {p.dtype} {tuple(p.shape)} on {p.device}, "
            f"gradient {g.dtype} {tuple(g.shape)} on {g.device}"
        )
    if dtensor.is_dtensor(p):
        dtensor.check_param(p, opt.get_config(gindex, pindex, group), layer_wise=opt.layer_wise)
    state = opt.state[p]
    if state:
        for kept in opt.layout:
            values = state.get(kept.keys.values)
            if values is not None and (values.shape != kept.shape(p) or values.device != p.device):
                raise ValueError(
                    f"{kept.keys.values} of {name} is {tuple(values.shape)} on {values.device}, "
                    f"but the parameter is {tuple(p.shape)} on {p.device}"
                )
    else:
        config = opt.get_config(gindex, pindex, group)
        check_bits(config["optim_bits"], config["block_wise"], opt.four_bit, NotImplementedError)
    if opt.nonfinite == "raise" and not bool(torch.isfinite(g).all()):
        raise FloatingPointError(f"the gradient of {name} holds NaN or Inf values; nothing was updated")
    if not state and any(kept.rows > 1 for kept in opt.layout):
        _check_stacked(name, type(opt).__name__, config, p)


def _check_stacked(name: str, owner: str, config: dict[str, Any], p: torch.Tensor) -> None:
    """Stacked states (AdEMAMix's two momenta in state1) keep one scale per block and row: one
    scale per tensor (``block_wise=False``) would be shared by the rows."""
    if config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"] and not config["block_wise"]:
        raise ValueError(f"{name}: {owner} keeps block-wise 8-bit states only (block_wise=False is not supported)")
