"""Two-process (gloo, CPU) checks of qoptim under DDP, ZeroRedundancyOptimizer, FSDP2 + DCP and FSDP1,
with 8-bit states and (DDP, FSDP2, FSDP1) 4-bit ones.

Launched by tests/distributed/test_distributed.py with ``python -m torch.distributed.run --nproc_per_node=2``.
Every case asserts numbers; rank 0 writes ``results.json`` (and checkpoints for the parent's
single-process reload) into the directory given as argv[1].
"""

from __future__ import annotations

import io
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import gloo  # (this folder's: see gloo.py)
import qoptim
from gloo import all_ranks
from qoptim.optim import blocks as qblocks
from qoptim.optim import dtensor as qdt
from qoptim.quant.formats import format_of

OUT = sys.argv[1]
RESULTS: dict[str, object] = {}
LR = 3e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 255 rows: uneven shards over 2 ranks; the 256-wide rows keep the weight's shard boundary on a block boundary
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 255), nn.ReLU(), nn.Linear(255, 8))


TARGET = torch.randn(64, 8, generator=torch.Generator().manual_seed(7)) / 8


def batch(step: int, rank: int, world: int, full: bool = False):
    g = torch.Generator().manual_seed(1000 + step % 4)  # 4 batches, a learnable target: the loss must fall
    x = torch.randn(16 * world, 64, generator=g)
    y = torch.tanh(x @ TARGET)
    return (x, y) if full else (x[16 * rank : 16 * (rank + 1)], y[16 * rank : 16 * (rank + 1)])


def train(model, opt, steps, rank, world, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_alongside(model, opt, ref, ref_opt, steps, rank, world, start=0, full=False):
    """``train``, with ``ref`` (a one-process model) stepped by ``ref_opt`` on the very gradients
    ``model`` got (gathered where they are sharded): the run a checkpoint must continue exactly."""
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank, world, full=full)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        gloo.take_gradients(model, ref)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        losses.append(loss.item())
    return losses


def same_on_all_ranks(t: torch.Tensor) -> bool:
    t = qdt.local(t).detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], q) for q in parts[1:])




