"""qoptim with the Hugging Face Trainer, Lightning (1 process and 2-process DDP) and torch.compile.

Tiny models built from configs, random but learnable data, ``HF_HUB_OFFLINE=1``: nothing is downloaded.
transformers / lightning are test-only extras; the tests skip without them.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from torch import nn

import qoptim

from support import WORKERS, launch

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as a CI box with 2 cores wants it: torch's OpenMP pool and the Numba CPU
    kernels' threads otherwise contend (the forward/backward pass slows down many times over)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- Hugging Face Trainer -------------------------------------------------------------------


class TokenData(torch.utils.data.Dataset):
    """64 sequences drawn from 8 fixed random ones: a language model can learn them."""

    def __init__(self, vocab: int = 1000, length: int = 32):
        g = torch.Generator().manual_seed(0)
        self.seqs = torch.randint(0, vocab, (8, length), generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = self.seqs[i % 8]
        return {"input_ids": ids, "labels": ids}


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def hf_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=50, per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True, report_to=[],
                disable_tqdm=True, save_strategy="no", dataloader_num_workers=0, seed=0, logging_steps=5)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def all_optimizer_classes():
    return [getattr(qoptim.optim, name) for name in qoptim.optim.__all__
            if inspect.isclass(getattr(qoptim.optim, name)) and issubclass(getattr(qoptim.optim, name), qoptim.optim.Optimizer8bit)
            and name not in ("Optimizer8bit", "Optimizer2State", "Optimizer1State")]  # fmt: skip


def optimizer_kwargs(cls) -> dict:
    kw = {"lr": 1e-3}
    if any(cls.__name__.startswith(n) for n in ("SGD", "LARS")):
        kw.update(lr=0.1 if cls.__name__.startswith("SGD") else 1.0, momentum=0.9)
    return kw


def test_trainer_every_optimizer(tmp_path):
    """``optimizers=(opt, scheduler)``: each qoptim class trains the tiny GPT-2 (loss falls)."""
    from transformers import Trainer, get_linear_schedule_with_warmup

    classes = all_optimizer_classes()
    assert len(classes) >= 30
    failures = []
    for cls in classes:
        model = tiny_gpt2()
        opt = cls(model.parameters(), **optimizer_kwargs(cls))
        sched = get_linear_schedule_with_warmup(opt, 2, 100)
        trainer = Trainer(model=model, args=hf_args(tmp_path / cls.__name__, max_steps=12, logging_steps=1), train_dataset=TokenData(),
                          optimizers=(opt, sched))  # fmt: skip
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if not (len(losses) == 12 and losses[-1] < losses[0]):
            failures.append((cls.__name__, losses[0], losses[-1]))
        assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    assert not failures, failures


def test_trainer_optimizer_cls_and_kwargs_checkpoint_resume(tmp_path):
    """``optimizer_cls_and_kwargs``; a run resumed from its step-25 checkpoint ends where the
    uninterrupted 50-step run ends, bit for bit."""
    from transformers import Trainer

    spec = (qoptim.AdamW8bit, {"lr": 1e-3, "betas": (0.9, 0.95), "min_8bit_size": 256})
    args = hf_args(tmp_path / "run", save_strategy="steps", save_steps=25)
    straight = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenData(), optimizer_cls_and_kwargs=spec)
    straight.train()
    opt = straight.optimizer.optimizer if hasattr(straight.optimizer, "optimizer") else straight.optimizer
    assert isinstance(opt, qoptim.AdamW8bit) and len(opt.param_groups) == 2  # decay / no decay
    assert sum(s["state1"].dtype == torch.uint8 for s in opt.state.values()) >= 8
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0
    ckpt = tmp_path / "run" / "checkpoint-25"
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # the optimizer checkpoint is weights_only-safe

    resumed = Trainer(model=tiny_gpt2(), args=hf_args(tmp_path / "resumed", save_strategy="no"), train_dataset=TokenData(),
                      optimizer_cls_and_kwargs=spec)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


# ---- Lightning --------------------------------------------------------------------------------


def test_lightning_single_process_and_resume(tmp_path):
    pytest.importorskip("lightning")
    import sys

    sys.path.insert(0, str(WORKERS))
    try:
        import lightning_worker as lw
    finally:
        sys.path.remove(str(WORKERS))
    straight, losses = lw.fit(tmp_path / "a", epochs=4, devices=1)
    assert losses[-1] < 0.5 * losses[0]
    opt_state = straight.trainer.optimizers[0].state
    assert any(s["state1"].dtype == torch.uint8 for s in opt_state.values())
    ckpt = tmp_path / "a" / "epoch=1.ckpt"
    torch.load(ckpt, weights_only=True)
    resumed, _ = lw.fit(tmp_path / "b", epochs=4, devices=1, ckpt_path=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lightning_ddp_two_processes(tmp_path):
    pytest.importorskip("lightning")
    launch(WORKERS / "lightning_worker.py", str(tmp_path))
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["loss_last"] < 0.9 * r["loss_first"]
    assert r["params_same"] and r["uint8"]
    assert r["resumed_equal"]


# ---- torch.compile ----------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))


def _data(step):
    g = torch.Generator().manual_seed(step % 4)
    x = torch.randn(16, 32, generator=g)
    return x, torch.sin(x)


def test_compiled_model_with_eager_step():
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = qoptim.AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=256)
    losses = []
    for step in range(20):
        x, y = _data(step)
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(s["state1"].dtype == torch.uint8 for p, s in opt.state.items() if p.numel() >= 256)


def test_step_inside_compiled_region_is_a_graph_break():
    """``opt.step()`` inside a compiled function: excluded from the graph (``torch.compiler.disable``
    on ``Optimizer8bit.step``), so it runs eagerly and gives the eager result, bit for bit."""

    def run(compile_it: bool):
        model = _mlp()
        opt = qoptim.AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=256)

        def train_step(x, y):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        fn = torch.compile(train_step, backend="aot_eager") if compile_it else train_step
        losses = [float(fn(*_data(step))) for step in range(10)]
        return model, opt, losses

    torch._dynamo.reset()
    eager_model, _, eager_losses = run(False)
    model, opt, losses = run(True)
    assert losses[-1] < losses[0]
    assert opt.state and all(s["step"] == 10 for s in opt.state.values())
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch._dynamo.explain(opt.step)().graph_count == 0  # Dynamo skips the step: no graph, no error
