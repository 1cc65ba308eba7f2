"""SGD with momentum (torch.optim.SGD's update), with ``dampening`` and ``nesterov`` honoured."""

from __future__ import annotations

from typing import Any

from .optimizer import Optimizer1State
from .variants import FixedVariant, variant

__all__ = ["SGD", "SGD8bit", "SGD32bit", "MomentumSettings", "check_momentum", "synced_momentum"]

NAMED = ("momentum", "dampening")  # torch's group keys for what bitsandbytes keeps in betas[:2]


def check_momentum(name: str, momentum, dampening, nesterov) -> None:
    """bitsandbytes' rules (the state is the momentum buffer; momentum and dampening are checked
    as its betas, in [0, 1)) in torch's words, and torch's rule for nesterov."""
    if momentum == 0:
        raise NotImplementedError(f"{name} without momentum is not supported!")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum} (bitsandbytes: Invalid beta parameter at index 0: {momentum})")
    if not 0.0 <= dampening < 1.0:
        raise ValueError(f"Invalid dampening value: {dampening} (bitsandbytes: Invalid beta parameter at index 1: {dampening})")
    if nesterov and dampening != 0:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def synced_momentum(group: dict[str, Any], given: set[str] | None, seen: tuple | None) -> tuple:
    """Make ``group``'s two spellings of (momentum, dampening) agree and return the pair:
    bitsandbytes' ``betas[:2]`` and torch's ``momentum``/``dampening``.

    A new group (``given``: the keys its caller set) takes the spelling its caller used; both
    used and disagreeing is an error. Before a step (``seen``: the pair of the last step, if this
    group took one) the spelling that was changed since wins, so that user code and schedulers
    may edit either; both changed to different values, or a loaded group whose two spellings
    disagree, is an error."""
    betas = tuple(group["betas"][:2]) if "betas" in group else None
    named = tuple(group[key] for key in NAMED) if all(key in group for key in NAMED) else None
    if given is not None:  # a new group: torch's add_param_group filled in the defaults
        betas = betas or (group["momentum"], group["dampening"])
        named = tuple(group.get(key, betas[i]) for i, key in enumerate(NAMED))
        if "betas" in given and not given.isdisjoint(NAMED) and named != betas:
            raise ValueError(f"a param group sets momentum={named[0]}, dampening={named[1]} and betas={group['betas']}, "
                             "which disagree (bitsandbytes keeps (momentum, dampening) in betas): set one of them")  # fmt: skip
        pair = named if not given.isdisjoint(NAMED) else betas
    elif named is None or betas is None or named == betas:
        pair = betas or named
    elif seen is not None and named == seen:
        pair = betas
    elif seen is not None and betas == seen:
        pair = named
    else:
        raise ValueError(f"momentum={named[0]}, dampening={named[1]} disagree with betas={group['betas']} (bitsandbytes "
                         "keeps (momentum, dampening) in betas); change one of them, or both alike")  # fmt: skip
    group["momentum"], group["dampening"] = pair
    if betas != pair:
        group["betas"] = (*pair, *tuple(group.get("betas", ()))[2:])
    return pair


class MomentumSettings:
    """The settings of the momentum families (SGD, LARS): bitsandbytes keeps ``(momentum,
    dampening)`` in ``betas``, torch in ``momentum`` and ``dampening``; every group holds both,
    kept in agreement (``synced_momentum``: the one set or changed wins). ``nesterov`` is a group
    setting of their own."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A loaded group in one spelling (bitsandbytes': betas only) gets the other from it, not
        from the defaults."""
        for group in state.get("param_groups", ()):
            if "betas" in group:
                group.setdefault("momentum", group["betas"][0])
                group.setdefault("dampening", group["betas"][1])
        super().__setstate__(state)

    def add_param_group(self, param_group) -> None:
        given = set(param_group) if isinstance(param_group, dict) else set()
        super().add_param_group(param_group)
        synced_momentum(self.param_groups[-1], given, None)

    def check_group(self, gindex: int, group: dict[str, Any]) -> None:
        seen = self.__dict__.setdefault("_momentum_seen", {})  # gindex -> (id(group), its last step's pair)
        last = seen.get(gindex)
        try:
            pair = synced_momentum(group, None, last[1] if last and last[0] == id(group) else None)
            check_momentum(type(self).__name__.removesuffix("8bit").removesuffix("32bit"), *pair, group.get("nesterov"))
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"param group {gindex}: {e}") from None
        seen[gindex] = (id(group), pair)
        super().check_group(gindex, group)

    def hyper(self, config, step):
        momentum, dampening = config["betas"][:2]
        hp = super().hyper(config, step)
        return hp._replace(beta1=0.0, beta2=0.0, momentum=float(momentum), dampening=float(dampening),
                           nesterov=bool(config.get("nesterov")))  # fmt: skip


class SGD(FixedVariant, MomentumSettings, Optimizer1State):
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest"):  # fmt: skip
        check_momentum(type(self).__name__.removesuffix("8bit").removesuffix("32bit"), momentum, dampening, nesterov)
        # bitsandbytes keeps (momentum, dampening) in betas
        super().__init__("momentum", params, lr, (momentum, dampening), 0.0, weight_decay, self.state_bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding)  # fmt: skip
        self.add_group_defaults(nesterov=nesterov, momentum=momentum, dampening=dampening)


SGD8bit = variant(SGD, "SGD8bit", drop=("optim_bits",), fixed_bits=8)
SGD32bit = variant(SGD, "SGD32bit", drop=("optim_bits",), fixed_bits=32)