def max_all(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def local_states(opt) -> list[dict[str, torch.Tensor]]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append({k: (qdt.local(v).clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()})
    return out


def states_equal(a, b) -> bool:
    return mismatch(a, b) is None


def mismatch(a, b) -> str | None:
    """Where two lists of per-parameter states differ (None: equal, bit for bit)."""
    if len(a) != len(b):
        return f"{len(a)} != {len(b)} parameters"
    for index, (sa, sb) in enumerate(zip(a, b)):
        if sa.keys() != sb.keys():
            return f"param {index}: keys {sorted(sa)} != {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor):
                if va.shape != vb.shape or va.dtype != vb.dtype or not torch.equal(va, vb):
                    diff = (va.float() - vb.float()).abs() if va.shape == vb.shape else None
                    return f"param {index} {k}: {va.dtype}{tuple(va.shape)} vs {vb.dtype}{tuple(vb.shape)}" + (
                        f", {int((diff > 0).sum())} differ, max {float(diff.max()):.3g}" if diff is not None else "")
            elif va != vb:
                return f"param {index} {k}: {va!r} != {vb!r}"
    return None


def dequantized_full(opt) -> dict[str, torch.Tensor]:
    """Each state's float32 values, gathered to full tensors (independent of qoptim's load code:
    code[q] * the block's scale, block by block of the local shard; a 4-bit state's codes are its
    half of state1's bytes, in 128-blocks)."""
    out = {}
    for index, p in enumerate(opt.param_groups[0]["params"]):
        state = opt.state[p]
        for i in (1, 2):
            four_bit = "qmap1" in state and state["qmap1"].numel() == 16
            values = qdt.local(state["state1" if four_bit else f"state{i}"])
            if values.dtype == torch.uint8:
                codes = ((values >> (4 * (i - 1))) & 15) if four_bit else values
                n, size = codes.numel(), 128 if four_bit else 256
                scales = qdt.local(state[f"absmax{i}"]).reshape(-1)[: math.ceil(n / size)]
                dense = (state[f"qmap{i}"][codes.reshape(-1).long()] * scales.repeat_interleave(size)[:n]).view(codes.shape)
            else:
                dense = values.clone()
            full = torch.distributed.tensor.DTensor.from_local(dense, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            out[f"{index}.state{i}"] = full.full_tensor()
    return out


# ---- DDP + DCP, ZeroRedundancyOptimizer ------------------------------------------------------


def check_ddp(rank, world, name, cls):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = cls(model.parameters(), lr=LR, min_8bit_size=256)
    losses = train(model, opt, 30, rank, world)
    params_same = all(same_on_all_ranks(p) for p in model.parameters())
    states_same = all(same_on_all_ranks(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    uint8 = sum(1 for s in opt.state.values() if s["state1"].dtype == torch.uint8)

    path = os.path.join(OUT, f"{name}_dcp")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model2 = DDP(make_model())
    opt2 = cls(model2.parameters(), lr=LR, min_8bit_size=256)  # fresh: DCP initialises its state
    msd2, osd2 = get_state_dict(model2, opt2)
    sd2 = {"model": msd2, "optim": osd2}
    dcp.load(sd2, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=sd2["model"], optim_state_dict=sd2["optim"])
    restored = states_equal(local_states(opt), local_states(opt2))
    train(model, opt, 3, rank, world, start=30)
    train(model2, opt2, 3, rank, world, start=30)
    resumed = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    RESULTS[name] = dict(loss_first=losses[0], loss_last=losses[-1], params_same=params_same, states_same=states_same,
                         uint8_states=uint8, dcp_restored=restored, dcp_resumed_equal=resumed)  # fmt: skip


def check_zero(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=qoptim.AdamW8bit, lr=LR, min_8bit_size=256)
    zlosses = train(model, zero, 20, rank, world)
    zparams_same = all(same_on_all_ranks(p) for p in model.parameters())
    zero.consolidate_state_dict(to=0)
    box = [None]
    if rank == 0:  # through bytes: rank 0's consolidated dict aliases its live state
        buffer = io.BytesIO()
        torch.save(zero.state_dict(), buffer)
        box = [buffer.getvalue()]
    dist.broadcast_object_list(box, src=0)
    box = [torch.load(io.BytesIO(box[0]), weights_only=True)]
    model2 = DDP(make_model())
    model2.load_state_dict(model.state_dict())
    zero2 = ZeroRedundancyOptimizer(model2.parameters(), optimizer_class=qoptim.AdamW8bit, lr=LR, min_8bit_size=256)
    zero2.load_state_dict(box[0])
    train(model, zero, 3, rank, world, start=20)
    train(model2, zero2, 3, rank, world, start=20)
    zresumed = all_ranks(all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters())))
    RESULTS["zero"] = dict(loss_first=zlosses[0], loss_last=zlosses[-1], params_same=zparams_same, resumed_equal=zresumed)


# ---- FSDP2 + DCP ----------------------------------------------------------------------------


def fsdp2_model(mesh):
    return gloo.fully_shard_layers(make_model(), mesh)


def check_fsdp2(rank, world, name, cls):
    """``cls`` (AdamW8bit, AdamW4bit) on FSDP2 ranks: the states' layout, the run against one
    process fed the same gradients, DCP sharded and full round trips (files named ``name``)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = fsdp2_model(mesh)
    opt = cls(model.parameters(), lr=LR, min_8bit_size=256)
    # the same steps in one process, fed the FSDP2 run's (gathered) gradients: where shard boundaries fall on
    # block boundaries the quantized update is the same bit for bit; elsewhere blocks differ (small differences)
    ref = make_model()
    ref_opt = cls(ref.parameters(), lr=LR, min_8bit_size=256)
    losses = train_alongside(model, opt, ref, ref_opt, 10, rank, world)
    exact = [i for i, (p, r) in enumerate(zip(model.parameters(), ref.parameters())) if torch.equal(p.full_tensor(), r)]
    # elsewhere: the difference relative to how far the parameter moved
    vs_single = max(float((p.full_tensor() - r).norm() / (r - r0).norm())
                    for p, r, r0 in zip(model.parameters(), ref.parameters(), make_model().parameters()))  # fmt: skip
    layout_ok = True
    for p in model.parameters():  # every quantized state: codes sharded like p, block scales in the rows form of its format
        s = opt.state[p]
        if s["state1"].dtype != torch.uint8:
            continue
        fmt = format_of(s["qmap1"])
        rows = qblocks.rows_shape(p.shape, 0, blocksize=fmt.blocksize)
        layout_ok = layout_ok and all(
            isinstance(s[key], torch.distributed.tensor.DTensor) and s[key].placements == p.placements and s[key].to_local().shape == p.to_local().shape
            for key in ("state1", "state2")[: 1 if fmt.bits == 4 else 2]
        ) and ("state2" in s) == (fmt.bits == 8) and all(
            isinstance(s[key], torch.distributed.tensor.DTensor) and tuple(s[key].shape) == tuple(rows) for key in ("absmax1", "absmax2"))  # fmt: skip

    # sharded DCP save -> fresh model/optimizer -> load, bit-exact
    before = local_states(opt)
    dense = dequantized_full(opt)
    path = os.path.join(OUT, f"{name}_dcp")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model2 = fsdp2_model(mesh)
    opt2 = cls(model2.parameters(), lr=LR, min_8bit_size=256)
    msd2, osd2 = get_state_dict(model2, opt2)
    sd2 = {"model": msd2, "optim": osd2}
    dcp.load(sd2, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=sd2["model"], optim_state_dict=sd2["optim"])
    sharded_ok = all_ranks(states_equal(before, local_states(opt2)))

    # full state dict -> torch.save -> fresh model/optimizer -> set_state_dict(full), bit-exact
    full = StateDictOptions(full_state_dict=True)
    fmsd, fosd = get_state_dict(model, opt, options=full)
    if rank == 0:
        torch.save({"model": fmsd, "optim": fosd}, os.path.join(OUT, f"{name}_full.pt"))
        torch.save(dense, os.path.join(OUT, f"{name}_dense.pt"))
    dist.barrier()
    loaded = torch.load(os.path.join(OUT, f"{name}_full.pt"), weights_only=True)
    model3 = fsdp2_model(mesh)
    opt3 = cls(model3.parameters(), lr=LR, min_8bit_size=256)
    set_state_dict(model3, opt3, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=full)
    full_ok = all_ranks(states_equal(before, local_states(opt3)))

    check_fsdp2_to_plain(rank, world, ref, ref_opt, name, cls)
    train(model, opt, 3, rank, world, start=10)
    train(model2, opt2, 3, rank, world, start=10)
    train(model3, opt3, 3, rank, world, start=10)
    resumed = all_ranks(all(torch.equal(a.to_local(), b.to_local()) and torch.equal(a.to_local(), c.to_local())
                            for a, b, c in zip(model.parameters(), model2.parameters(), model3.parameters())))  # fmt: skip
    RESULTS[name] = dict(loss_first=losses[0], loss_last=losses[-1], layout_ok=all_ranks(layout_ok), vs_single_rel=vs_single, exact=exact,
                            dcp_sharded_equal=sharded_ok, dcp_full_equal=full_ok, resumed_equal=resumed)  # fmt: skip


def load_broadcast(model, opt, full: dict) -> None:
    """A full state dict that only rank 0 holds (the others pass {}), broadcast from rank 0. Model and
    optimizer apart: ``set_state_dict`` takes an empty model state dict to mean "optimizer only"."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.get("model", {}), options=options)
    set_optimizer_state_dict(model, opt, full.get("optim", {}), options=options)


def check_fsdp2_to_plain(rank, world, ref, ref_opt, name, cls):
    """The FSDP2 run's checkpoints (step 10, files named ``name``) resumed by plain (unsharded)
    models on each rank: by DCP (README's recipe) and by a full state dict broadcast from rank 0.
    ``ref_opt`` took the same steps in one process, fed the FSDP2 run's gradients; where the shard
    boundaries fall on block boundaries (params 0 and 2; 4-bit's 128-blocks: 1 too) and for 32-bit
    states (3, 5) the loaded state is the same bit for bit, and so is the continuation with the
    same gradients."""
    out = {}
    for label in ("dcp", "broadcast"):
        model = make_model()
        opt = cls(model.parameters(), lr=LR, min_8bit_size=256)
        if label == "dcp":
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=os.path.join(OUT, f"{name}_dcp"))
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            full = torch.load(os.path.join(OUT, f"{name}_full.pt"), weights_only=True) if rank == 0 else {}
            load_broadcast(model, opt, full)
        got, want = local_states(opt), local_states(ref_opt)
        exact = [i for i in range(len(want)) if mismatch([got[i]], [want[i]]) is None]
        steps = {int(s["step"]) for s in got}
        model_ref = make_model()
        model_ref.load_state_dict(ref.state_dict())
        opt_ref = cls(model_ref.parameters(), lr=LR, min_8bit_size=256)
        opt_ref.load_state_dict(ref_opt.state_dict())
        # the same gradients for both: those of the loaded model
        train_alongside(model, opt, model_ref, opt_ref, 3, rank, world, start=10, full=True)
        continued = [i for i, (a, b) in enumerate(zip(model.parameters(), model_ref.parameters())) if torch.equal(a, b)]
        same = all_ranks(all(same_on_all_ranks(p) for p in model.parameters()))
        out[label] = dict(exact=exact, steps=sorted(steps), continued_exact=continued, same_on_ranks=same)
    RESULTS[f"{name}_to_plain"] = out


def check_plain_to_fsdp2(rank, world):
    """Checkpoints of a plain one-process run (written by the parent: ``plain/cases.json``) resumed
    on FSDP2 ranks, by DCP (README's recipe) and by full state dicts (distributed, and broadcast
    from rank 0). Reports which states come back exactly and how far the others moved, whether
    the full state dicts give the same state as DCP, and which parameters continue bit for bit
    like one process resumed from the same checkpoint and fed the FSDP2 run's gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    root = os.path.join(OUT, "plain")
    with open(os.path.join(root, "cases.json")) as f:
        cases = json.load(f)
    out = {}
    for name, case in cases.items():
        cls, start = getattr(qoptim, case["cls"]), case["steps"]
        dense = torch.load(os.path.join(root, f"{name}_dense.pt"), weights_only=True)
        full_path = os.path.join(root, f"{name}_full.pt")  # (loaded anew for each use: set_state_dict changes what it is given)
        model = fsdp2_model(mesh)
        opt = cls(model.parameters(), lr=LR, **case["fsdp2_kw"])
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=os.path.join(root, f"{name}_dcp"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        steps = sorted({int(s["step"]) for s in opt.state.values()})
        got = dequantized_full(opt)
        exact = sorted(k for k in dense if torch.equal(got[k], dense[k]))
        rel = max(float((got[k] - dense[k]).abs().max() / dense[k].abs().max().clamp_min(1e-30)) for k in dense)
        uint8 = sorted(i for i, p in enumerate(model.parameters()) if opt.state[p]["state1"].dtype == torch.uint8)
        same = {}
        full = StateDictOptions(full_state_dict=True)
        for label in ("full", "bitsandbytes", "broadcast"):  # bitsandbytes: optimizer.state_dict()'s layout, keyed by name
            model2 = fsdp2_model(mesh)
            opt2 = cls(model2.parameters(), lr=LR, **case["fsdp2_kw"])
            if label != "broadcast":
                full_sd = torch.load(full_path if label == "full" else os.path.join(root, f"{name}_bnb.pt"), weights_only=True)
                set_state_dict(model2, opt2, model_state_dict=full_sd["model"], optim_state_dict=full_sd["optim"], options=full)
            else:
                load_broadcast(model2, opt2, torch.load(full_path, weights_only=True) if rank == 0 else {})
            where = mismatch(local_states(opt), local_states(opt2))
            params_same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
            same[label] = all_ranks(where is None and params_same)
        ref = make_model()
        ref_opt = cls(ref.parameters(), lr=LR, **case["plain_kw"])
        full_sd = torch.load(full_path, weights_only=True)
        set_state_dict(ref, ref_opt, model_state_dict=full_sd["model"], optim_state_dict=full_sd["optim"], options=full)
        losses = train_alongside(model, opt, ref, ref_opt, 4, rank, world, start=start)
        continued = [i for i, (p, r) in enumerate(zip(model.parameters(), ref.parameters())) if torch.equal(p.full_tensor(), r)]
        out[name] = dict(exact=exact, max_rel=max_all(rel), uint8=uint8, full_same=same["full"], bnb_same=same["bitsandbytes"], broadcast_same=same["broadcast"],
                         continued_exact=continued, steps=steps, loss_first=losses[0], loss_last=losses[-1])  # fmt: skip
    RESULTS["plain_to_fsdp2"] = out


def check_fsdp2_families(rank, world):
    """Other state layouts on DTensor params: AdEMAMix's stacked state1, one-state Lion, 32-bit
    states; DCP round trip bit-exact. Families that need whole-parameter norms refuse cleanly."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for cls in (qoptim.AdEMAMix8bit, qoptim.Lion8bit, qoptim.AdamW32bit, qoptim.RMSprop8bit):
        kw = dict(lr=1e-3, min_8bit_size=256) if cls is not qoptim.AdamW32bit else dict(lr=1e-3)
        model = fsdp2_model(mesh)
        opt = cls(model.parameters(), **kw)
        losses = train(model, opt, 8, rank, world)
        path = os.path.join(OUT, f"fam_{cls.__name__}")
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        model2 = fsdp2_model(mesh)
        opt2 = cls(model2.parameters(), **kw)
        msd2, osd2 = get_state_dict(model2, opt2)
        sd2 = {"model": msd2, "optim": osd2}
        dcp.load(sd2, checkpoint_id=path)
        set_state_dict(model2, opt2, model_state_dict=sd2["model"], optim_state_dict=sd2["optim"])
        where = mismatch(local_states(opt), local_states(opt2))
        if cls is qoptim.AdamW32bit:  # the whole states, for the parent's reload into one process
            dense = dequantized_full(opt)
            if rank == 0:
                torch.save(dense, os.path.join(OUT, "fam_AdamW32bit_dense.pt"))
        train(model, opt, 2, rank, world, start=8)
        train(model2, opt2, 2, rank, world, start=8)
        resumed = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
        out[cls.__name__] = dict(loss_fell=losses[-1] < losses[0], restored=all_ranks(where is None), mismatch=where,
                                 resumed_equal=all_ranks(resumed))  # fmt: skip
    model = fsdp2_model(mesh)
    opt = qoptim.LAMB8bit(model.parameters(), min_8bit_size=256)
    try:
        train(model, opt, 1, rank, world)
        out["LAMB8bit_refused"] = False
    except NotImplementedError:
        out["LAMB8bit_refused"] = True
    RESULTS["fsdp2_families"] = out


# ---- FSDP1 ----------------------------------------------------------------------------------


def check_fsdp1(rank, world, use_orig_params: bool, cls, name):
    """``cls`` (AdamW8bit, AdamW4bit) under FSDP1: the export FSDP1 gathers (float32 states shaped
    like the parameter: both moments), loading it back (requantized into ``cls``'s format), DCP."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap():
        return FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)

    def full_ctx(m):  # offload_to_cpu=False: the CPU-only offload path is broken in torch itself
        return FSDP.state_dict_type(m, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False))  # fmt: skip

    model = wrap()
    opt = cls(model.parameters(), lr=LR, min_8bit_size=256)
    losses = train(model, opt, 10, rank, world)
    with full_ctx(model):
        msd = model.state_dict()
        osd = FSDP.optim_state_dict(model, opt)
    w = osd["state"]["2.weight"]
    export_ok = all(w[key].dtype == torch.float32 and tuple(w[key].shape) == (255, 256) for key in ("state1", "state2"))
    export_ok = export_ok and not any(key.startswith(("absmax", "qmap")) for key in w)
    codes = 16 if cls is qoptim.AdamW4bit else 256

    model2 = wrap()
    opt2 = cls(model2.parameters(), lr=LR, min_8bit_size=256)
    with full_ctx(model2):
        model2.load_state_dict(msd)
        opt2.load_state_dict(FSDP.optim_state_dict_to_load(model2, opt2, osd))
    uint8_again = all(s["state1"].dtype == torch.uint8 and s["qmap1"].numel() == codes and ("state2" in s) == (codes == 256)
                      for s in opt2.state.values() if qdt.local(s["state1"]).numel() >= 256)  # fmt: skip
    # requantizing dequantized codes with the same blocks gives the same codes back
    # codes and steps come back exactly; a scale can move by an ulp (it is recomputed from dequantized values)
    a, b = local_states(opt), local_states(opt2)
    where = mismatch([{k: v for k, v in s.items() if not k.startswith("absmax")} for s in a],
                     [{k: v for k, v in s.items() if not k.startswith("absmax")} for s in b])  # fmt: skip
    scale_rel = max([float(((sa[k] - sb[k]).abs() / sa[k].abs().clamp_min(1e-30)).max())
                     for sa, sb in zip(a, b) for k in sa if k.startswith("absmax") and sa[k].numel()] + [0.0])  # fmt: skip
    exact = all_ranks(where is None)
    wheres = [None] * world
    dist.all_gather_object(wheres, where)
    where = next((w for w in wheres if w), None)
    train(model, opt, 3, rank, world, start=10)
    train(model2, opt2, 3, rank, world, start=10)
    diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), model2.parameters()) if a.numel())
    # DCP on the FSDP1 model: get_state_dict -> dcp.save -> dcp.load -> set_state_dict
    path = os.path.join(OUT, f"{name}_dcp_{int(use_orig_params)}")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model3 = wrap()
    opt3 = cls(model3.parameters(), lr=LR, min_8bit_size=256)
    msd3, osd3 = get_state_dict(model3, opt3)
    sd3 = {"model": msd3, "optim": osd3}
    dcp.load(sd3, checkpoint_id=path)
    set_state_dict(model3, opt3, model_state_dict=sd3["model"], optim_state_dict=sd3["optim"])
    strip = lambda states: [{k: v for k, v in st.items() if not k.startswith("absmax")} for st in states]  # noqa: E731
    dcp_where = mismatch(strip(local_states(opt)), strip(local_states(opt3)))
    dcp_ok = all_ranks(dcp_where is None)
    RESULTS[f"{name}_orig{int(use_orig_params)}"] = dict(dcp_codes_exact=dcp_ok, dcp_mismatch=dcp_where, loss_first=losses[0], loss_last=losses[-1], export_ok=all_ranks(export_ok),
                                                        uint8_again=all_ranks(uint8_again), codes_exact=exact, mismatch=where, scale_max_rel=max_all(scale_rel), resumed_max_diff=diff)  # fmt: skip


def checks(rank: int, world: int) -> None:
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ddp", "fsdp2", "fsdp1"]
    if "ddp" in cases:
        check_ddp(rank, world, "ddp", qoptim.AdamW8bit)
        check_ddp(rank, world, "ddp_4bit", qoptim.AdamW4bit)
        check_zero(rank, world)
    if "fsdp2" in cases:
        check_fsdp2(rank, world, "fsdp2", qoptim.AdamW8bit)
        check_fsdp2(rank, world, "fsdp2_4bit", qoptim.AdamW4bit)
        check_fsdp2_families(rank, world)
        check_plain_to_fsdp2(rank, world)
    if "fsdp1" in cases:
        for cls, name in ((qoptim.AdamW8bit, "fsdp1"), (qoptim.AdamW4bit, "fsdp1_4bit")):
            check_fsdp1(rank, world, False, cls, name)
            check_fsdp1(rank, world, True, cls, name)


if __name__ == "__main__":
    gloo.run(checks, OUT, RESULTS)
