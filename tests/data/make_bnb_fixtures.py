"""Write the bitsandbytes checkpoint fixtures used by ``tests/compat/`` (``test_bnb_checkpoints.py`` and the others).

Needs bitsandbytes 0.50.2 (not a qoptim dependency)::

    pip install bitsandbytes==0.50.2
    python tests/data/make_bnb_fixtures.py

For each optimizer in ``FIXTURES`` it builds the same three-parameter model, runs ``K`` steps
with fixed gradients, and saves ``bnb_<name>.pt`` (``torch.save``; loads with
``weights_only=True``) holding

* ``state_dict``: ``optimizer.state_dict()`` after ``K`` steps, exactly as bitsandbytes writes it;
* ``params``: the parameters after ``K`` steps (see "size" below), fp16 storage, exact;
* ``update``: bitsandbytes' parameters after ``K + M`` steps minus ``params`` (what bitsandbytes'
  ``M`` further steps with the gradients of ``bnb_grads.pt`` changed), rounded to fp16 (see "size");
* ``meta``: versions, class name, constructor kwargs, ``K``, ``M``, seed.

``bnb_grads.pt`` holds the ``M`` gradients shared by all fixtures (every fixture uses the same
model and gradient sequence), fp16 storage, exact.

The model: ``weight`` (40, 103) = 4120 elements: >= min_8bit_size (4096), so it gets 8-bit
state, and 4120 = 16*256 + 24, so its last 256-block is partial; ``bias`` (103,) and ``scale`` (40,)
are below min_8bit_size, so they keep fp32 state even in the 8-bit optimizers. The weight's
gradient magnitude varies by row (1e-2 down to ~1e-4) so that block absmax values differ.

Size: everything together must stay well under 200 KB. To get there, all gradients are rounded
to fp16-representable values (then used as fp32, so fp16 storage is lossless), and after the
``K`` steps the parameters are rounded to fp16-representable values *before* bitsandbytes takes
the remaining ``M`` steps (optimizer states do not depend on the parameter values, and AdamW's
decay of steps K+1.. then starts from exactly the stored values), so ``params`` is stored
losslessly in fp16. The only lossy item is ``update``: the fp32 difference (after K+M steps) -
``params`` is rounded to fp16, a relative error <= 2**-11 of the update (about 1e-6 absolute for the
~2e-3 updates here); the test accounts for it. Storing the fp32 parameters instead would add
~35 KiB and take the total past 200 KB.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEED = 1234
K = 5  # steps taken before the checkpoint
M = 2  # steps taken after it (the test repeats them with qoptim)
SHAPES = {"weight": (40, 103), "bias": (103,), "scale": (40,)}

# file stem -> (bitsandbytes class name, constructor kwargs)
FIXTURES = {
    "adam8bit": ("Adam8bit", {"lr": 1e-3}),
    "adamw8bit": ("AdamW8bit", {"lr": 1e-3, "weight_decay": 0.01}),
    "pagedadamw8bit": ("PagedAdamW8bit", {"lr": 1e-3}),
    "adam32bit": ("Adam", {"lr": 1e-3}),
}


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest fp16 value, as fp32."""
    return t.to(torch.float16).to(torch.float32)


def initial_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    params = {
        "weight": torch.randn(SHAPES["weight"], generator=g) * 0.1,
        "bias": torch.randn(SHAPES["bias"], generator=g) * 0.1,
        "scale": 1.0 + 0.1 * torch.randn(SHAPES["scale"], generator=g),
    }
    return {k: fp16_exact(v) for k, v in params.items()}


def gradient_sequence(steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    rows = SHAPES["weight"][0]
    row_scale = 10.0 ** (-2.0 * torch.arange(rows, dtype=torch.float32) / rows)
    out = []
    for _ in range(steps):
        grads = {
            "weight": torch.randn(SHAPES["weight"], generator=g) * 0.01 * row_scale[:, None],
            "bias": torch.randn(SHAPES["bias"], generator=g) * 0.01,
            "scale": torch.randn(SHAPES["scale"], generator=g) * 0.003,
        }
        out.append({k: fp16_exact(v) for k, v in grads.items()})
    return out


def make_fixture(bnb, class_name: str, kwargs: dict, grads: list[dict[str, torch.Tensor]]) -> dict:
    params = {k: torch.nn.Parameter(v.clone()) for k, v in initial_params().items()}
    opt = getattr(bnb.optim, class_name)(list(params.values()), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PagedAdamW8bit on CPU: "falling back to non-paged"
        for step in range(K + M):
            if step == K:
                # a copy: the state dict references the live state tensors, which the next steps update in place
                state_dict = copy.deepcopy(opt.state_dict())
                with torch.no_grad():
                    for p in params.values():
                        p.copy_(fp16_exact(p))
                params_k = {k: p.detach().to(torch.float16) for k, p in params.items()}
            for k, p in params.items():
                p.grad = grads[step][k].clone()
            opt.step()
    return {
        "meta": {
            "bitsandbytes": str(bnb.__version__),
            "torch": str(torch.__version__),
            "class": class_name,
            "kwargs": dict(kwargs),
            "K": K,
            "M": M,
            "seed": SEED,
            "names": list(params),
        },
        "state_dict": state_dict,
        "params": params_k,
        "update": {k: (p.detach() - params_k[k].float()).to(torch.float16) for k, p in params.items()},
    }


def main() -> None:
    import bitsandbytes as bnb

    if bnb.__version__ != "0.50.2":
        raise SystemExit(f"these fixtures are defined for bitsandbytes 0.50.2, found {bnb.__version__}")
    grads = gradient_sequence(K + M)
    torch.save(
        {"K": K, "M": M, "seed": SEED, "grads": [{k: v.to(torch.float16) for k, v in g.items()} for g in grads[K:]]},
        HERE / "bnb_grads.pt",
    )
    for stem, (class_name, kwargs) in FIXTURES.items():
        torch.save(make_fixture(bnb, class_name, kwargs, grads), HERE / f"bnb_{stem}.pt")
    total = 0
    for path in sorted(HERE.glob("bnb_*.pt")):
        size = path.stat().st_size
        total += size
        print(f"{path.name:24s} {size / 1024:7.1f} KiB")
    print(f"{'total':24s} {total / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
