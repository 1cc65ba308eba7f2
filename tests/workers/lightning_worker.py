"""Lightning with a qoptim optimizer from ``configure_optimizers``.

``fit()`` is imported by tests/integration/test_frameworks.py for the single-process case. Run as a script
under ``python -m torch.distributed.run --nproc_per_node=2`` it checks ``strategy="ddp"`` on CPU:
a 4-epoch run, params and 8-bit state identical on both ranks, and a run resumed from the
epoch-1 checkpoint equal to it. Rank 0 writes ``results.json`` into argv[1].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

import qoptim


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = qoptim.AdamW8bit(self.parameters(), lr=3e-3, min_8bit_size=256)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=100)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 32, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.sin(x)), batch_size=16, shuffle=False)


def fit(out: Path, epochs: int, devices: int, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Net()
    checkpoints = ModelCheckpoint(dirpath=str(out), filename="{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=epochs,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints])  # fmt: skip
    trainer.fit(model, data(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return model, model.losses


def main():
    import torch.distributed as dist

    out = Path(sys.argv[1])
    model, losses = fit(out / "a", epochs=4, devices=2)
    opt = model.trainer.optimizers[0]

    def same(t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return all(torch.equal(parts[0], q) for q in parts[1:])

    params_same = all(same(p.detach()) for p in model.parameters())
    states_same = all(same(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    uint8 = any(s["state1"].dtype == torch.uint8 for s in opt.state.values())
    resumed, _ = fit(out / "b", epochs=4, devices=2, ckpt_path=out / "a" / "epoch=1.ckpt")
    equal = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    flag = torch.tensor([int(equal)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        result = dict(loss_first=losses[0], loss_last=losses[-1], params_same=params_same and states_same, uint8=uint8,
                      resumed_equal=bool(flag.item()))  # fmt: skip
        (out / "results.json").write_text(json.dumps(result))
        print("RESULTS", json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as in dist_worker.py: no interpreter teardown once the work is done
