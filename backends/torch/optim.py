"""The optimizer step inside the backward: each parameter is updated as soon as its gradient is complete.

A reversible backward finishes one layer at a time: the top layer rebuilds its inputs, returns its
parameters' gradients, and is not needed again. ``OptimizerInBackward`` registers a post-accumulate-grad
hook on every parameter; armed (the last micro-batch of a step), the hook scales the gradient, runs an
inner optimizer (``torch.optim.AdamW`` by default) on that one parameter and frees the gradient. Autograd
runs a parameter's gradient accumulation as soon as it is ready (AccumulateGrad nodes have the highest
priority), so at most one layer's gradients are alive at a time instead of the whole model's: at 7B
parameters in bf16 that is 14 GB of gradients the GPU never holds.

Why this is safe with reverse layers: the layer below rebuilds its inputs from the outputs of this layer,
which were rebuilt (with this layer's old weights) before its gradients existed; nothing reads this
layer's weights again in the same backward. Tied parameters are used by several nodes; autograd sums their
contributions before the one accumulation, so the hook still runs once per backward.

AdamW is elementwise, so one inner optimizer per parameter takes the very step one optimizer over all of
them takes (bit for bit on CPU, where both use the single-tensor implementation; tests/torch/test_optim.py).

What changes:
- Gradient clipping needs the total norm before any update. ``clip="previous"`` scales this step's
  gradients by min(1, max_norm / norm of the previous step's gradients) (the first step: unclipped); the
  current norm is still measured, from the hooks, and reported. It is not the same update as clipping by
  the current norm; a step whose norm jumps is clipped one step late.
- Gradient accumulation: on the micro-batches before the last the hooks are disarmed and gradients add up
  in ``.grad`` as usual (so during accumulation the whole model's gradients exist, as they must).
- fp16 loss scaling (GradScaler) checks every gradient for inf before any update: not supported.

``stochastic_rounding=True`` (bf16 parameters): the update is computed in fp32 on a temporary copy of the
one parameter and rounded back to bf16 stochastically (round up with probability equal to the dropped
fraction), so small updates survive in expectation without fp32 master weights: 2 bytes of weights a
parameter plus the optimizer's state, instead of 4 + 2. The inner optimizer's state stays fp32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from revnet_core.errors import ConfigError

CLIP_MODES = ("previous",)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``x`` -> bf16, rounded up with probability (dropped bits / 2^16): unbiased, E[out] = x.

    bf16 is the top half of fp32's bits: adding a uniform random 16-bit integer to the bits and truncating
    rounds up exactly when the random number exceeds the complement of the dropped bits. Infinities and NaN
    pass unchanged.
    """
    if x.dtype != torch.float32:
        raise ConfigError(f"stochastic rounding takes fp32 values, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)
    # Only finite values are rounded: adding to the bits of inf/NaN (or of the largest finite values,
    # which would carry into the exponent's top) could turn them into something else.
    keep = ~torch.isfinite(x) | ~torch.isfinite(rounded)
    return torch.where(keep, x, rounded).to(torch.bfloat16)


class OptimizerInBackward(torch.optim.Optimizer):
    """An optimizer whose updates happen inside ``loss.backward()``, one parameter at a time.

    ``params``: parameters or parameter groups, as for any torch optimizer; ``optimizer_class`` and
    ``defaults`` (lr, betas, weight_decay, ...): the inner optimizer built for each parameter. The groups
    are real ``param_groups``: LR schedulers write ``lr`` there and the hook reads it at each update.

    Use: ``opt.arm(grad_scale=1.0)`` before the backward of a step's last micro-batch, then ``backward()``
    (the updates happen), then ``opt.finish()`` -> the step's gradient norm (after ``grad_scale``).
    ``step()`` only checks that every parameter with a gradient was updated.
    """

    def __init__(self, params: Iterable, optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 *, max_grad_norm: float | None = None, clip: str = "previous", stochastic_rounding: bool = False,
                 generator: torch.Generator | None = None, **defaults: Any):
        if clip not in CLIP_MODES:
            raise ConfigError(f"clip={clip!r} is not one of {CLIP_MODES}: clipping by the current norm would need "
                              "every gradient before the first update")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={max_grad_norm!r} must be > 0 (or None: no clipping)")
        super().__init__(params, defaults)
        self.optimizer_class = optimizer_class
        self.max_grad_norm = max_grad_norm
        self.stochastic_rounding = stochastic_rounding
        self.generator = generator
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._shadow: dict[torch.Tensor, torch.Tensor] = {}  # stochastic rounding: the fp32 stand-in's tensor
        self._group: dict[torch.Tensor, dict[str, Any]] = {}
        self._handles = []
        self._armed = False
        self._scale = 1.0
        self._clip_factor = 1.0
        self._sq_norm = 0.0
        self._updated: set[torch.Tensor] = set()
        self.previous_norm: float | None = None
        self.live_grad_bytes = 0  # bytes of gradients alive right now (the hooks' own count)
        self.peak_grad_bytes = 0  # the most seen since reset_peak()
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if stochastic_rounding and p.dtype != torch.bfloat16:
                    raise ConfigError(f"stochastic_rounding=True needs bf16 parameters; one is {p.dtype} "
                                      "(model.to(torch.bfloat16) first, or turn it off)")
                target = p
                if stochastic_rounding:  # the inner optimizer steps an fp32 stand-in filled per update
                    target = torch.zeros(0, dtype=torch.float32, device=p.device, requires_grad=True)
                    self._shadow[p] = target
                self._inner[p] = optimizer_class([target], **options)
                self._group[p] = group
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    # --- the step's protocol --------------------------------------------------------------------------
    def arm(self, grad_scale: float = 1.0) -> None:
        """The next backward completes the step: each gradient is multiplied by ``grad_scale`` (e.g. 1 /
        the step's target count) and the parameter updated."""
        self._armed = True
        self._scale = float(grad_scale)
        self._sq_norm = 0.0
        self._updated = set()
        self._clip_factor = 1.0
        if self.max_grad_norm is not None and self.previous_norm is not None and self.previous_norm > 0:
            self._clip_factor = min(1.0, self.max_grad_norm / (self.previous_norm + 1e-6))

    def finish(self) -> float:
        """End the armed backward; returns the step's gradient norm (before clipping)."""
        if not self._armed:
            raise RuntimeError("finish() without arm(): call arm() before the step's last backward")
        self._armed = False
        norm = math.sqrt(self._sq_norm)
        self.previous_norm = norm
        return norm

    def step(self, closure=None):
        """The updates happened in the backward; this checks none is pending (a gradient left unconsumed)."""
        pending = [p for p in self._inner if p.grad is not None]
        if pending:
            raise RuntimeError(f"{len(pending)} parameters have gradients the backward did not consume: call "
                               "arm() before the step's last backward")
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._inner:
            p.grad = None
        self.live_grad_bytes = 0

    def reset_peak(self) -> None:
        self.peak_grad_bytes = self.live_grad_bytes

    def remove_hooks(self) -> None:
        """Detach from the parameters (an optimizer replaced by another must not keep stepping them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def clip_factor(self) -> float:
        """The factor this step's gradients were multiplied by for clipping (1: none)."""
        return self._clip_factor

    # --- the hook -------------------------------------------------------------------------------------
    def _on_gradient(self, p: torch.Tensor) -> None:
        size = p.grad.numel() * p.grad.element_size()
        if p not in self._updated:
            self.live_grad_bytes += size  # during accumulation a gradient is counted once, when it appears
            self._updated.add(p)
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.live_grad_bytes)
        if not self._armed:
            return
        grad = p.grad
        if self._scale != 1.0:
            grad.mul_(self._scale)
        self._sq_norm += float(grad.double().pow(2).sum())
        if self._clip_factor != 1.0:
            grad.mul_(self._clip_factor)
        inner = self._inner[p]
        for key, value in self._group[p].items():
            if key != "params":
                inner.param_groups[0][key] = value
        with torch.no_grad():
            if self.stochastic_rounding:
                shadow = self._shadow[p]
                shadow.data = p.detach().float()
                shadow.grad = grad.float()
                inner.step()
                p.copy_(stochastic_round_to_bf16(shadow.detach(), self.generator))
                shadow.grad = None
                shadow.data = torch.zeros(0, dtype=torch.float32, device=p.device)
            else:
                inner.step()
        p.grad = None
        self.live_grad_bytes -= size

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The groups (lr etc.) and each inner optimizer's state, in parameter order."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "inner": [opt.state_dict() for opt in self._inner.values()],
                "previous_norm": self.previous_norm}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["inner"]
        if len(inner) != len(self._inner) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state holds {len(inner)} parameters in {len(state_dict['param_groups'])} groups; "
                             f"this optimizer has {len(self._inner)} in {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        for opt, saved in zip(self._inner.values(), inner):
            opt.load_state_dict(saved)
        self.previous_norm = state_dict.get("previous_norm")
