"""state_dict / load_state_dict: bitsandbytes' layout, exact resume, rejected loads."""

import io

import pytest
import torch
from support import DTYPES, clone_params, gradients, make_params, round_trip

import qoptim as bnb

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported")

SHAPES = [(64, 81), (17, 33)]  # 8-bit state with a partial last block, and fp32 state
VARIANTS = {
    "AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
    "Adam8bit-L2": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3, weight_decay=0.1),
    "Adam8bit-per-tensor": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3, block_wise=False),
    "Adam8bit-clipped": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3, percentile_clipping=50),
    "PagedAdamW8bit": lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3),
    "AdamW32bit": lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3),
}


def _params(dtype):
    return [p for i, shape in enumerate(SHAPES) for p in make_params(shape, dtype, seed=i)]


def _train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = gradients(p.shape, 1, seed=1000 * step + i)[0].to(p.dtype)
        opt.step()


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), key
        else:
            assert va == vb, key


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resume_from_a_checkpoint_is_bit_identical(variant, dtype):
    """N steps straight == k steps, save, load (weights_only) into fresh params and
    optimizer, N - k more steps: parameters and states bit-identical."""
    make = VARIANTS[variant]
    straight = _params(dtype)
    opt = make(straight)
    _train(opt, straight, 12)

    first = _params(dtype)
    opt_first = make(first)
    _train(opt_first, first, 5)
    checkpoint = round_trip({"model": [p.detach() for p in first], "optim": opt_first.state_dict()})

    resumed = [torch.nn.Parameter(t.clone()) for t in checkpoint["model"]]
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(checkpoint["optim"])
    _train(opt_resumed, resumed, 7, start=5)

    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        _assert_same_state(opt.state[p], opt_resumed.state[q])


def test_state_dict_has_the_bitsandbytes_layout():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 2)
    sd = opt.state_dict()
    big, small = sd["state"][0], sd["state"][1]
    assert big["step"] == 2 and isinstance(big["step"], int)
    assert set(big) == {"step", "__bnb_optimizer_quant_state__"}
    inner = big["__bnb_optimizer_quant_state__"]
    assert list(inner) == ["state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2"]
    assert inner["state1"].dtype == torch.uint8 and inner["absmax1"].shape == (21,)
    assert list(small["__bnb_optimizer_quant_state__"]) == ["state1", "state2"]
    assert small["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.float32
    group = sd["param_groups"][0]
    assert set(group) == {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3", "params"}
    # the live state is not rearranged by state_dict()
    assert "state1" in opt.state[params[0]] and "__bnb_optimizer_quant_state__" not in opt.state[params[0]]


def test_flat_legacy_state_dicts_load_too():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 2)
    sd = opt.state_dict()
    for k, v in sd["state"].items():
        v.update(v.pop("__bnb_optimizer_quant_state__"))
    fresh = bnb.optim.AdamW8bit(clone_params(params))
    fresh.load_state_dict(sd)
    for p, q in zip(params, fresh.param_groups[0]["params"]):
        _assert_same_state(opt.state[p], fresh.state[q])


def test_fp16_params_keep_fp32_and_uint8_states_on_load():
    params = _params(torch.float16)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 2)
    fresh = bnb.optim.AdamW8bit(clone_params(params))
    fresh.load_state_dict(round_trip(opt.state_dict()))
    states = list(fresh.state.values())
    assert states[0]["state1"].dtype == torch.uint8 and states[0]["absmax1"].dtype == torch.float32
    assert states[1]["state1"].dtype == torch.float32


def test_move_to_device_false_keeps_loaded_tensors_where_they_are():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 1)
    sd = opt.state_dict()
    fresh = bnb.optim.AdamW8bit(clone_params(params))
    fresh.load_state_dict(sd, move_to_device=False)
    loaded = sd["state"][0]["__bnb_optimizer_quant_state__"]["state1"]
    live = next(iter(fresh.state.values()))["state1"]
    assert torch.equal(live, loaded) and live.data_ptr() != loaded.data_ptr()  # a copy, not an alias


