"""The bitsandbytes class variants of an optimizer family: ``*8bit`` and ``*32bit`` (and qoptim's
``*4bit``) fix the state precision, ``Paged*`` fix paging, and some drop the constructor argument they fix."""

from __future__ import annotations

import inspect
import sys

__all__ = ["FixedVariant", "variant"]


class FixedVariant:
    """Class-level choices: ``fixed_bits`` (4, 8 or 32) overrides ``optim_bits``, ``fixed_paged``
    overrides ``is_paged``; the plain class leaves both to its arguments."""

    fixed_bits: int | None = None
    fixed_paged: bool = False
    default_bits: int = 32  # the optim_bits default an 8-bit class accepts (bitsandbytes' compatibility rule)

    def state_bits(self, optim_bits: int = 32, amsgrad: bool = False) -> int:
        """The state precision of this class for the constructor's ``optim_bits`` (and ``amsgrad``, refused)."""
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        if self.fixed_bits in (4, 8) and optim_bits != self.default_bits:
            raise ValueError(f"{name} only supports optim_bits={self.default_bits} (default value for compatibility)")
        return optim_bits if self.fixed_bits is None else self.fixed_bits


def variant(base: type, name: str, drop: tuple[str, ...] = (), defaults: dict | None = None, **attributes) -> type:
    """A subclass of ``base`` named ``name`` whose constructor is ``base``'s without the
    arguments in ``drop`` (passing one is a TypeError, as for any unknown argument) and with
    other ``defaults``, with class ``attributes`` such as ``fixed_bits=8`` or ``fixed_paged=True``."""
    defaults = defaults or {}
    signature = inspect.signature(base.__init__)
    signature = signature.replace(
        parameters=[
            p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values() if p.name not in drop
        ]
    )

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        base.__init__(**bound.arguments)

    __init__.__signature__ = signature
    # the defining module, as namedtuple does, so that the class pickles by reference
    module = sys._getframe(1).f_globals.get("__name__", base.__module__)
    namespace = {"__init__": __init__, "__module__": module, "__qualname__": name, **attributes}
    namespace["__doc__"] = base.__doc__
    return type(name, (base,), namespace)
