"""Gradient release: each parameter updated as soon as backward completes its gradient, which is
then freed, so that no full set of gradients ever exists.

    handle = qoptim.release_gradients(optimizer)
    for batch in loader:
        model(batch).loss.backward()   # parameters are updated here, their gradients freed
        optimizer.step()               # harmless: no gradient is left (kept for LR schedulers)
        scheduler.step()               # takes effect: the next backward reads the group's new lr
        optimizer.zero_grad()          # harmless
    handle.remove()                    # the normal path again

A post-accumulate-grad hook per parameter queues the parameter with its gradient; the queue is
flushed through the optimizer's normal update (``Optimizer8bit.update_params``: the checks, then
every queued parameter in one ``kernels.update_many`` call, so small tensors share a kernel call)
when its gradients pass ``bucket_bytes`` and at the end of backward (an autograd final callback),
and the flushed gradients are set to None. Each backward is one step of the normal loop: the same
parameters, states, step counts, percentile-clipping histories and NaN/Inf counts bit for bit, the
skipped blocks noted once per backward as step() notes them once per step.

Under FSDP2 (``fully_shard``) the hooks are called by FSDP after its reduce-scatter, on the
sharded (DTensor) parameter and its local gradient. On CUDA (read from torch 2.13's code, not run
here: tested on CPU with gloo) they run in FSDP's post-reduce stream context, so a flush there is
ordered after the reduction, and the final flush runs after FSDP's own final callback (queued
before any gradient is reduced) has made the current stream wait for the reductions.

What cannot work is refused, never silently wrong:

- gradient accumulation over micro-batches: a parameter's second gradient before ``step()`` raises
  in backward once the loop is seen to call ``step()``, and at ``step()`` before that (the first
  micro-batches were then already applied). A loop that never calls ``step()`` makes every backward
  a step. Under FSDP2, ``set_requires_gradient_sync(False)`` micro-batches accumulate exactly
  (FSDP2 keeps the unsharded gradients and calls the hooks only at the synchronizing backward);
- gradients reduced after backward: with a process group initialized, every parameter must be a
  DTensor (FSDP2 calls the hooks after its reduce-scatter); a plain parameter there (DDP, FSDP1,
  an all-reduce of one's own) is refused, at ``release_gradients()`` and again at each backward;
- GradScaler: backward would apply scaled gradients before it can unscale them or skip the step.
  ``scaler.unscale_(optimizer)`` and ``scaler.step(optimizer)`` raise (after the first backward:
  what it applied cannot be told apart from an unscaled gradient);
- gradient clipping after backward: ``torch.nn.utils.clip_grad_norm_`` (and ``clip_grad_value_``,
  ``clip_grads_with_norm_``) would find no gradient and clip nothing, so while a handle is on they
  refuse its parameters (called through ``torch.nn.utils``, as the Hugging Face Trainer, Accelerate
  and Lightning do; a reference taken before the first ``release_gradients()``, ``from
  torch.nn.utils import clip_grad_norm_`` at import, escapes it). Use ``percentile_clipping``,
  which works per parameter and exactly. Anything else reading ``p.grad`` after backward sees none;
- ``nonfinite="raise"``: it promises that nothing changes when any gradient is bad, which needs
  every gradient before the first update.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch

from . import dtensor
from .optimizer import Optimizer8bit

__all__ = ["DEFAULT_BUCKET_BYTES", "ReleaseHandle", "release_gradients"]

DEFAULT_BUCKET_BYTES = 16 << 20  # queued gradient bytes that trigger a flush (small tensors share a kernel call)

# id(optimizer) -> its ReleaseHandle, which holds the optimizer (so the id stays its own) and is held
# by it: nothing here keeps a handle, or its optimizer, alive
_ACTIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def release_gradients(optimizer: Optimizer8bit, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> ReleaseHandle:
    """Update ``optimizer``'s parameters in backward, as their gradients complete, and free the
    gradients; ``handle.remove()`` restores the normal path. ``bucket_bytes`` bounds the
    gradients kept queued for one batched update (0: each parameter on its own)."""
    if not isinstance(optimizer, Optimizer8bit):
        raise TypeError(f"release_gradients takes a qoptim optimizer, got {type(optimizer).__name__}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be a non-negative int, got {bucket_bytes!r}")
    if id(optimizer) in _ACTIVE:
        raise RuntimeError(f"{type(optimizer).__name__}: gradient release is already on (remove its handle first)")
    if optimizer.nonfinite == "raise":
        raise ValueError(
            f"{type(optimizer).__name__}(nonfinite='raise') cannot release gradients: it leaves everything unchanged "
            "when any gradient holds NaN/Inf, which needs every gradient before the first update ('skip' or 'propagate' can)"
        )
    seen: set[int] = set()
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            name = f"parameter {pindex} of param group {gindex}"
            if id(p) in seen:
                raise ValueError(f"{name} is listed twice: gradient release updates each parameter once per backward")
            seen.add(id(p))
            if p.grad is not None:
                raise RuntimeError(f"{name} holds a gradient already: call optimizer.step() or zero_grad() before release_gradients()")
            if p.grad_fn is not None:
                raise ValueError(f"{name} is not a leaf tensor: its gradient is never accumulated")
    handle = ReleaseHandle(optimizer, bucket_bytes)
    handle.check_reduction()
    _guard_gradient_clipping()
    handle.attach()
    _ACTIVE[id(optimizer)] = handle
    return handle


# ---- what reads the gradients after backward: clipping, GradScaler ------------------------------

_NO_GRAD_SCALER = (
    "GradScaler cannot be used with gradient release: backward already applied the scaled gradients, before the "
    "scaler could unscale them or skip a step with NaN/Inf (use bf16 autocast without a scaler, or handle.remove())"
)

# torch.nn.utils' functions that clip parameters' gradients after backward: under release they would
# find none and clip nothing, silently. Each name is wrapped in torch.nn.utils and in its module
# clip_grad (torch calls between them through the module's globals: both are wrapped, so either way).
_CLIPPING = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "clip_grads_with_norm_")


def _guard_gradient_clipping() -> None:
    """Wrap torch's clipping functions and ``GradScaler.unscale_`` (once) so that they refuse the
    parameters, and the optimizer, of an active handle."""
    wrapped: dict[int, Callable] = {}  # id(torch's function) -> its guard: one object under both names, as before
    for module in (torch.nn.utils, torch.nn.utils.clip_grad):
        for name in _CLIPPING:
            original = getattr(module, name, None)
            if original is not None and not getattr(original, "qoptim_release_guard", False):
                setattr(module, name, wrapped.setdefault(id(original), _refusing_released(name, original)))
    scaler = torch.amp.GradScaler
    if not getattr(scaler.unscale_, "qoptim_release_guard", False):
        scaler.unscale_ = _refusing_unscale(scaler.unscale_)


def _refusing_unscale(unscale: Callable) -> Callable:
    """``GradScaler.unscale_``, refusing an optimizer whose gradients are released (it would find none)."""

    @functools.wraps(unscale)
    def guarded(self, optimizer):
        if id(optimizer) in _ACTIVE:  # (a handle is there from release_gradients() until its remove())
            raise RuntimeError(_NO_GRAD_SCALER)
        return unscale(self, optimizer)

    guarded.qoptim_release_guard = True
    return guarded


def _refusing_released(name: str, clip: Callable) -> Callable:
    @functools.wraps(clip)
    def guarded(parameters, *args, **kwargs):
        if _ACTIVE:  # (nothing to refuse while no handle is on: torch's function as it is)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            released = {id(q) for handle in list(_ACTIVE.values()) for group in handle.optimizer.param_groups for q in group["params"]}
            if any(id(p) in released for p in parameters):
                raise RuntimeError(
                    f"torch.nn.utils.{name} was given parameters under gradient release (qoptim.release_gradients): "
                    "backward has already applied their gradients and freed them, so it would clip nothing. Use the "
                    "optimizer's percentile_clipping (per parameter, exact under release), or handle.remove() to clip "
                    "on the normal path"
                )
        return clip(parameters, *args, **kwargs)

    guarded.qoptim_release_guard = True
    return guarded


def _backward_id() -> int | None:
    """torch's id of the backward under way (the autograd engine's graph task; None where this torch
    has no such function): a backward that failed runs no final callback, and the next one must be
    told apart from it (FSDP2 asks the same function whether backward is under way)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current()


def weak_hook(handle: weakref.ref):
    """A post-accumulate-grad hook calling ``handle().grad_ready`` while the handle lives."""

    def hook(p: torch.Tensor) -> None:
        alive = handle()
        if alive is not None:
            alive.grad_ready(p)

    return hook


class ReleaseHandle:
    """Gradient release of one optimizer (made by ``release_gradients``): the hooks, the queue of
    parameters whose gradients are complete, and what tells micro-batch accumulation."""

    def __init__(self, optimizer: Optimizer8bit, bucket_bytes: int):
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self.queue: list[tuple[int, int, dict[str, Any], torch.Tensor]] = []
        self.queued_bytes = 0
        self.open = False  # a backward is under way: its final callback is queued
        self.flushed = False  # this backward has updated parameters (its param groups are checked)
        self.backward: int | None = None  # torch's id of the backward under way (``_backward_id``)
        self.released: set[int] = set()  # parameters updated since the last step()
        self.repeated = False  # one of them was updated twice
        self.step_seen = False  # the loop calls step(): a second gradient before it is an error at once
        self.where: dict[int, tuple[int, int]] = {}  # id(param) -> (gindex, pindex)
        self.plain = any(not dtensor.is_dtensor(p) for group in optimizer.param_groups for p in group["params"])
        self.hooks: list[Any] = []
        self.amp_flag: Any = None  # the optimizer's own _step_supports_amp_scaling, restored by remove()

    def attach(self) -> None:
        opt = self.optimizer
        # The parameters' hooks hold the handle weakly: a tensor's hooks are held from C++, where the
        # garbage collector does not see them, so a strong reference would keep the optimizer (and its
        # states) alive for good. The optimizer holds the handle (its step pre-hook).
        grad_ready = weak_hook(weakref.ref(self))
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                self.where[id(p)] = (gindex, pindex)
                if p.requires_grad:  # one that does not has no gradient; if it gets one, step() updates it
                    self.hooks.append(p.register_post_accumulate_grad_hook(grad_ready))
        self.hooks.append(opt.register_step_pre_hook(self.before_step))
        # GradScaler.step then calls step() with the scale set on the optimizer (torch's protocol for
        # optimizers that unscale themselves), where before_step refuses it, instead of asserting
        # "No inf checks were recorded" (it finds no gradient to check).
        self.amp_flag = vars(opt).get("_step_supports_amp_scaling")
        opt._step_supports_amp_scaling = True

    def remove(self) -> None:
        """Back to the normal path: gradients stay in ``p.grad`` for ``step()``."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        opt = self.optimizer
        if self.amp_flag is None:
            vars(opt).pop("_step_supports_amp_scaling", None)
        else:
            opt._step_supports_amp_scaling = self.amp_flag
        if _ACTIVE.get(id(opt)) is self:
            del _ACTIVE[id(opt)]

    def check_reduction(self) -> None:
        """Refuse plain parameters in a process group: their gradients are reduced after backward
        (DDP's buckets, FSDP1's flat parameters, an all-reduce of one's own), but the hooks see
        each rank's own gradient."""
        if self.plain and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise RuntimeError(
                "gradient release under torch.distributed needs every parameter sharded by FSDP2 (fully_shard: its "
                "hooks run after the reduce-scatter); a plain parameter's gradient is reduced after backward "
                "(DistributedDataParallel, FSDP1, an all-reduce of your own), while release would apply this rank's "
                "own gradient"
            )

    # ---- backward --------------------------------------------------------------------

    def grad_ready(self, p: torch.Tensor) -> None:
        """A parameter's gradient is complete: queue it, flush the queue once it is large enough."""
        backward = _backward_id()
        if self.open and backward != self.backward:  # the last backward failed: its callback never came
            self.abort()
        if not self.open:
            self.check_reduction()
            torch.autograd.Variable._execution_engine.queue_callback(self.end_of_backward)
            self.open, self.flushed, self.backward = True, False, backward
        where = self.locate(p)
        if where is None:  # no longer one of the optimizer's parameters: leave its gradient alone
            return
        gindex, pindex = where
        if id(p) in self.released:
            if self.step_seen:
                self.abort()
                raise RuntimeError(
                    f"parameter {pindex} of param group {gindex} got a second gradient before optimizer.step(): "
                    "gradient accumulation over micro-batches is not supported under gradient release (each backward "
                    "updates the parameters and frees their gradients); this backward stopped at it. Call "
                    "handle.remove() to accumulate on the normal path (or, under FSDP2, set_requires_gradient_sync(False))"
                )
            self.repeated = True
        self.released.add(id(p))
        self.queue.append((gindex, pindex, self.optimizer.param_groups[gindex], p))
        grad = dtensor.local(p.grad)
        self.queued_bytes += grad.numel() * grad.element_size()
        if self.queued_bytes >= self.bucket_bytes:
            self.flush(ends_step=False)

    def end_of_backward(self) -> None:
        """The rest of the queue, and the step's NaN/Inf count noted once (autograd's final callback)."""
        if self.open:
            self.open = False
            self.flush(ends_step=True)

    def flush(self, *, ends_step: bool) -> None:
        work, self.queue, self.queued_bytes = self.queue, [], 0
        try:
            self.optimizer.update_params(work, ends_step=ends_step, continues_step=self.flushed)
        except BaseException:
            self.abort()
            raise
        self.flushed = True  # (this backward's first flush checked the param groups)
        for *_, p in work:
            p.grad = None

    def abort(self) -> None:
        """After a failure in backward: nothing queued stays (those gradients are left in place, not
        applied), and the optimizer's step is closed (its NaN/Inf count noted)."""
        self.queue, self.queued_bytes, self.open = [], 0, False
        if self.optimizer.in_step:
            try:
                self.optimizer.update_params([])
            except Exception:  # the error being raised says what is wrong (e.g. a param group's lr)
                pass

    def locate(self, p: torch.Tensor) -> tuple[int, int] | None:
        """(gindex, pindex) of ``p`` now (param groups can be added, or rebuilt by load_state_dict)."""
        groups = self.optimizer.param_groups
        where = self.where.get(id(p))
        if where is not None and where[0] < len(groups):
            params = groups[where[0]]["params"]
            if where[1] < len(params) and params[where[1]] is p:
                return where
        self.where = {id(q): (gi, pi) for gi, group in enumerate(groups) for pi, q in enumerate(group["params"])}
        return self.where.get(id(p))

    # ---- optimizer.step() ------------------------------------------------------------

    def before_step(self, optimizer, args, kwargs) -> None:
        """step() ends an iteration: what backward released since the last one must be one gradient per parameter."""
        if "found_inf" in vars(optimizer) or "grad_scaler" in kwargs:
            vars(optimizer).pop("found_inf", None)
            vars(optimizer).pop("grad_scale", None)
            raise RuntimeError(_NO_GRAD_SCALER)
        self.step_seen = True
        repeated, self.repeated = self.repeated, False
        self.released.clear()
        if repeated:
            raise RuntimeError(
                "more than one backward ran since the last optimizer.step(): gradient accumulation over micro-batches "
                "is not supported under gradient release, and each of those backward passes has already updated the "
                "parameters. Call handle.remove() to accumulate on the normal path (or, under FSDP2, "
                "set_requires_gradient_sync(False))"
            )
