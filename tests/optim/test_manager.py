"""GlobalOptimManager: per-parameter overrides."""

import gc

import pytest
import torch
from support import clone_params, gradients, make_params

import qoptim as bnb

Manager = bnb.optim.GlobalOptimManager


def test_it_is_a_singleton():
    with pytest.raises(RuntimeError, match="Call get_instance"):
        Manager()
    assert Manager.get_instance() is Manager.get_instance()


def test_32bit_state_for_one_parameter_of_an_8bit_optimizer():
    a, b = make_params((64, 81), torch.float32, n=2)
    mng = Manager.get_instance()
    mng.register_parameters([a, b])
    mng.override_config(b, "optim_bits", 32)  # after register_parameters, the documented order
    opt = bnb.optim.Adam8bit([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.uint8
    assert opt.state[b]["state1"].dtype == torch.float32 and "qmap1" not in opt.state[b]


def test_8bit_state_for_one_parameter_of_a_32bit_optimizer():
    a, b = make_params((64, 81), torch.float32, n=2)
    Manager.get_instance().override_config([b], key_value_dict={"optim_bits": 8})
    opt = bnb.optim.Adam([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.float32 and opt.state[b]["state1"].dtype == torch.uint8


def test_other_lr_for_one_parameter():
    a, b = make_params((64, 64), torch.float32, n=2)
    ref_a, ref_b = clone_params([a, b])
    Manager.get_instance().override_config(b, "lr", 1e-2)
    opt = bnb.optim.AdamW32bit([a, b], lr=1e-3)
    torch_opt = torch.optim.AdamW([{"params": [ref_a], "lr": 1e-3}, {"params": [ref_b], "lr": 1e-2}])
    for g in gradients((64, 64), 5):
        a.grad, b.grad, ref_a.grad, ref_b.grad = g.clone(), g.clone(), g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(a.detach(), ref_a.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), ref_b.detach(), rtol=1e-6, atol=1e-7)


def test_each_parameter_gets_its_own_copy_of_an_override():
    a, b = make_params((64, 64), torch.float32, n=2)
    mng = Manager.get_instance()
    mng.override_config([a, b], "lr", 1e-2)
    mng.override_config(a, "betas", (0.5, 0.5))
    assert mng.pid2config[id(a)] == {"lr": 1e-2, "betas": (0.5, 0.5)}
    assert mng.pid2config[id(b)] == {"lr": 1e-2}


def test_overrides_survive_moving_tensors_through_positions():
    a, b = torch.randn(64, 81), torch.randn(64, 81)
    mng = Manager.get_instance()
    mng.override_config(b, "optim_bits", 32)
    mng.register_parameters([a, b])
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()  # new tensors, new ids
    opt = bnb.optim.Adam8bit([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[b]["state1"].dtype == torch.float32 and opt.state[a]["state1"].dtype == torch.uint8


def test_module_override_keeps_embeddings_in_32bit():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100))
    Manager.get_instance().register_module_override(model[0], "weight", {"optim_bits": 32})
    opt = bnb.optim.AdamW8bit(model.parameters())
    model(torch.randint(0, 100, (4, 8))).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8


def test_an_override_dies_with_its_tensor():
    mng = Manager.get_instance()
    t = torch.randn(10)
    key = id(t)
    mng.override_config(t, "optim_bits", 32)
    del t
    gc.collect()
    assert key not in mng.pid2config


def test_override_needs_something_to_set():
    with pytest.raises(ValueError, match="key and value"):
        Manager.get_instance().override_config(torch.randn(3))


def test_a_module_override_stays_with_its_tensor():
    """An override of one model's weight does not reach the weight at the same place of a model
    built later (bitsandbytes keyed it by position: the second model never trained)."""
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    Manager.get_instance().register_module_override(first, "weight", {"lr": 0.0})
    for model, frozen in ((first, True), (second, False)):
        opt = bnb.optim.Adam8bit(model.parameters(), lr=1e-2)
        before = model.weight.detach().clone()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        assert torch.equal(model.weight, before) == frozen
        assert not torch.equal(model.bias, torch.zeros(8))  # (bias: no override, moved)
