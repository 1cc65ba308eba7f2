"""Two-process (gloo, CPU) checks of lean training on a bf16 model: master weights and stochastic
rounding under FSDP2 (DCP sharded, full state dicts, uneven shards; gradient release on top), DDP
and FSDP1; with 8-bit and 4-bit optimizer states.

Launched by tests/distributed/test_lean.py; rank 0 writes ``results.json``, the sharded DCP
checkpoint and the gathered masters into the directory given as argv[1] (the parent loads them
into one process: resharding from 2 ranks to 1).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import gloo  # (this folder's: see gloo.py)
import qoptim
from gloo import all_ranks, gathered
from qoptim.optim import dtensor as qdt

OUT = sys.argv[1]
RESULTS: dict[str, object] = {}
LR = 3e-3
TARGET = torch.randn(64, 8, generator=torch.Generator().manual_seed(7)) / 8


def make_model() -> nn.Module:
    """bf16, 255 rows in the middle layer: uneven shards over 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8)).bfloat16()


def fsdp2_model(mesh) -> nn.Module:
    return gloo.fully_shard_layers(make_model(), mesh)


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step % 4)
    x = torch.randn(16 * world, 64, generator=g)
    y = torch.tanh(x @ TARGET)
    return x[16 * rank : 16 * (rank + 1)].bfloat16(), y[16 * rank : 16 * (rank + 1)].bfloat16()


def train_alongside(model, opt, ref=None, ref_opt=None, steps=6, rank=0, world=2, start=0) -> list[float]:
    """Train ``model``; ``ref`` (one process) takes the same steps on ``model``'s gathered gradients."""
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        if ref is not None:
            gloo.take_gradients(model, ref)
            ref_opt.step()
            ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses




def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.int16 if a.element_size() == 2 else torch.int32),
                                                                     b.view(-1).view(torch.int16 if b.element_size() == 2 else torch.int32))  # fmt: skip


def masters(opt, model) -> list[torch.Tensor]:
    return [gathered(opt.master_weight(p)) for p in model.parameters()]


def fresh_fsdp2(mesh, cls, kw):
    model = fsdp2_model(mesh)
    return model, cls(model.parameters(), **kw)


def check_fsdp2(rank, world, name, cls, kw):
    """The run against one process fed its gradients; the states' layout; DCP and full state dicts."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, opt = fresh_fsdp2(mesh, cls, kw)
    ref = make_model()
    ref_opt = cls(ref.parameters(), **kw)
    losses = train_alongside(model, opt, ref, ref_opt, 6, rank, world)
    # elementwise updates (32-bit states) give the one-process run bit for bit: master and weight
    exact = [i for i, (a, b) in enumerate(zip(masters(opt, model), masters(ref_opt, ref))) if same_bits(a, b)]
    weights_exact = [i for i, (p, r) in enumerate(zip(model.parameters(), ref.parameters())) if same_bits(gathered(p.detach()), r.detach())]
    p0 = next(iter(model.parameters()))
    correction = opt.state[p0].get("master_correction")
    layout_ok = correction is None or (qdt.is_dtensor(correction) and correction.placements == p0.placements
                                       and correction.to_local().shape[: p0.dim()] == p0.to_local().shape)  # fmt: skip
    master_is_dtensor = qdt.is_dtensor(opt.master_weight(p0))

    path = os.path.join(OUT, f"{name}_dcp")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    before = masters(opt, model)
    if rank == 0:
        torch.save(before, os.path.join(OUT, f"{name}_masters.pt"))
    model2, opt2 = fresh_fsdp2(mesh, cls, kw)
    msd2, osd2 = get_state_dict(model2, opt2)
    sd2 = {"model": msd2, "optim": osd2}
    dcp.load(sd2, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=sd2["model"], optim_state_dict=sd2["optim"])
    dcp_ok = all(same_bits(a, b) for a, b in zip(before, masters(opt2, model2)))

    full = StateDictOptions(full_state_dict=True)
    fmsd, fosd = get_state_dict(model, opt, options=full)
    model3, opt3 = fresh_fsdp2(mesh, cls, kw)
    set_state_dict(model3, opt3, model_state_dict=fmsd, optim_state_dict=fosd, options=full)
    full_ok = all(same_bits(a, b) for a, b in zip(before, masters(opt3, model3)))

    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        train_alongside(m, o, steps=3, rank=rank, world=world, start=6)
    resumed = all(same_bits(a.to_local(), b.to_local()) and same_bits(a.to_local(), c.to_local())
                  for a, b, c in zip(model.parameters(), model2.parameters(), model3.parameters()))  # fmt: skip
    RESULTS[name] = dict(loss_fell=losses[-1] < losses[0], exact=exact, weights_exact=weights_exact, layout_ok=all_ranks(layout_ok),
                         master_is_dtensor=master_is_dtensor, dcp_equal=all_ranks(dcp_ok), full_equal=all_ranks(full_ok),
                         resumed_equal=all_ranks(resumed), params=len(list(model.parameters())))  # fmt: skip


def check_release(rank, world, name, cls, kw):
    """Gradient release on top of FSDP2 (its hooks run after the reduce-scatter): the same weights,
    master corrections and states as the normal loop, bit for bit, with every gradient freed."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    (normal, o1), (released, o2) = fresh_fsdp2(mesh, cls, kw), fresh_fsdp2(mesh, cls, kw)
    handle = qoptim.release_gradients(o2, bucket_bytes=8192)
    freed = True
    for step in range(4):
        for model, opt in ((normal, o1), (released, o2)):
            x, y = batch(step, rank, world)
            nn.functional.mse_loss(model(x).float(), y.float()).backward()
            freed = freed and (opt is o1 or all(p.grad is None for p in model.parameters()))
            opt.step()
            opt.zero_grad()
    handle.remove()
    equal = True
    for a, b in zip(normal.parameters(), released.parameters()):
        sa, sb = o1.state[a], o2.state[b]
        equal = equal and same_bits(a.to_local(), b.to_local()) and sa.keys() == sb.keys() and sa["step"] == sb["step"] == 4
        equal = equal and all(torch.equal(qdt.local(v), qdt.local(sb[k])) for k, v in sa.items() if isinstance(v, torch.Tensor))
    four_bit = all("state2" not in o2.state[p] for p in released.parameters() if o2.state[p]["state1"].dtype == torch.uint8)
    RESULTS[name] = dict(equal=all_ranks(equal), freed=all_ranks(freed), four_bit=four_bit)


