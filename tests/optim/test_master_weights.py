"""``master_weight_bits`` and ``weight_rounding`` on every optimizer class: a 32-bit master steps as
an fp32 parameter bit for bit, 24 bits keep what bf16 loses, stochastic rounding is keyed and
resumable; their state saves, loads, and is checked; bad settings are refused, changing nothing."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import qoptim
from qoptim.optim import AdamW8bit, Lion8bit
from qoptim.paging import PAGED_MIN_NUMEL
from qoptim.quant import master
from support import assert_same
from support.optimizers import Case, optimizer_cases
from support.paging import is_paged, paged_cpu

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

LEAN = [case for case in optimizer_cases() if case.accepts("master_weight_bits")]
SHAPES = [(5, 70), (4097,), (1,), (3, 1000)]  # 8-bit states where a class keeps them (min_8bit_size=0), odd sizes


def bf16_params(seed: int = 0, scale: float = 1.0, dtype=torch.bfloat16) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=g) * scale).to(dtype)) for shape in SHAPES]


def feed(params_16, params_32, seed: int) -> None:
    """The same gradients (16-bit values) to both runs (``params_32`` may be empty)."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params_16):
        p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
        if params_32:
            params_32[i].grad = p.grad.float()


def test_every_stepping_class_but_pytorch_lars_takes_the_settings():
    names = {case.name for case in optimizer_cases()} - {case.name for case in LEAN}
    assert names == {"PytorchLARS"}  # bitsandbytes' plain-PyTorch LARS: torch.optim's step, no qoptim state


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", LEAN, ids=lambda c: c.name)
def test_a_32_bit_master_is_the_fp32_run_bit_for_bit(case: Case, backend, monkeypatch):
    monkeypatch.setenv("QOPTIM_BACKEND", backend)  # auto: the fused CPU kernels, for both runs
    for dtype, scale in ((torch.bfloat16, 1.0), (torch.float16, 64.0)):  # fp16: its normal range, where 32 bits is fp32
        lean = bf16_params(scale=scale, dtype=dtype)
        plain = [torch.nn.Parameter(p.detach().float()) for p in lean]
        opt, opt32 = case.make(lean, master_weight_bits=32), case.make(plain)
        for step in range(4):
            feed(lean, plain, step)
            opt.step()
            opt32.step()
        for p, q in zip(lean, plain):
            assert_same(opt.master_weight(p), q.detach(), f"{case.name} {dtype} master")
            assert_same(p.detach(), master.encode(q.detach(), dtype, 32)[0], f"{case.name} {dtype} weight")


def test_24_bits_keep_what_bf16_rounds_away():
    """lr * update far below bf16's spacing at 1.0: without a master nothing moves; with 24 bits
    each step is rounded to the master's grid (2**-16 below 1.0), at most half a step off."""
    start = torch.ones(4096)
    runs = {}
    for bits, dtype in ((None, torch.bfloat16), (24, torch.bfloat16), (None, torch.float32)):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0, master_weight_bits=bits)
        for step in range(30):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
        runs[(bits, dtype)] = opt.master_weight(p)
    assert torch.equal(runs[(None, torch.bfloat16)], start)
    fp32, lean = runs[(None, torch.float32)], runs[(24, torch.bfloat16)]
    assert float((fp32 - start).abs().min()) > 2e-3
    assert float((lean - fp32).abs().max()) <= 30 * 2.0**-17
    assert float((lean - start).abs().min()) > 0.9 * float((fp32 - start).abs().max())


def test_every_class_documents_the_settings():
    for case in LEAN:
        if case.name not in ("Optimizer1State", "Optimizer2State"):
            assert "master_weight_bits" in case.cls.__doc__ and "their own master" in case.cls.__doc__, case.name


def test_fp32_parameters_are_their_own_master():
    w, v = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = AdamW8bit([w, v], master_weight_bits=24, min_8bit_size=0)
    w.grad, v.grad = torch.randn(300), torch.randn(300).bfloat16()
    opt.step()
    assert "master_correction" not in opt.state[w] and opt.state[v]["master_correction"].dtype == torch.int8
    got = opt.master_weight(w)
    assert torch.equal(got, w.detach()) and got.data_ptr() != w.data_ptr()  # a copy
    assert opt.master_weight(torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))).dtype == torch.float32


@pytest.mark.parametrize("setting", [dict(master_weight_bits=24), dict(master_weight_bits=32), dict(weight_rounding="stochastic")])
def test_a_resumed_run_equals_an_uninterrupted_one(setting, tmp_path):
    def run(steps, opt=None, params=None):
        params = params or bf16_params(seed=3)
        opt = opt or AdamW8bit(params, lr=1e-3, min_8bit_size=0, **setting)
        for step in steps:
            feed(params, [], step)
            opt.step()
        return params, opt

    whole, _ = run(range(6))
    params, opt = run(range(3))
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    opt2 = AdamW8bit(resumed, lr=1e-3, min_8bit_size=0, **setting)
    opt2.load_state_dict(saved["opt"])
    run(range(3, 6), opt2, resumed)
    for a, b in zip(whole, resumed):
        assert_same(a.detach(), b.detach())


def test_stochastic_rounding_draws_nothing_from_torch_and_differs_between_parameters():
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.ones(2000, dtype=torch.bfloat16)) for _ in range(2)]
    opt = Lion8bit(params, lr=2.0**-8 / 3, weight_rounding="stochastic")  # a third of bf16's spacing below 1.0
    for p in params:
        p.grad = torch.ones_like(p)
    after_reference = torch.rand(3)
    torch.manual_seed(5)
    opt.step()
    assert torch.equal(torch.rand(3), after_reference)  # torch's generator untouched
    a, b = (p.detach().float() for p in params)
    moved = (a < 1).float().mean()
    assert 0.2 < float(moved) < 0.5 and not torch.equal(a, b)
    assert opt.state[params[0]]["rounding_seed"] != opt.state[params[1]]["rounding_seed"]


