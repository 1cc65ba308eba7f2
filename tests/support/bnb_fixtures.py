"""bitsandbytes 0.50.2's checkpoints (``tests/data/bnb_*.pt``, made by
``tests/data/make_bnb_fixtures.py``; see its docstring for what each file holds), the optimizers
they came from, and layout comparisons: shared by the ``tests/compat`` tests."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"
STEMS = ["adam8bit", "adamw8bit", "pagedadamw8bit", "adam32bit"]
QUANT_KEY = "__bnb_optimizer_quant_state__"
GROUP_KEYS = ["lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3", "params"]


def load_fixture(stem: str) -> dict:
    return torch.load(DATA / f"bnb_{stem}.pt", weights_only=True)


def next_grads() -> list[dict[str, torch.Tensor]]:
    data = torch.load(DATA / "bnb_grads.pt", weights_only=True)
    return [{k: v.float() for k, v in g.items()} for g in data["grads"]]


def fixture_optimizer(lib, fx: dict, params: dict[str, torch.Tensor] | None = None):
    """The fixture's optimizer class from ``lib`` (qoptim or bitsandbytes) over fresh fp32 copies
    of the fixture's parameters (after K steps) or of ``params``."""
    meta = fx["meta"]
    source = fx["params"] if params is None else params
    ps = [torch.nn.Parameter(source[n].detach().float().clone()) for n in meta["names"]]
    return getattr(lib.optim, meta["class"])(ps, **meta["kwargs"]), ps


def take_steps(opt, ps, names, grads) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers on CPU warn that they fall back to non-paged
        for g in grads:
            for n, p in zip(names, ps):
                p.grad = g[n].clone()
            opt.step()


def ulp16(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp16 numbers at |x| (upwards), as fp32."""
    a = x.to(torch.float16).abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).float()


def assert_same_layout(got, want, where="state_dict", values=True) -> None:
    """``got`` has exactly ``want``'s structure: same dict keys in the same order, same
    container and scalar types, tensors of the same dtype and shape (and, with ``values``,
    equal contents and scalars)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same_layout(got[k], want[k], f"{where}[{k!r}]", values)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_layout(a, b, f"{where}[{i}]", values)
    elif isinstance(want, torch.Tensor):
        got_kind, want_kind = (got.dtype, tuple(got.shape)), (want.dtype, tuple(want.shape))
        assert got_kind == want_kind, f"{where}: {got_kind} != {want_kind}"
        if values:
            assert torch.equal(got, want), f"{where}: values differ"
    elif values:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_live_state_equals(opt, ps, saved_state: dict) -> None:
    """The optimizer's live per-parameter state holds exactly the saved (bitsandbytes-layout) state."""
    for index, p in enumerate(ps):
        saved = saved_state[index]
        live = opt.state[p]
        assert type(live["step"]) is int and live["step"] == saved["step"]
        want = dict(saved[QUANT_KEY])
        assert set(live) == {"step", *want}, f"param {index}: live keys {sorted(live)}"
        for key, t in want.items():
            assert live[key].dtype == t.dtype and live[key].shape == t.shape, f"param {index} {key}"
            assert live[key].device == p.device
            assert torch.equal(live[key], t), f"param {index}: {key} differs from the loaded one"
