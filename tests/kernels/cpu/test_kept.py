"""What the CPU backend keeps of a parameter's states between steps (``layout._kept``, the
constants of ``rules.constants``): a step on changed states, maps or hyperparameters is the
reference's step on them, never one on what was kept; kept entries go with their states."""

import dataclasses
import gc

import numpy as np
import pytest
import torch

from qoptim.kernels import BLOCK, Hyper, cpu, reference
from qoptim.kernels.cpu import layout, rules
from qoptim.kernels.rules import RULES, switches
from qoptim.quant.maps import signed_map, unsigned_map
from qoptim.quant.master import Draw
from support.cpu_states import adam_hyper, assert_same, copy_state, make_state


def step_both(p, slots, twin_p, twin_slots, hp):
    """One step on the CPU backend and on the reference, from equal copies; asserts equal results."""
    g = torch.randn(p.numel(), generator=torch.Generator().manual_seed(hp.step)).to(p.dtype) * 0.01
    cpu.update("adam", p, g, slots, hp)
    reference.update("adam", twin_p, g.clone(), twin_slots, hp)
    assert_same(p, twin_p)
    for ours, theirs in zip(slots, twin_slots):
        assert_same(ours.values, theirs.values)
        assert_same(ours.absmax, theirs.absmax)


def test_a_map_changed_in_place_is_seen():
    p, slots = make_state(1000, torch.float32, "block", code=unsigned_map().clone())
    twin_p, twin_slots = copy_state(p, slots)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(1, True))
    slots[0].code.mul_(0.5)  # (both sides share the map: the reference reads the new one)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(2, True))
    step_both(p, slots, twin_p, twin_slots, adam_hyper(3, True))


@pytest.mark.parametrize("change", ["absmax", "values", "code", "blocksize"])
def test_a_slot_changed_is_seen(change):
    """A slot object edited between steps (a new scale tensor, new codes, another map, another layout)."""
    p, slots = make_state(1000, torch.float32, "block")
    twin_p, twin_slots = copy_state(p, slots)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(1, True))
    for ours, theirs in zip(slots, twin_slots):
        if change == "absmax":
            ours.absmax, theirs.absmax = ours.absmax.clone() * 2, theirs.absmax.clone() * 2
        elif change == "values":
            ours.values, theirs.values = ours.values.flip(0).clone(), theirs.values.flip(0).clone()
        elif change == "code":  # (maps of other tensors, and other values)
            ours.code = theirs.code = (signed_map() if ours is slots[0] else unsigned_map()) * 0.5
        else:  # one scale per tensor from now on
            ours.blocksize = theirs.blocksize = 0
            ours.absmax, theirs.absmax = ours.absmax.max().reshape(1), theirs.absmax.max().reshape(1)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(2, True))


def test_states_moved_in_place_are_seen():
    """The same tensor objects given new memory (``set_``), then resized."""
    p, slots = make_state(700, torch.float32, "block")
    twin_p, twin_slots = copy_state(p, slots)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(1, True))
    for ours, theirs in zip(slots, twin_slots):
        ours.values.set_(ours.values.clone())
        ours.absmax.set_(ours.absmax.clone())
    step_both(p, slots, twin_p, twin_slots, adam_hyper(2, True))
    q = torch.randn(300)
    twin_q = q.clone()
    for ours, theirs in zip(slots, twin_slots):  # shrunk to a parameter of 300 elements
        ours.values.resize_(300)
        theirs.values = theirs.values[:300].clone()
        ours.absmax.resize_(-(-300 // BLOCK))
        theirs.absmax = theirs.absmax[: -(-300 // BLOCK)].clone()
    step_both(q, slots, twin_q, twin_slots, adam_hyper(3, True))


def test_maps_freed_and_made_again_are_seen():
    """A new map each step, the last one freed (its id and address may come back): each step reads its own."""
    p, slots = make_state(1000, torch.float32, "block")
    twin_p, twin_slots = copy_state(p, slots)
    for step in range(1, 13):
        slots[1].code = twin_slots[1].code = unsigned_map() * (0.5 + step / 24)
        step_both(p, slots, twin_p, twin_slots, adam_hyper(step, True))


def test_scales_shrunk_in_place_are_seen():
    """Scales resized in place (the same tensor and address, fewer elements): no longer what the
    kernels take, so both backends refuse or take them alike."""
    p, slots = make_state(700, torch.float32, "block")
    twin_p, twin_slots = copy_state(p, slots)
    step_both(p, slots, twin_p, twin_slots, adam_hyper(1, True))
    slots[1].absmax.resize_(1)
    assert layout.plan("adam", p, slots) is None


def test_reused_ids_are_not_mistaken():
    """States made and freed one after the other (Python reuses their ids): each step is its own."""
    for i in range(30):
        p, slots = make_state(257 + 64 * (i % 3), torch.float32, "block" if i % 2 else "fp32", seed=i)
        twin_p, twin_slots = copy_state(p, slots)
        step_both(p, slots, twin_p, twin_slots, adam_hyper(1 + i % 4, i % 2 == 0))
        del p, slots, twin_p, twin_slots


def test_entries_go_with_their_states():
    gc.collect()
    before = layout.kept_count()
    made = [make_state(300, torch.float32, layout_, seed=i) for i, layout_ in enumerate(["block", "whole", "fp32"] * 3)]
    for p, slots in made:
        cpu.update("adam", p, torch.ones(300) * 0.01, slots, adam_hyper(1, True))
    assert layout.kept_count() == before + len(made)
    del made, p, slots
    gc.collect()
    assert layout.kept_count() == before


def test_a_draw_changes_nothing_kept():
    """Stochastic rounding gives the slots new draws every step (new slot objects, the same tensors)."""
    p, slots = make_state(1000, torch.float32, "block")
    twin_p, twin_slots = copy_state(p, slots)
    for step in range(1, 5):
        drawn = [slots[0], dataclasses.replace(slots[1], draw=Draw(step * 7919, 3))]
        twin_drawn = [twin_slots[0], dataclasses.replace(twin_slots[1], draw=Draw(step * 7919, 3))]
        step_both(p, drawn, twin_p, twin_drawn, adam_hyper(step, True))


@pytest.mark.parametrize("field, a, b", [("weight_decay", 0.0, -0.0), ("lr", 1e-3, np.float32(1e-3)),
                                         ("step", 3, 4), ("decoupled", True, False)])  # fmt: skip
def test_constants_are_those_of_their_exact_hyperparameters(field, a, b):
    """Kept constants are told apart by the bits and types of the hyperparameters: -0.0 is not 0.0,
    an np.float32 is not its double."""
    hp = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, decoupled=True)
    for first, second in ((a, b), (b, a)):
        rules.constants("adam", hp._replace(**{field: first}))
        got = rules.constants("adam", hp._replace(**{field: second}))
        want = made_anew("adam", hp._replace(**{field: second}))
        assert [x.tobytes() for x in got[0]] == [x.tobytes() for x in want[0]] and got[1:] == want[1:]


def made_anew(rule: str, hp: Hyper) -> tuple:
    """``rules.constants`` without what it keeps: the rule's scalars rounded to float32, its switches."""
    spec = RULES[rule]
    return tuple(np.float32(x) for x in spec.scalars(hp)), tuple(int(x) for x in switches(spec, hp)), np.float32(hp.trust_ratio)