def test_changing_the_width_keeps_the_master():
    p = torch.nn.Parameter(torch.randn(1000).bfloat16())
    opt = AdamW8bit([p], lr=1e-3, master_weight_bits=32)
    p.grad = torch.randn(1000).bfloat16()
    opt.step()
    before = opt.master_weight(p)
    opt.args.master_weight_bits = 24  # (settings live in ``args``, as bitsandbytes keeps them)
    p.grad = torch.zeros(1000, dtype=torch.bfloat16)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert opt.state[p]["master_correction"].dtype == torch.int8
    assert float((opt.master_weight(p) - before).abs().max()) <= float(before.abs().max()) * 2.0**-15
    opt.args.master_weight_bits = None
    with pytest.warns(RuntimeWarning, match="its correction is dropped"):
        opt.step()
    assert "master_correction" not in opt.state[p]


def test_a_parameter_can_take_its_own_setting():
    a, b = torch.nn.Parameter(torch.randn(300).bfloat16()), torch.nn.Parameter(torch.randn(300).bfloat16())
    qoptim.optim.GlobalOptimManager.get_instance().override_config(b, "master_weight_bits", 32)
    try:
        opt = AdamW8bit([a, b], master_weight_bits=24)
        a.grad, b.grad = torch.ones(300, dtype=torch.bfloat16), torch.ones(300, dtype=torch.bfloat16)
        opt.step()
    finally:
        qoptim.optim.GlobalOptimManager.get_instance().pid2config.pop(id(b), None)
    assert opt.state[a]["master_correction"].dtype == torch.int8
    assert opt.state[b]["master_correction"].dtype == torch.uint8 and opt.state[b]["master_correction"].shape == (300, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(master_weight_bits=16), "master_weight_bits must be None, 24 or 32"),
        (dict(master_weight_bits=True), "master_weight_bits must be None, 24 or 32"),
        (dict(weight_rounding="up"), "weight_rounding must be one of"),
        (dict(master_weight_bits=24, weight_rounding="stochastic"), "choose one"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW8bit([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_a_bad_setting_at_step_time_changes_nothing():
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = AdamW8bit([p], master_weight_bits=24)
    p.grad = torch.ones(300, dtype=torch.bfloat16)
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    opt.args.master_weight_bits = 12
    with pytest.raises(ValueError, match="master_weight_bits"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"] == state["step"]
    assert torch.equal(opt.state[p]["master_correction"], state["master_correction"])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(300, dtype=torch.int32), "must be an int8 tensor of shape"),
        (torch.zeros(299, dtype=torch.int8), "must be an int8 tensor of shape"),
        (torch.zeros(300, dtype=torch.uint8), r"or uint8 of shape \(300, 2\)"),
        ("x", "must be an int8 tensor of shape"),
    ],
)
def test_a_bad_loaded_correction_is_named_and_changes_nothing(bad, message):
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = AdamW8bit([p], master_weight_bits=24)
    p.grad = torch.ones(300, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state[p])
    saved["state"][0]["master_correction"] = bad
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert torch.equal(opt.state[p]["master_correction"], before["master_correction"])


def test_a_correction_on_an_fp32_parameter_is_refused_on_load():
    p = torch.nn.Parameter(torch.randn(300))
    opt = AdamW8bit([p], master_weight_bits=24)
    p.grad = torch.ones(300)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["master_correction"] = torch.zeros(300, dtype=torch.int8)
    with pytest.raises(ValueError, match="belongs to a bfloat16 or float16 parameter"):
        opt.load_state_dict(saved)


def test_gradient_release_with_a_master_equals_the_normal_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 8)).bfloat16()
    twin = copy.deepcopy(model)
    opt = AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24, min_8bit_size=0)
    opt_twin = AdamW8bit(twin.parameters(), lr=1e-3, master_weight_bits=24, min_8bit_size=0)
    handle = qoptim.release_gradients(opt_twin)
    for step in range(4):
        x = torch.randn(16, 64).bfloat16()
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        twin(x).float().square().mean().backward()
        opt_twin.step()
    handle.remove()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same(p.detach(), q.detach())
        assert_same(opt.master_weight(p), opt_twin.master_weight(q))


def test_a_paged_optimizer_pages_the_correction_and_its_copies_too():
    """Under a (fake) managed memory the correction of a large parameter lives in paged memory like
    its states; a deep copy pages its own, and steps as the original."""
    with paged_cpu():
        p = torch.nn.Parameter(torch.randn(PAGED_MIN_NUMEL).bfloat16())
        opt = qoptim.optim.PagedAdamW8bit([p], lr=1e-3, master_weight_bits=32)
        p.grad = torch.randn_like(p)
        opt.step()
        correction = opt.state[p]["master_correction"]
        assert is_paged(correction) and correction.shape == (PAGED_MIN_NUMEL, 2)
        twin = copy.deepcopy(opt)
        q = twin.param_groups[0]["params"][0]
        assert is_paged(twin.state[q]["master_correction"])
        assert twin.state[q]["master_correction"].data_ptr() != correction.data_ptr()
        p.grad = q.grad = torch.randn_like(p)
        opt.step()
        twin.step()
        assert_same(opt.master_weight(p), twin.master_weight(q))
