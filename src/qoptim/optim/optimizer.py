"""Base classes of the bitsandbytes-compatible optimizers.

``Optimizer8bit`` holds what every optimizer shares: the step loop, per-parameter config and
state buffers; ``_StateOptimizer`` the constructor, state and update of ``Optimizer2State`` and
``Optimizer1State``, which say how many state keys a family keeps. None of them computes an
update: that is ``qoptim.kernels.update``, which picks the implementation for the parameter's
device. The checks are ``validation``'s, the state's keys, shapes and views ``state``'s, a step's
update jobs ``update``'s and the checkpoint layout ``checkpoint``'s (and ``exports``' and ``reshard``'s).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import paging
from ..kernels import Hyper, Job
from ..quant.formats import FORMATS, state_map
from ..quant.maps import signed_map, unsigned_map
from . import checkpoint, dtensor, exports, validation, weights
from .checkpoint import QUANT_STATE_KEY
from .manager import GlobalOptimManager, settings_args
from .names import OPTIMIZER_NAMES
from .state import KEYS, SIGNED_MAP, STEP, TENSOR_KEYS, UNSIGNED_MAP, KeptState, MapCopies, SlotCache, layout_of, new_state, with_draw
from .update import ParamUpdate, clip_gradient, hyper_of, run_jobs, total_skipped

__all__ = ["Optimizer8bit", "Optimizer2State", "Optimizer1State", "GlobalOptimManager", "QUANT_STATE_KEY"]


class Optimizer8bit(torch.optim.Optimizer):
    """The step loop and checkpoint layout shared by every qoptim optimizer.

    ``load_state_dict`` replaces only ``state`` and ``param_groups`` (``__setstate__``), so the
    caches outlive a load and check themselves against the state they are asked about."""

    # What the step loop and the checkpoint layout read of a subclass; _StateOptimizer sets them
    # from its update rule. Alone, Optimizer8bit keeps bitsandbytes' two states.
    layout: tuple[KeptState, ...] = (KeptState(KEYS[0], 1, True), KeptState(KEYS[1], 1, False))
    layer_wise = False  # a rule with a layer-wise trust ratio (LAMB, LARS): needs the whole parameter
    four_bit = False  # a rule that takes 4-bit states (optim_bits=4)
    nonfinite = "skip"  # what a NaN/Inf gradient does (validation.NONFINITE_MODES)

    def __init__(self, params, defaults: dict[str, Any], optim_bits: int = 32, is_paged: bool = False):
        super().__init__(params, defaults)
        self.initialized = False
        self.name2qmap: dict[str, torch.Tensor] = {}
        self.is_paged = is_paged
        self.non_castable_tensor_keys = set(TENSOR_KEYS)
        self.nonfinite_skipped_blocks = 0  # 256-blocks left untouched because of NaN/Inf gradients
        self._attach()
        if optim_bits in FORMATS:  # its format's maps (8-bit: bitsandbytes' fill_qmap; names: quant.formats)
            self.name2qmap.update((name, state_map(name)) for name in FORMATS[optim_bits].map_names)

    def __getstate__(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` keep: torch's entries and every public setting, not
        torch's hooks (as torch), the caches nor the manager (a process-wide singleton)."""
        kept = {key: value for key, value in self.__dict__.items() if not key.startswith("_") and key != "mng"}
        return {**kept, "state": checkpoint.copied_state(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's (also how ``load_state_dict`` assigns), each group's missing settings from the
        defaults (as torch's optimizers fill theirs), then what ``__getstate__`` left out."""
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        ours = "differentiable" in defaults
        checkpoint.fill_defaults(state.get("param_groups", ()), defaults)
        super().__setstate__(state)
        if not ours:  # torch's __setstate__ adds its own flag, which no qoptim step reads
            self.defaults.pop("differentiable", None)
        self._attach()
        if "defaults" in state:  # unpickled (a load places its values itself)
            checkpoint.repage(self)

    def _attach(self) -> None:
        """The manager and the caches, where missing (a new or an unpickled optimizer)."""
        self.mng = GlobalOptimManager.get_instance()
        self.__dict__.setdefault("_map_copies", MapCopies())
        self.__dict__.setdefault("_slot_cache", SlotCache())
        self.__dict__.setdefault("_step_skips", None)  # the skipped-block counts of the step under way

    def fill_qmap(self) -> None:  # (bitsandbytes')
        self.name2qmap.update({SIGNED_MAP: signed_map(), UNSIGNED_MAP: unsigned_map()})

    def qmap_on(self, name: str, device: torch.device) -> torch.Tensor:
        """Map ``name`` on ``device``: one copy per device, shared by every parameter there."""
        if name not in self.name2qmap:  # first use, or another format's (quant.formats)
            self.name2qmap[name] = state_map(name)
        return self._map_copies.on(name, self.name2qmap[name], device)

    # ---- configuration -------------------------------------------------------------

    def check_overrides(self) -> None:
        """Resolve ``GlobalOptimManager.register_module_override`` entries against our params: by
        the tensor itself, never by position (an optimizer built later for another model must
        not inherit them; bitsandbytes also keys them by position)."""
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        for module, attr, config in self.mng.module_weight_config_triple:
            target = getattr(module, attr)
            if id(target) in ours and config:
                self.mng.override_config(target, key_value_dict=config)

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        """Settings for one parameter: its group, then ``args``, then overrides (which win)."""
        return self.mng.config_of(group, gindex, pindex, self.args)

    # ---- the step ------------------------------------------------------------------

    @torch.compiler.disable  # eager only: inside a compiled region the step is a clean graph break
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Every parameter and gradient is checked before anything changes, so a rejected step
        leaves parameters and states as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_params([(gindex, pindex, group, p) for gindex, group in enumerate(self.param_groups)
                            for pindex, p in enumerate(group["params"]) if p.grad is not None])  # fmt: skip
        return loss

    @torch.no_grad()
    def update_params(self, work: list[tuple[int, int, dict[str, Any], torch.Tensor]], *, ends_step=True, continues_step=False) -> None:
        """step() for the (gindex, pindex, group, param) items of ``work`` only, each with a gradient. A step can span calls
        (gradient release updates parameters as backward completes their gradients): the calls before its last pass
        ``ends_step=False``, those after its first ``continues_step=True`` (the first checked the param groups), and the
        last notes the NaN/Inf blocks skipped by them all once, as step() does; ``in_step`` holds in between."""
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(() if continues_step else self.param_groups):
            self.check_group(gindex, group)
        for gindex, pindex, group, p in work:
            checkpoint.unnest(self.state[p])
            validation.check_param(self, gindex, pindex, group, p)
        self._step_skips, skipped, step_open = self._step_skips or [], 0, False
        try:
            self._update_params(work)
            if self.is_paged:
                for device in {p.device for *_, p in work}:
                    paging.synchronize(device)
            skipped = total_skipped(self._step_skips) if ends_step else 0  # the step's one read of device counters
            step_open = not ends_step
        finally:  # also after a failure deep in a backend: later direct update_step calls count themselves
            self._step_skips = self._step_skips if step_open else None
        if skipped:
            self._note_skipped(skipped)

    def check_group(self, gindex: int, group: dict[str, Any]) -> None:
        """A param group before a step (its options may have changed since the last one)."""
        validation.check_group(gindex, group)

    @property
    def in_step(self) -> bool:
        """True while ``step()`` runs: ``update_step`` adds its skipped blocks to the step's total."""
        return self._step_skips is not None

    def _update_params(self, work: list[tuple[int, int, dict[str, Any], torch.Tensor]]) -> None:
        """Update every (gindex, pindex, group, param) of a checked step."""
        self._update_one_by_one(work)

    def _update_one_by_one(self, work) -> None:
        """bitsandbytes' loop: each parameter's state prefetched (paged) just before its own update."""
        for gindex, pindex, group, p in work:
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            self.update_step(group, p, gindex, pindex)

    def _count_skipped(self, blocks: int | torch.Tensor) -> None:
        if not isinstance(blocks, torch.Tensor) and not blocks:
            return
        if self._step_skips is None:  # update_step called outside step()
            self._note_skipped(total_skipped([blocks]))
        else:
            self._step_skips.append(blocks)

    def _note_skipped(self, blocks: int) -> None:
        if not self.nonfinite_skipped_blocks:
            warnings.warn(f"{type(self).__name__}: {blocks} block(s) of 256 elements had NaN or Inf gradients and were left "
                          "unchanged (parameters and state); see .nonfinite_skipped_blocks for the running count",
                          RuntimeWarning, stacklevel=4)  # fmt: skip
        self.nonfinite_skipped_blocks += blocks

    # ---- state buffers -------------------------------------------------------------

    def to_gpu(self) -> None:
        """Move existing state (e.g. loaded with ``move_to_device=False``) to its parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.device != p.device:
                        state[key] = value.to(p.device)

    def get_state_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (bitsandbytes')
        return paging.state_buffer(p, dtype, self.is_paged, owner=self)

    def state_buffer(self, p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
        """A zero state tensor of ``shape`` for ``p``: paged when the optimizer is, sharded like ``p`` (FSDP2)."""
        if dtensor.is_dtensor(p):  # sharded like p (FSDP2); never paged
            return dtensor.state_buffer(p, dtype, shape)
        return paging.state_buffer(p, dtype, self.is_paged, owner=self, shape=shape)

    def absmax_buffer(self, p: torch.Tensor, shape) -> torch.Tensor:
        """Zero block scales of ``shape`` for ``p`` (sharded like ``p``, FSDP2)."""
        if dtensor.is_dtensor(p):
            return dtensor.absmax_buffer(p, shape)
        return torch.zeros(shape, dtype=torch.float32, device=p.device)

    def prefetch_state(self, p: torch.Tensor) -> None:
        if self.is_paged:
            state = self.state[p]
            paging.prefetch([state[kept.keys.values] for kept in self.layout if kept.keys.values in state], p.device)

    def init_state(self, group, p, gindex, pindex):
        raise NotImplementedError("init_state method needs to be overridden")

    @torch.no_grad()
    def master_weight(self, p: torch.Tensor) -> torch.Tensor:
        """A new fp32 tensor of ``p``'s master weight (an fp32 parameter is its own): ``weights.master_weight``."""
        return weights.master_weight(p, self.state.get(p, {}))

    def update_step(self, group, p, gindex, pindex):
        raise NotImplementedError("The update_step method needs to be overridden")

    # ---- checkpoints (the layout: checkpoint.py) -----------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, with each parameter's state tensors nested under
        ``"__bnb_optimizer_quant_state__"`` as bitsandbytes >= 0.49.2 writes them; torch's hooks
        run around it (the post hooks get the dict as written, and may extend or replace it)."""
        export = exports.requested_export()  # (first: it looks at who called us)
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = checkpoint.exported(checkpoint.packed(self), self.non_castable_tensor_keys, len(self.layout), export)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a state dict written by qoptim or bitsandbytes (nested or flat layout).

        Everything is checked before anything is assigned: a state dict that does not fit
        these parameters raises and leaves the optimizer as it was.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.__setstate__(checkpoint.loaded(self, state_dict, move_to_device))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class _StateOptimizer(Optimizer8bit):
    """What Optimizer2State and Optimizer1State share: arguments, state layout and update.

    ``step()`` hands every parameter's update to the kernels together (``kernels.update_many``)
    while ``batch_updates`` holds. A subclass with an ``update_step`` of its own (bitsandbytes'
    extension point) gets it called for each parameter instead: ``__init_subclass__`` turns
    batching off for it, and ``_update_params`` for an ``update_step`` set on the instance."""

    n_states = 2  # state keys per parameter
    batch_updates = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "update_step" in vars(cls):
            cls.batch_updates = False
        if "master_weight_bits" not in (cls.__doc__ or ""):  # (a variant's doc is its base's: it has it)
            cls.__doc__ = (cls.__doc__ or "") + weights.SETTINGS_DOC

    def __init__(self, optimizer_name: str, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.0, skip_zeros=False,
                 is_paged=False, alpha=0.0, t_alpha=None, t_beta3=None, nonfinite="skip", *, master_weight_bits=None,
                 weight_rounding="nearest", state_rounding=None):  # fmt: skip
        name = OPTIMIZER_NAMES.get(optimizer_name)
        if name is None or len(layout_of(name.spec)) != self.n_states:
            known = sorted(k for k, n in OPTIMIZER_NAMES.items() if len(layout_of(n.spec)) == self.n_states)
            raise ValueError(f"Unsupported optimizer name: {optimizer_name!r}; {type(self).__name__} knows {known}")
        if isinstance(betas, str):
            betas = [float(b) for b in betas.strip("()[] ").split(",")]
        validation.check_hyper(lr, betas, eps, weight_decay)
        validation.check_settings(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                                  max_unorm=max_unorm, skip_zeros=skip_zeros, block_wise=block_wise, is_paged=is_paged,
                                  nonfinite=nonfinite, state_rounding=state_rounding, spec=name.spec, four_bit=name.four_bit)  # fmt: skip
        weights.check_settings(master_weight_bits, weight_rounding)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if self.n_states == 2:  # bitsandbytes' two-state groups also carry AdEMAMix's settings
            defaults.update(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)
        super().__init__(params, defaults, optim_bits, is_paged)
        self.optimizer_name = optimizer_name
        self.rule = name.rule  # the update rule of qoptim.kernels
        self.decoupled = name.decoupled
        self.layout = layout_of(name.spec)
        self.layer_wise = name.spec.trust
        self.four_bit = name.four_bit
        self.nonfinite = nonfinite
        self.args = settings_args(args, optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                                  block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros, master_weight_bits=master_weight_bits,
                                  weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip

    def add_group_defaults(self, **defaults) -> None:
        """Settings of a family's own (nesterov, lr_decay, ...), kept in every param group."""
        self.defaults.update(defaults)
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        config = self.get_config(gindex, pindex, group)  # optim_bits was checked before the step
        self.state[p].update(new_state(p, config, self.layout, self, layer_wise=self.layer_wise))

    def _update_params(self, work) -> None:
        """All parameters' updates handed to the kernels together (``kernels.update_many``), so
        that a backend can batch small tensors into one launch. Paged optimizers (each state
        prefetched just before its own update), an ``update_step`` of a subclass or instance
        (see the class doc) and a parameter listed twice (it must see two updates) take the
        one-at-a-time path.

        Nothing is counted before the kernels ran: states are created first (for every
        parameter), updates are built without changing anything, and each one's step count and
        clipping history are committed after the kernels, so a failure on the way (out of
        memory, a bad override) leaves no parameter counted but not updated."""
        own_update_step = "update_step" in vars(self)
        if not self.batch_updates or own_update_step or self.is_paged or len({id(p) for *_, p in work}) != len(work):
            return self._update_one_by_one(work)
        for gindex, pindex, group, p in work:
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
        updates = [self._param_update(group, p, gindex, pindex) for gindex, pindex, group, p in work]
        try:
            results = run_jobs([u.job for u in updates])
        finally:  # a parameter updated as a contiguous copy gets it back, whatever happened
            for u in updates:
                u.write_back()
        for u, result in zip(updates, results):
            u.commit_state()
            self._count_skipped(result.skipped_blocks)

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        u = self._param_update(group, p, gindex, pindex)
        try:
            (result,) = run_jobs([u.job])
        finally:
            u.write_back()
        u.commit_state()
        self._count_skipped(result.skipped_blocks)

    def _param_update(self, group, p, gindex, pindex) -> ParamUpdate:
        """One parameter's update, ready for the kernels; counts nothing (``commit_state`` does)."""
        config, state = self.get_config(gindex, pindex, group), self.state[p]
        hp = self.hyper(config, state[STEP] + 1)
        params = dtensor.local(p.detach())  # a DTensor's local shard (FSDP2), updated in place
        flat_p = params.view(-1) if params.is_contiguous() else params.contiguous().view(-1)
        flat_g = dtensor.local(p.grad.detach()).contiguous().view(-1)
        commit: dict[str, Any] = {STEP: hp.step}
        if config["percentile_clipping"] < 100:
            hp = clip_gradient(hp, state, flat_g, config["percentile_clipping"], commit)
        weights.sync_state(p, state, config, self, (gindex, pindex))
        draw = weights.step_draw(p, state, hp.step)
        slots = with_draw(self._slot_cache.slots_of(p, state, self.layout), self.layout, state, config, draw)
        job = Job(self.rule, flat_p, flat_g, slots, hp, self.nonfinite == "skip", weights.weight_format(p, state, config, draw))
        return ParamUpdate(job, params, state, commit)

    def hyper(self, config: dict[str, Any], step: int) -> Hyper:
        """A step's hyperparameters for the kernels (``update.hyper_of``; families extend it)."""
        return hyper_of(config, step, self.decoupled)


class Optimizer2State(_StateOptimizer):
    """Optimizers with two states per parameter: a first moment (signed map) and a second
    moment (unsigned map)."""

    n_states = 2


class Optimizer1State(_StateOptimizer):
    """Optimizers with one state per parameter (momentum, or a sum of squares)."""

    n_states = 1

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.0), eps=1e-8, weight_decay=0.0, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.0, skip_zeros=False, is_paged=False,
                 nonfinite="skip", *, master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        super().__init__(optimizer_name, params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping,
                         block_wise, max_unorm, skip_zeros, is_paged, nonfinite=nonfinite, master_weight_bits=master_weight_bits,
                         weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip
