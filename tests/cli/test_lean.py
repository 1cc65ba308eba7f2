"""The lean training set-ups (qoptim.cli.lean): the bytes counted from live tensors during training
equal what `qoptim memory`'s whole-training table derives from qoptim's layout rules, set-up by
set-up; gradient release frees each gradient in backward; the tracker's hooks come off."""

import pytest
import torch

from qoptim.cli import demo, lean
from qoptim.cli.memory import QMAP_BYTES, training, training_lines

SIZES = [8192, 5000, 300, 1]  # two tensors with 8-bit states (one not a whole number of blocks), two with fp32 states


def make_params(setup: lean.Setup) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, setup.weights)
    return [torch.nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(dtype)) for n in SIZES]


def train_counted(setup: lean.Setup, steps: int = 2):
    params = make_params(setup)
    opt = demo.make_optimizer(setup.optimizer, params, 1e-3, **setup.options())
    tracker = lean.Tracker(setup, params, opt)
    tracker.sampling = True
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sum((p.float() ** 2).sum() for p in params).backward()
        tracker.sample()
        opt.step()
        tracker.sample()
    return params, opt, tracker


@pytest.mark.parametrize("name", list(lean.SETUPS))
def test_live_bytes_equal_the_memory_commands_whole_training_table(name):
    setup = lean.SETUPS[name]
    _, _, tracker = train_counted(setup)
    tracker.close()
    expected = dict(training(SIZES, largest_tensor=max(SIZES)))[setup]
    steps = 4 * len(SIZES) if setup.optimizer == "torch_adamw" else 0  # torch keeps each step count in a float32 tensor
    assert tracker.peak == lean.TrainingBytes(expected.weights, expected.grads, expected.master, expected.states + steps)


def test_the_tables_rules_in_figures():
    rows = {s.name: b for s, b in training(SIZES, largest_tensor=max(SIZES))}
    n, big = sum(SIZES), 8192 + 5000
    eight_bit = 2 * big + 8 * (32 + 20) + 2 * QMAP_BYTES + 8 * 301  # codes, absmax per 256-block, qmaps, small tensors' fp32
    assert rows["fp32-torch-adamw"] == lean.TrainingBytes(4 * n, 4 * n, 0, 8 * n)
    assert rows["fp32-adamw8bit"] == lean.TrainingBytes(4 * n, 4 * n, 0, eight_bit)
    assert rows["bf16-adamw8bit"] == rows["bf16-stochastic"] == lean.TrainingBytes(2 * n, 2 * n, 0, eight_bit)
    assert rows["bf16-master24"] == lean.TrainingBytes(2 * n, 2 * n, n, eight_bit)
    assert rows["bf16-master32"] == lean.TrainingBytes(2 * n, 2 * n, 2 * n, eight_bit)
    assert rows["bf16-master24-release"] == lean.TrainingBytes(2 * n, 2 * 8192, n, eight_bit)  # one tensor's gradient at a time
    all_eight_bit = 2 * n + 8 * (32 + 20 + 2 + 1) + 2 * QMAP_BYTES  # min_8bit_size=0: the small tensors' states in 8 bits too
    assert rows["bf16-master24-release-v-stochastic-all8"] == lean.TrainingBytes(2 * n, 2 * 8192, n, all_eight_bit)
    assert lean.SETUPS["bf16-master24-release-v-stochastic-all8"].options()["min_8bit_size"] == 0


def test_a_bare_count_under_release_says_what_it_cannot_count():
    rows = dict(training([7_000_000_000], largest_tensor=None))
    assert rows[lean.SETUPS["bf16-master24-release"]].grads == 0
    lines = training_lines([7_000_000_000], 4096, largest_tensor=None)
    assert any("a bare parameter count has no shapes" in line for line in lines)
    assert not any("bare" in line for line in training_lines(SIZES, 4096, largest_tensor=max(SIZES)))


def test_release_frees_each_gradient_as_it_is_applied():
    setup = lean.Setup("bf16-release", "test", release_bucket_bytes=0)
    params, opt, tracker = train_counted(setup)
    assert all(p.grad is None for p in params)  # freed in backward
    assert tracker.peak.grads == 2 * max(SIZES)  # never more than the largest tensor's gradient at once
    assert opt.state[params[0]]["step"] == 2
    assert tracker.inside > 0  # the updates ran inside backward
    tracker.close()
    sum((p.float() ** 2).sum() for p in params).backward()
    assert all(p.grad is not None for p in params)  # the normal path again
    assert opt.state[params[0]]["step"] == 2


def test_without_release_every_gradient_is_counted_and_the_hooks_come_off():
    setup = lean.Setup("bf16", "test")
    params, opt, tracker = train_counted(setup)
    assert tracker.peak.grads == 2 * sum(SIZES) and tracker.inside == 0.0
    assert tracker.handle is None and not tracker.hooks


def test_shared_storage_is_counted_once():
    setup = lean.SETUPS["fp32-adamw8bit"]
    params, opt, tracker = train_counted(setup, steps=1)
    qmaps = {opt.state[p]["qmap1"].data_ptr() for p in params[:2]}
    assert len(qmaps) == 1  # the two 8-bit tensors share their qmaps
    counted = lean.live_bytes(params, opt)
    assert counted.states == sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
                                 if torch.is_tensor(v) and not (p is params[1] and k.startswith("qmap")))  # fmt: skip


def test_setup_of_names_a_set_up_or_a_plain_optimizer():
    assert lean.setup_of("lean", "float32") is lean.LEAN and lean.LEAN.release and lean.LEAN.master_weight_bits == 24
    assert lean.setup_of("bf16-master32", "float32") is lean.SETUPS["bf16-master32"]
    plain = lean.setup_of("adamw8bit", "float16")
    assert (plain.weights, plain.optimizer, plain.options(), plain.release) == ("float16", "adamw8bit", {}, False)
    assert lean.SETUPS["bf16-stochastic"].options() == {"weight_rounding": "stochastic"}


def test_torch_adamw_refuses_a_set_ups_options():
    with pytest.raises(ValueError, match="torch AdamW takes none of"):
        demo.make_optimizer("torch_adamw", [torch.nn.Parameter(torch.zeros(3))], 1e-3, master_weight_bits=24)
