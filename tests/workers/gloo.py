"""What every multi-process worker shares (imported as ``gloo``: the worker's own folder is on its
path): agreeing across ranks, sharding a model with FSDP2, feeding a one-process twin the sharded
run's gradients, writing the results, and ending without the interpreter's teardown."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def all_ranks(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank."""
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def fully_shard_layers(model: nn.Module, mesh) -> nn.Module:
    """``model`` with FSDP2 on each of its Linear layers and on the whole."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def take_gradients(model: nn.Module, twin: nn.Module) -> None:
    """Give ``twin`` (one process) the gradients ``model`` got, gathered where they are sharded."""
    for p, r in zip(model.parameters(), twin.parameters()):
        r.grad = gathered(p.grad).clone()


def run(checks: Callable[[int, int], None], out: str, results: dict) -> None:
    """Run ``checks(rank, world)`` in a gloo process group; rank 0 writes ``results`` to
    ``out/results.json`` (and prints them); then leave without the interpreter's teardown, where
    now and then a native thread pool aborts the process ("terminate called without an active
    exception", SIGABRT) after all the work is done."""
    dist.init_process_group("gloo")
    checks(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print("RESULTS", json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
