"""Issue #16, "never takes a wild step": torch AdamW, qoptim AdamW8bit and (when importable)
bitsandbytes AdamW8bit side by side on the CPU.

    python benchmarks/wild_steps.py               # the repros and a ReLU conv net, 300 steps
    python benchmarks/wild_steps.py --steps 500

Rows:
  * item 1, a tiny second moment: g = 1e-4 everywhere but 1.0 at [0], then g = 0 (a dead unit);
    p[1] after the two steps (lr 1e-3), and the largest single update;
  * item 2, a finite spike: g = 1e-3 with 2e19 at [7], two steps (lr 1e-2): NaN parameters, the
    largest update, and the second-step update of an element of the spike's block and of another;
  * item 2, uniform huge gradients (3e20, two steps): NaN parameters, the largest update;
  * a ReLU conv net on synthetic data (a fixed random teacher's labels, balanced), default settings but the
    learning rate: the largest single update of any element in any step, and the final loss
    (mean of the last 10 steps).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import qoptim


def _bitsandbytes():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: PLC0415  (optional: the comparison runs without it)
    except Exception:  # noqa: BLE001  (any failure to load it means: no bitsandbytes column)
        return None
    return bitsandbytes


def optimizers(lr: float, weight_decay: float, min_8bit_size: int = 4096) -> dict:
    """name -> factory of an optimizer over a list of parameters."""
    made = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay),
        "qoptim AdamW8bit": lambda ps: qoptim.AdamW8bit(ps, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size),
    }
    bnb = _bitsandbytes()
    if bnb is not None:
        made["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    return made


def run_grads(make, p0: torch.Tensor, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """The parameter after each gradient, and the largest single update of any element."""
    p = nn.Parameter(p0.clone())
    opt = make([p])
    trail, largest, before = [], 0.0, p0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        now = p.detach().clone()
        step = (now - before).abs()
        largest = max(largest, float(step[~step.isnan()].max()) if (~step.isnan()).any() else float("nan"))
        trail.append(now)
        before = now
    return trail, largest


def item1() -> None:
    print("item 1: g = 1e-4 (1.0 at [0]), then g = 0; AdamW8bit(lr=1e-3, weight_decay=0, min_8bit_size=0)")
    first = torch.full((256,), 1e-4)
    first[0] = 1.0
    print(f"  {'optimizer':<24} {'p[1] after 2 steps':>20} {'largest update':>16}")
    for name, make in optimizers(1e-3, 0.0, min_8bit_size=0).items():
        trail, largest = run_grads(make, torch.zeros(256), [first, torch.zeros(256)])
        print(f"  {name:<24} {trail[-1][1].item():>20.6g} {largest:>16.4g}")


def item2_spike() -> None:
    print("item 2: g = 1e-3 with 2e19 at [7], two steps; AdamW8bit(lr=1e-2, min_8bit_size=0)")
    g = torch.full((4096,), 1e-3)
    g[7] = 2e19
    print(f"  {'optimizer':<24} {'NaN params':>10} {'largest update':>16} {'step 2 of [7]':>14} {'of [8]':>10} {'of [300]':>10}")
    for name, make in optimizers(1e-2, 1e-2, min_8bit_size=0).items():
        trail, largest = run_grads(make, torch.zeros(4096), [g, g])
        second = trail[1] - trail[0]
        nan = int(torch.isnan(trail[-1]).sum())
        print(f"  {name:<24} {nan:>10} {largest:>16.4g} {second[7].item():>14.4g} {second[8].item():>10.4g} {second[300].item():>10.4g}")


def item2_uniform() -> None:
    print("item 2: uniform g = 3e20, two steps; AdamW8bit(lr=1e-2, min_8bit_size=0)")
    g = torch.full((4096,), 3e20)
    print(f"  {'optimizer':<24} {'NaN params':>10} {'largest update':>16}")
    for name, make in optimizers(1e-2, 1e-2, min_8bit_size=0).items():
        trail, largest = run_grads(make, torch.zeros(4096), [g, g])
        print(f"  {name:<24} {int(torch.isnan(trail[-1]).sum()):>10} {largest:>16.4g}")


class ConvNet(nn.Module):
    """A plain ReLU conv net (18k + 37k-element conv weights: 8-bit states at the default
    min_8bit_size of 4096)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


def convnet(steps: int, lr: float) -> None:
    print(f"ReLU conv net, synthetic 3x16x16 data (teacher labels), batch 64, {steps} steps, AdamW(lr={lr}) defaults")
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(steps, 64, 3, 16, 16, generator=gen)
    torch.manual_seed(1)
    teacher = ConvNet()
    with torch.no_grad():  # each class's logit standardized over the data: balanced classes
        logits = torch.stack([teacher(x) for x in data])
        labels = ((logits - logits.mean(dim=(0, 1))) / logits.std(dim=(0, 1))).argmax(dim=2)
    torch.manual_seed(2)
    init = ConvNet().state_dict()
    print(f"  {'optimizer':<24} {'largest update':>16} {'final loss':>11} {'NaN':>5}")
    for name, make in optimizers(lr, 1e-2).items():
        model = ConvNet()
        model.load_state_dict(init)
        params = list(model.parameters())
        opt = make(params)
        largest, losses = 0.0, []
        for x, y in zip(data, labels):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in params]
            opt.step()
            largest = max(largest, max(float((p.detach() - b).abs().max()) for p, b in zip(params, before)))
            losses.append(loss.item())
        nan = any(bool(torch.isnan(p).any()) for p in params)
        print(f"  {name:<24} {largest:>16.4g} {sum(losses[-10:]) / 10:>11.4f} {str(nan):>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the conv net")
    parser.add_argument("--lrs", default="1e-3,1e-2", help="learning rates of the conv net, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    item1()
    print()
    item2_spike()
    print()
    item2_uniform()
    for lr in (float(x) for x in args.lrs.split(",")):
        print()
        convnet(args.steps, lr)


if __name__ == "__main__":
    main()
