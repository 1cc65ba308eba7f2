"""Two-process (gloo, CPU) checks of gradient release (qoptim.release_gradients) under FSDP2, and its
refusal of DDP and FSDP1.

Launched by tests/distributed/test_release.py with ``python -m torch.distributed.run --nproc_per_node=2``.
Rank 0 writes ``results.json`` into the directory given as argv[1].
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel

import gloo  # (this folder's: see gloo.py)
import qoptim
from gloo import all_ranks
from qoptim.optim import dtensor as qdt

OUT = sys.argv[1]
RESULTS: dict[str, object] = {}
STEPS = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8))


def fsdp2_model(mesh) -> nn.Module:
    return gloo.fully_shard_layers(make_model(), mesh)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)


def loss_of(model, step, rank):
    x, y = batch(step, rank)
    return nn.functional.mse_loss(model(x), y)




def same(model_a, opt_a, model_b, opt_b) -> bool:
    """Local shards of parameters and states equal, bit for bit."""
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        if not torch.equal(qdt.local(a), qdt.local(b)):
            return False
        sa, sb = opt_a.state[a], opt_b.state[b]
        if sa.keys() != sb.keys():
            return False
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                if not torch.equal(qdt.local(value), qdt.local(sb[key])):
                    return False
            elif value != sb[key]:
                return False
    return True


def make_opt(model):
    opt = qoptim.AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=256)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def check_fsdp2(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    models = [fsdp2_model(mesh) for _ in range(4)]
    (normal, o1, s1), (released, o2, s2) = [(m, *make_opt(m)) for m in models[:2]]
    qoptim.release_gradients(o2, bucket_bytes=8192)
    freed = True
    for step in range(STEPS):
        for model, opt, sched in ((normal, o1, s1), (released, o2, s2)):
            loss_of(model, step, rank).backward()
            if opt is o2:
                freed = freed and all(p.grad is None for p in model.parameters())
            opt.step()
            sched.step()
            opt.zero_grad()
    dtensor_states = isinstance(o2.state[next(released.parameters())]["state1"], torch.distributed.tensor.DTensor)
    # two micro-batches per step, the first without gradient sync (FSDP2 keeps the unsharded gradients, and calls
    # the hooks after the reduce-scatter of the second): the same as the normal loop's accumulation
    (normal_acc, o3, s3), (released_acc, o4, s4) = [(m, *make_opt(m)) for m in models[2:]]
    qoptim.release_gradients(o4)
    for step in range(STEPS):
        for model, opt, sched in ((normal_acc, o3, s3), (released_acc, o4, s4)):
            model.set_requires_gradient_sync(False)
            loss_of(model, 2 * step, rank).backward()
            model.set_requires_gradient_sync(True)
            loss_of(model, 2 * step + 1, rank).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    accumulated_equal = all_ranks(same(normal_acc, o3, released_acc, o4))
    # without it, the second micro-batch's gradients are refused
    try:
        loss_of(released_acc, 0, rank).backward()
        o4.step()
        loss_of(released_acc, 1, rank).backward()
        loss_of(released_acc, 2, rank).backward()
        refused = False
    except RuntimeError as e:
        refused = "second gradient before optimizer.step()" in str(e)
    RESULTS["fsdp2"] = dict(equal=all_ranks(same(normal, o1, released, o2)), freed=all_ranks(freed), dtensor_states=all_ranks(dtensor_states),
                            steps=o2.state[next(released.parameters())]["step"], accumulated_equal=accumulated_equal,
                            accumulation_refused=all_ranks(refused))  # fmt: skip


def refusal(wrap) -> str:
    model = wrap(make_model())
    opt = qoptim.AdamW8bit(model.parameters(), lr=1e-3)
    try:
        qoptim.release_gradients(opt)
    except RuntimeError as e:
        return str(e)
    return ""


def checks(rank: int, world: int) -> None:
    check_fsdp2(rank, world)
    RESULTS["ddp_refused"] = refusal(nn.parallel.DistributedDataParallel)
    RESULTS["fsdp1_refused"] = refusal(lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu")))


if __name__ == "__main__":
    gloo.run(checks, OUT, RESULTS)