def check_ddp(rank, world, name="ddp", **settings):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = qoptim.AdamW8bit(model.parameters(), lr=LR, min_8bit_size=256, master_weight_bits=24, **settings)
    losses = train_alongside(model, opt, steps=6, rank=rank, world=world)
    same = []
    for p in model.parameters():
        for t in (p.detach(), opt.state[p]["master_correction"]):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            same.append(all(torch.equal(parts[0], q) for q in parts[1:]))
    RESULTS[name] = dict(loss_fell=losses[-1] < losses[0], same_on_ranks=all(same))


def check_fsdp1(rank, world, name, cls):
    """FSDP1 (flat parameters): the correction is shaped like the flat shard; a full optimizer
    state dict exports it unflattened and loads back bit for bit (with ``cls``'s states)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap():
        return FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True)

    def full_ctx(m):
        return FSDP.state_dict_type(m, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False))  # fmt: skip

    model = wrap()
    opt = cls(model.parameters(), lr=LR, min_8bit_size=256, master_weight_bits=24)
    losses = train_alongside(model, opt, steps=6, rank=rank, world=world)
    out = dict(loss_fell=losses[-1] < losses[0])
    try:
        with full_ctx(model):
            msd = model.state_dict()
            osd = FSDP.optim_state_dict(model, opt)
        exported = osd["state"]["2.weight"].get("master_correction")
        out["export_shape"] = None if exported is None else list(exported.shape)
        model2 = wrap()
        opt2 = cls(model2.parameters(), lr=LR, min_8bit_size=256, master_weight_bits=24)
        with full_ctx(model2):
            model2.load_state_dict(msd)
            opt2.load_state_dict(FSDP.optim_state_dict_to_load(model2, opt2, osd))
        a = [opt.master_weight(p) for p in model.parameters()]
        b = [opt2.master_weight(p) for p in model2.parameters()]
        out["round_trip_equal"] = all_ranks(all(same_bits(x, y) for x, y in zip(a, b)))
        out["states_bits"] = sorted({s["qmap1"].numel().bit_length() - 1 for s in opt2.state.values() if "qmap1" in s})
    except Exception as e:  # reported, and asserted on by the parent
        out["error"] = f"{type(e).__name__}: {e}"
    RESULTS[name] = out


def checks(rank: int, world: int) -> None:
    master24 = dict(lr=LR, min_8bit_size=256, master_weight_bits=24)
    check_fsdp2(rank, world, "master24", qoptim.AdamW8bit, master24)
    check_fsdp2(rank, world, "master24_4bit", qoptim.AdamW4bit, master24)
    check_fsdp2(rank, world, "master24_v_stochastic", qoptim.AdamW8bit, dict(master24, state_rounding="stochastic"))
    check_fsdp2(rank, world, "master32_fp32_states", qoptim.AdamW, dict(lr=LR, master_weight_bits=32))
    check_fsdp2(rank, world, "stochastic_fp32_states", qoptim.AdamW, dict(lr=LR, weight_rounding="stochastic"))
    check_release(rank, world, "release_master24", qoptim.AdamW8bit, master24)
    check_release(rank, world, "release_master24_4bit", qoptim.AdamW4bit, master24)
    check_ddp(rank, world)
    check_ddp(rank, world, "ddp_v_stochastic", state_rounding="stochastic")  # (the same seeds on every rank)
    check_fsdp1(rank, world, "fsdp1", qoptim.AdamW8bit)
    check_fsdp1(rank, world, "fsdp1_4bit", qoptim.AdamW4bit)


if __name__ == "__main__":
    gloo.run(checks, OUT, RESULTS)