def _bad_state_dicts(sd):
    """(description, state dict that must be rejected)"""
    import copy

    def edited(fn):
        bad = copy.deepcopy(sd)
        fn(bad)
        return bad

    quant = "__bnb_optimizer_quant_state__"
    yield "group count", edited(lambda d: d["param_groups"].append(dict(d["param_groups"][0], params=[99])))
    yield "group size", edited(lambda d: d["param_groups"][0]["params"].pop())
    yield "state1 shape", edited(lambda d: d["state"][0][quant].update(state1=torch.zeros(3, dtype=torch.uint8)))
    yield "state dtype", edited(lambda d: d["state"][0][quant].update(state2=torch.zeros(64, 81, dtype=torch.int32)))
    yield "absmax shape", edited(lambda d: d["state"][0][quant].update(absmax1=torch.zeros(20)))
    yield "qmap length", edited(lambda d: d["state"][0][quant].update(qmap1=torch.zeros(255)))
    yield "missing absmax", edited(lambda d: d["state"][0][quant].pop("absmax2"))
    yield "unknown param id", edited(lambda d: d["state"].update({42: d["state"][0]}))
    yield "step type", edited(lambda d: d["state"][0].update(step="3"))
    yield "not a state dict", {"params": []}


def test_mismatched_state_dicts_are_rejected_and_change_nothing():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 2)
    sd = opt.state_dict()
    target_params = clone_params(params)
    target = bnb.optim.AdamW8bit(target_params, lr=5e-4)
    _train(target, target_params, 1)
    before = round_trip(target.state_dict())
    for what, bad in _bad_state_dicts(sd):
        with pytest.raises(ValueError):
            target.load_state_dict(bad)
        after = target.state_dict()
        assert after["param_groups"] == before["param_groups"], what
        for k in before["state"]:
            _assert_same_state(before["state"][k]["__bnb_optimizer_quant_state__"], after["state"][k]["__bnb_optimizer_quant_state__"])


def test_torch_state_dict_hooks_run():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params)
    _train(opt, params, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


def test_checkpoint_after_lr_scheduler_restores_lr():
    params = _params(torch.float32)
    opt = bnb.optim.AdamW8bit(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(opt, params, 1)
    sched.step()
    fresh = bnb.optim.AdamW8bit(clone_params(params), lr=1e-2)
    fresh.load_state_dict(round_trip(opt.state_dict()))
    assert fresh.param_groups[0]["lr"] == pytest.approx(5e-3)


def _trained_state_dict(cls, **kwargs):
    params = _params(torch.float32)
    opt = cls(params, **kwargs)
    _train(opt, params, 2)
    return params, opt


@pytest.mark.parametrize(
    "source,target",
    [
        (bnb.optim.Lion8bit, bnb.optim.AdamW8bit),
        (bnb.optim.AdamW8bit, bnb.optim.Lion8bit),
        (bnb.optim.AdEMAMix8bit, bnb.optim.AdamW8bit),
        (bnb.optim.AdamW32bit, bnb.optim.RMSprop32bit),
    ],
    ids=lambda c: c.__name__,
)
def test_a_state_dict_of_another_optimizer_type_is_rejected(source, target):
    params, opt = _trained_state_dict(source)
    other_params = clone_params(params)
    other = target(other_params)
    _train(other, other_params, 1)
    before = round_trip(other.state_dict())
    with pytest.raises(ValueError, match="another optimizer type|must be a"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    for k in before["state"]:
        _assert_same_state(before["state"][k]["__bnb_optimizer_quant_state__"], after["state"][k]["__bnb_optimizer_quant_state__"])


@pytest.mark.parametrize(
    "tamper,message",
    [
        (lambda s: s["absmax1"].__setitem__(3, float("nan")), "absmax1 must hold finite non-negative scales"),
        (lambda s: s["absmax2"].__setitem__(0, -1.0), "absmax2 must hold finite non-negative scales"),
        (lambda s: s["qmap1"].__setitem__(10, 0.5), "qmap1 must hold 256 finite codes in"),
        (lambda s: s["qmap2"].__setitem__(255, 2.0), "qmap2 must hold 256 finite codes in"),
        (lambda s: s.update(state2=s["state2"].float()), "state2 must be"),
    ],
)
def test_a_tampered_checkpoint_is_rejected(tamper, message):
    params, opt = _trained_state_dict(bnb.optim.AdamW8bit)
    sd = round_trip(opt.state_dict())
    inner = sd["state"][0]["__bnb_optimizer_quant_state__"]
    tamper(inner)
    if inner["state2"].dtype == torch.float32:
        inner["state2"] = inner["state2"][:3]  # a float state of the wrong shape
    fresh = bnb.optim.AdamW8bit(clone_params(params))
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_a_negative_step_is_rejected():
    params, opt = _trained_state_dict(bnb.optim.AdamW8bit)
    sd = round_trip(opt.state_dict())
    sd["state"][0]["step"] = -1
    with pytest.raises(ValueError, match="expected a non-negative int"):
        bnb.optim.AdamW8bit(clone_params(params)).load_state_dict(sd)


def test_a_truncated_checkpoint_file_fails_to_load_before_the_optimizer_sees_it(tmp_path):
    params, opt = _trained_state_dict(bnb.optim.AdamW8bit)
    path = tmp_path / "optim.pt"
    torch.save(opt.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_every_parameter_shares_one_map_also_after_loading():
    """One map tensor per state kind for all parameters (a checkpoint holds a copy per
    parameter): the kernels' tables are built once and small tensors batch together."""
    params = [torch.nn.Parameter(torch.randn(64, 81)) for _ in range(3)]
    opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    maps = {id(opt.state[p][key]) for p in params for key in ("qmap1", "qmap2")}
    assert len(maps) == 2
    saved = torch.load(io.BytesIO(_saved(opt.state_dict())), weights_only=True)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = bnb.optim.AdamW8bit(twins)
    fresh.load_state_dict(saved)
    assert {id(fresh.state[p][key]) for p in twins for key in ("qmap1", "qmap2")} == {id(fresh.name2qmap["dynamic"]), id(fresh.name2qmap["udynamic"])}
    custom = saved["state"][0]["__bnb_optimizer_quant_state__"]["qmap1"].clone()
    custom[1] += 1e-4  # a map of its own stays its own (and is not shared with the others)
    saved["state"][0]["__bnb_optimizer_quant_state__"]["qmap1"] = custom
    other = bnb.optim.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params])
    other.load_state_dict(saved)
    first = other.state[other.param_groups[0]["params"][0]]["qmap1"]
    assert torch.equal(first, custom) and first is not other.name2qmap["dynamic"]


def _saved(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


# ---- issue #16: as torch.optim --------------------------------------------------------------


def _torch_and_ours():
    """(torch.optim.Adam, qoptim Adam8bit), each stepped twice on its own copy of the parameters."""
    params = _params(torch.float32)
    pairs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=1e-3), lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)):
        ps = clone_params(params)
        opt = make(ps)
        _train(opt, ps, 2)
        pairs.append((opt, ps))
    return pairs


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(how):
    import copy
    import pickle

    def copied(opt):
        if how == "deepcopy":
            return copy.deepcopy(opt)
        if how == "pickle":
            return pickle.loads(pickle.dumps(opt))
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for opt, params in _torch_and_ours():
        other = copied(opt)
        other_params = [p for group in other.param_groups for p in group["params"]]
        assert {k for k in vars(other) if not k.startswith("_")} == {k for k in vars(opt) if not k.startswith("_")}
        _train(opt, params, 1, start=2)
        _train(other, other_params, 1, start=2)
        assert all(torch.equal(a, b) for a, b in zip(params, other_params))
        _assert_same_state(other.state[other_params[0]], opt.state[params[0]])


def test_a_key_added_by_a_state_dict_post_hook_is_kept():
    for opt, _ in _torch_and_ours():
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
        assert opt.state_dict()["extra"] == 1


def test_a_state_entry_that_is_no_parameter_is_kept_as_torch_keeps_it():
    for opt, params in _torch_and_ours():
        opt.state["note"] = 1
        sd = round_trip(opt.state_dict())
        assert sd["state"]["note"] == 1
        fresh = type(opt)(clone_params(params), lr=1e-3)
        fresh.load_state_dict(sd)
        assert fresh.state["note"] == 1


def test_a_checkpoint_without_absmax1_names_absmax1():
    params, opt = _trained_state_dict(bnb.optim.AdamW8bit)
    sd = round_trip(opt.state_dict())
    del sd["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"]
    fresh = bnb.optim.AdamW8bit(clone_params(params))
    with pytest.raises(ValueError, match=r"state1 holds 8-bit codes without their scales: expected absmax1 \(block-wise\)"):
        fresh.load_state_dict(sd)
    assert not fresh.state


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_paged_optimizer_pages_a_state_of_its_own(how):
    """Under a (fake) managed memory: the copy's large state is paged in buffers of its own, not
    plain memory tagged as paged (which the pager's prefetch would be handed), and both step."""
    import copy
    import pickle

    from support.paging import is_paged, paged_cpu, paging_params, train

    with paged_cpu() as managed:
        params = paging_params()
        opt = bnb.optim.PagedAdamW8bit(params)
        train(opt, params, 2)
        other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        other_params = other.param_groups[0]["params"]
        for p, q in zip(params, other_params):
            mine, theirs = opt.state[p]["state1"], other.state[q]["state1"]
            assert is_paged(theirs) == is_paged(mine) == (p is params[0])
            in_managed = any(start <= theirs.data_ptr() < start + len(m) for start, m in managed.live.items())
            assert in_managed == is_paged(theirs)
            assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()
        train(other, other_params, 1)
        train(opt, params, 1)
