"""Memory schedulers: choose each layer's policy at forward time, from the cost model and a memory budget.

The user's three call shapes::

    with MemoryScheduler(model=model, strategy="adaptive", recompute_granularity="layer"):
        loss = model(ids).loss
    loss.backward()                       # after the ``with``: the policies were captured in the forward

    with AdaptiveScheduler(model=model, memory_budget=40 * 2**30, profile=profile) as sched:
        out = model(ids)
        sched.recomputed_layers, sched.memory_saved

    model.set_scheduler(LayerScheduler().set_policy(layers=range(0, 6), policy="store"))

A scheduler hooks the model's forward: before it, it plans for the actual shape, dtype and autocast state
(``revnet_core.planner``) and sets ``model.policies`` to the plan (the engine implements every policy; a
scheduler never patches a block); after it, it compares what the forward kept with the prediction and
corrects the next plan if they disagree (saved-tensor bytes on CPU, allocator bytes on CUDA, and on CUDA the
allocator's peak since the last reset against the budget). On CPU the saved-tensor count needs hooks of its
own, and only one pair of saved-tensor hooks acts at a time: under the caller's hooks (``save_on_cpu``, ...)
the scheduler installs none and that forward goes unmeasured, so the caller's hooks are never shadowed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from revnet_core import policies as policy_table
from revnet_core.memory import Workload
from .cost import CostModel
from .engine import keep_refusal
from revnet_core.couplings import BaseCoupling
from revnet_core.planner import GRANULARITIES, STRATEGIES, Plan, plan_layers

from .memory import saved_tensor_bytes, saved_tensor_hooks_active

HEADROOM = 0.05  # of the device left free: the caching allocator reserves more than it hands out
TOLERANCE = 0.02  # measured/predicted disagreement that triggers a re-plan
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


# --- what the cost model needs to know about a model and a batch --------------------------------------------
def _check_model(model) -> None:
    for attr in ("config", "layers", "policies", "set_policy"):
        if not hasattr(model, attr):
            raise TypeError(f"a memory scheduler needs a ReversibleTransformer-like model (with .{attr}); got "
                            f"{type(model).__name__}")


def _ids_shape(ids) -> tuple[int, int]:
    if isinstance(ids, dict):
        ids = ids.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"expected a tensor of token ids (B, T) or (T,), got {type(ids).__name__}")
    if ids.dim() == 1:
        return 1, ids.shape[0]
    return ids.shape[0], ids.shape[-1]


def workload_for(model, batch: int, seq_len: int, optimizer: str = "adamw", hold_outputs: bool = False) -> Workload:
    """The cost model's view of running ``model`` now: its dtype and device, and the current autocast state."""
    p = next(model.parameters())
    device = "cuda" if p.device.type == "cuda" else "cpu"
    dev_type = p.device.type
    autocast = None
    if torch.is_autocast_enabled(dev_type):
        autocast = _DTYPE_NAMES.get(torch.get_autocast_dtype(dev_type))
        if autocast not in ("bfloat16", "float16"):
            autocast = None
    return Workload(batch=batch, seq_len=seq_len, param_dtype=_DTYPE_NAMES.get(p.dtype, "float32"),
                    autocast_dtype=autocast, device=device, optimizer=optimizer, training=model.training,
                    hold_outputs=hold_outputs)


def device_budget(model) -> int:
    """Bytes this process may use for a step: on CUDA what is free plus what PyTorch already reserved, on CPU
    the available RAM plus the model's parameters (already counted in the prediction), less HEADROOM."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(p.device)
        return int((free + torch.cuda.memory_reserved(p.device)) * (1 - HEADROOM))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no way to ask; plan for the least memory
        return 0
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    return int((avail + params) * (1 - HEADROOM))


def invertible_layers(model) -> list[bool]:
    """Whether each layer can rebuild its inputs (its couplings implement ``inverse``); the others checkpoint."""
    out = []
    for layer in model.layers:
        couplings = [getattr(getattr(layer, half, None), "coupling", None) for half in ("attn", "ffn")]
        if all(isinstance(c, BaseCoupling) for c in couplings):
            out.append(all(type(c).inverse is not BaseCoupling.inverse for c in couplings))
        else:
            out.append(callable(getattr(layer, "inverse", None)))
    return out


def keepable_layers(model) -> list[bool]:
    """Whether each layer can take ``reverse_keep_attention`` now (``engine.keep_refusal``: an additive
    softmax layer through the fused kernels, drawing no random numbers in the current mode)."""
    return [keep_refusal(layer) is None for layer in model.layers]


class CalibratedCost:
    """The cost model, corrected by measurements: activation bytes scaled by measured/predicted, and layer
    times taken from a profile (seconds per policy) when one is given."""

    def __init__(self, cm: CostModel, activation_scale: float = 1.0, layer_seconds: dict[str, float] | None = None):
        self.cm, self.activation_scale, self.layer_seconds = cm, activation_scale, layer_seconds

    def static_bytes(self) -> int:
        return self.cm.parameter_bytes() + self.cm.optimizer_bytes() + self.cm.gradient_bytes()

    def peak_bytes(self, plan: Sequence[str]) -> int:
        peak = self.cm.peak_bytes(plan)
        static = min(self.static_bytes(), peak)
        return int(static + self.activation_scale * (peak - static))

    def saved_bytes(self, plan: Sequence[str]) -> int:
        return self.cm.saved_bytes(plan)

    def step_time(self, plan: Sequence[str]) -> float:
        if not self.layer_seconds or "store" not in self.layer_seconds:
            return self.cm.step_time(plan)
        sec = self.layer_seconds
        per_flop = sec["store"] / self.cm.layer_time("store")
        total = per_flop * self.cm.head_time()
        for p in plan:
            if p in sec:
                total += sec[p]
            else:  # a block recompute: the stored layer plus that block's share of the measured extra forward
                extra = (self.cm.layer_time(p) - self.cm.layer_time("store")) / \
                    (self.cm.layer_time("reverse") - self.cm.layer_time("store"))
                total += sec["store"] + extra * (sec.get("reverse", sec["store"]) - sec["store"])
        return total


@dataclass
class ForwardRecord:
    """What one scheduled forward did and measured."""

    batch: int
    seq_len: int
    plan: Plan
    predicted_bytes: int  # saved-tensor bytes (CPU) or bytes the forward left allocated (CUDA), corrected
    measured_bytes: int | None = None
    measure: str = ""
    raw_predicted: int = 0  # the cost model's prediction before the measured correction


class _Scheduler:
    """Shared machinery: plan per (shape, dtype, autocast), apply it around each forward, measure, correct."""

    granularity = "block"

    def __init__(self, model, *, memory_budget: int | None = None, optimizer: str = "adamw",
                 recompute_granularity: str = "block", measure: bool = True, profile=None):
        _check_model(model)
        if recompute_granularity not in GRANULARITIES:
            raise ValueError(f"recompute_granularity={recompute_granularity!r} is not one of {list(GRANULARITIES)}")
        if memory_budget is not None and (not isinstance(memory_budget, (int, float)) or memory_budget <= 0):
            raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
        self.model = model
        self.granularity = recompute_granularity
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self.optimizer = optimizer
        self.measure = measure
        self.profile = profile
        self.activation_scale = profile.activation_scale() if profile is not None else 1.0
        self.history: list[ForwardRecord] = []
        self.adjustments: list[str] = []
        self._plans: dict[tuple, tuple[Plan, CalibratedCost]] = {}
        self._handles: list = []
        self._restore: list[str] | None = None
        self._pending: tuple | None = None
        self.forced: dict[int, str] = {}  # layer -> policy that overrides every plan (force_policy)

    # --- planning ---------------------------------------------------------------------------------------
    def budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else device_budget(self.model)

    def cost_model(self, batch: int, seq_len: int) -> CalibratedCost:
        cm = CostModel(self.model.config, workload_for(self.model, batch, seq_len, self.optimizer))
        seconds = self.profile.layer_seconds() if self.profile is not None else None
        return CalibratedCost(cm, self.activation_scale, seconds)

    def _key(self, batch: int, seq_len: int) -> tuple:
        w = workload_for(self.model, batch, seq_len, self.optimizer)
        return (w, round(self.activation_scale, 4), self.memory_budget)

    def plan_for(self, batch: int, seq_len: int) -> Plan:
        """The plan this scheduler uses for a batch of that shape under the current dtype and autocast."""
        key = self._key(batch, seq_len)
        if key not in self._plans:
            priced = self.cost_model(batch, seq_len)
            self._plans[key] = (self._make_plan(priced), priced)
        return self._plans[key][0]

    def _make_plan(self, priced: CalibratedCost) -> Plan:  # pragma: no cover - subclasses
        raise NotImplementedError

    def force_policy(self, layers: Iterable[int], policy: str) -> None:
        """Run ``layers`` under ``policy`` in every later forward, whatever the plan (the drift monitor's
        fallback, ``revnet_torch.drift``); the forward's predicted bytes are those of the overridden plan."""
        policy_table.check(policy)
        layers = list(layers)
        if layers:
            self.forced.update(dict.fromkeys(layers, policy))
            self.adjustments.append(f"layers {layers[0]}-{layers[-1]} forced to {policy!r}")

    def _applied(self, plan: Plan) -> list[str]:
        return [self.forced.get(i, p) for i, p in enumerate(plan.policies)]

    # --- hooks ------------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._handles:
            return
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, always_call=True),
        ]

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._restore_policies()

    def _restore_policies(self) -> None:
        if self._restore is not None:
            self.model.policies = self._restore
            self._restore = None

    def _before(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        batch, seq_len = _ids_shape(ids)
        self._check_peak()
        plan = self.plan_for(batch, seq_len)
        priced = self._plans[self._key(batch, seq_len)][1]
        self._restore = list(self.model.policies)
        policies = self._applied(plan)
        self.model.set_policy(policies)  # the engine implements every policy, block recomputes included
        record = ForwardRecord(batch, seq_len, plan, 0)
        device = next(self.model.parameters()).device
        meter = None
        if self.measure and torch.is_grad_enabled():
            if device.type == "cuda":
                record.measure = "cuda allocated after forward - before"
                record.raw_predicted = self._forward_retained(priced, policies)
                meter = torch.cuda.memory_allocated(device)
            elif saved_tensor_hooks_active():
                record.measure = "not measured: the caller's saved-tensor hooks are active"
            else:
                record.measure = "saved-tensor bytes"
                record.raw_predicted = priced.saved_bytes(policies)
                ctx = saved_tensor_bytes(exclude=list(self.model.parameters()))
                meter = (ctx, ctx.__enter__())
            record.predicted_bytes = int(record.raw_predicted * self.activation_scale)
        self._pending = (record, meter, device)
        return None

    def _after(self, module, args, output):
        pending, self._pending = self._pending, None
        try:
            if pending is None:
                return None
            record, meter, device = pending
            if meter is not None:
                if device.type == "cuda":
                    record.measured_bytes = torch.cuda.memory_allocated(device) - meter
                else:
                    ctx, result = meter
                    ctx.__exit__(None, None, None)
                    record.measured_bytes = result["bytes"]
                self._correct(record)
            self.history.append(record)
        finally:
            self._restore_policies()
        return None

    @staticmethod
    def _forward_retained(priced: CalibratedCost, policies: Sequence[str]) -> int:
        """Predicted bytes the forward leaves allocated when the model returns (inside the caller's
        autocast, so its weight cache still counts)."""
        sim = priced.cm.simulate(policies)
        return sim.phase_starts.get("forward end", 0) - sim.phase_starts.get("forward", 0)

    def _correct(self, record: ForwardRecord) -> None:
        """Scale predicted activation bytes by measured/predicted when they disagree; the next forward
        re-plans with the corrected prediction."""
        if not record.raw_predicted or record.measured_bytes is None:
            return
        ratio = record.measured_bytes / record.predicted_bytes
        if abs(ratio - 1.0) > TOLERANCE:
            new = min(max(record.measured_bytes / record.raw_predicted, 0.25), 4.0)
            self.adjustments.append(
                f"{record.measure}: measured {record.measured_bytes} vs predicted {record.predicted_bytes} "
                f"bytes ({ratio:.3f}x); activation scale {self.activation_scale:.3f} -> {new:.3f}")
            self.activation_scale = new

    def _check_peak(self) -> None:
        """On CUDA: if the allocator's peak since the last reset passed the budget, shrink the next plan."""
        if not self.history or not self.measure:
            return
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(device)
        last = self.history[-1].plan
        if last.budget is not None and peak > last.budget and last.peak_bytes:
            ratio = peak / last.peak_bytes
            new = min(max(self.activation_scale * ratio, 0.25), 4.0)
            if new > self.activation_scale * (1 + TOLERANCE):
                self.adjustments.append(f"cuda peak {peak} over the budget {last.budget}; activation scale "
                                        f"{self.activation_scale:.3f} -> {new:.3f}")
                self.activation_scale = new

    # --- what the README prints -------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        return self.history[-1].plan if self.history else None

    @property
    def recomputed_layers(self) -> list[int]:
        """Layers that recompute in the backward of the last scheduled forward."""
        return self.plan.recomputed_layers if self.plan else []

    @property
    def memory_saved(self) -> int:
        """Predicted peak bytes the last forward's plan saves against storing every layer."""
        if not self.history:
            return 0
        r = self.history[-1]
        priced = self.cost_model(r.batch, r.seq_len)
        return max(priced.peak_bytes(["store"] * len(r.plan.policies)) - priced.peak_bytes(r.plan.policies), 0)


class MemoryScheduler(_Scheduler):
    """Chooses per-layer policies for the forwards run inside ``with scheduler:``.

    strategy: ``aggressive`` recomputes every layer (least memory); ``balanced`` aims at the midpoint between
    that and storing everything; ``adaptive`` (default) takes the fastest plan under ``memory_budget`` (bytes;
    default: what the device has free) and corrects itself from measurements.
    recompute_granularity: ``layer`` (store or reverse whole layers), ``attention`` (also: store a layer but
    recompute its attention block), ``block`` (default; also: recompute only its FFN block, which frees the
    most memory per second of recompute: on an H100 at half of plain's peak it ran 1.09x plain's step at 32k
    and 1.06x at 64k, where ``layer`` ran 1.17x and 1.14x).
    """

    def __init__(self, model, strategy: str = "adaptive", recompute_granularity: str = "block", *,
                 memory_budget: int | None = None, optimizer: str = "adamw", measure: bool = True, profile=None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
        super().__init__(model, memory_budget=memory_budget, optimizer=optimizer,
                         recompute_granularity=recompute_granularity, measure=measure, profile=profile)
        self.strategy = strategy

    def _make_plan(self, priced: CalibratedCost) -> Plan:
        budget = None if self.strategy == "aggressive" else self.budget()
        if self.strategy == "balanced" and self.memory_budget is None:
            budget = None  # balanced needs no device query: the midpoint of the model's own range
        plan = plan_layers(priced, len(self.model.layers), budget, strategy=self.strategy,
                           granularity=self.granularity, invertible=invertible_layers(self.model),
                           keepable=keepable_layers(self.model))
        if not plan.fits:
            warnings.warn(f"no plan fits: {plan.summary()}; {' '.join(plan.notes)}", stacklevel=3)
        return plan

    def __enter__(self):
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall()


class AdaptiveScheduler(MemoryScheduler):
    """The fastest per-layer plan under ``memory_budget``, corrected by ``profile`` (a ``MemoryProfile``) and
    by each forward's measurement.

    recompute_strategy: ``selective`` (default) recomputes only as many layers as the budget needs; ``full``
    recomputes every layer; ``none`` stores every layer (and warns when that does not fit).
    """

    RECOMPUTE_STRATEGIES = ("selective", "full", "none")

    def __init__(self, model, memory_budget: int | None = None, profile=None, recompute_strategy: str = "selective",
                 recompute_granularity: str = "block", *, optimizer: str = "adamw", measure: bool = True):
        if recompute_strategy not in self.RECOMPUTE_STRATEGIES:
            raise ValueError(f"recompute_strategy={recompute_strategy!r} is not one of "
                             f"{list(self.RECOMPUTE_STRATEGIES)}")
        strategy = "aggressive" if recompute_strategy == "full" else "adaptive"
        super().__init__(model, strategy, recompute_granularity, memory_budget=memory_budget, optimizer=optimizer,
                         measure=measure, profile=profile)
        self.recompute_strategy = recompute_strategy

    def _make_plan(self, priced: CalibratedCost) -> Plan:
        if self.recompute_strategy != "none":
            return super()._make_plan(priced)
        L = len(self.model.layers)
        policies = ["store"] * L
        budget = self.budget()
        peak, time = priced.peak_bytes(policies), priced.step_time(policies)
        plan = Plan(tuple(policies), peak, time, 1.0, budget, peak <= budget, "none", self.granularity)
        if not plan.fits:
            warnings.warn(f"recompute_strategy='none' stores every layer: predicted {peak / 2**30:.2f} GiB exceeds "
                          f"the budget {budget / 2**30:.2f} GiB", stacklevel=3)
        return plan


class LayerScheduler:
    """Explicit per-layer policies, with ``adaptive`` layers planned under a budget at each forward.

    ``set_policy(layers=range(0, 6), policy="store")``; policies: ``store``, ``recompute`` (rebuild the
    layer's activations: ``reverse`` where the layer is invertible, else ``checkpoint``), ``reverse``,
    ``checkpoint``, ``recompute_attention``, ``recompute_ffn``, and ``adaptive`` (the planner picks, fastest
    under ``memory_budget``, default the device's free memory). Attach with ``model.set_scheduler(...)``.
    """

    POLICIES = policy_table.NAMES + policy_table.DIRECTIVES

    def __init__(self, memory_budget: int | None = None, recompute_granularity: str = "block",
                 optimizer: str = "adamw"):
        if recompute_granularity not in GRANULARITIES:
            raise ValueError(f"recompute_granularity={recompute_granularity!r} is not one of {list(GRANULARITIES)}")
        self.memory_budget = memory_budget
        self.recompute_granularity = recompute_granularity
        self.optimizer = optimizer
        self.assigned: dict[int, str] = {}

    def set_policy(self, layers: Iterable[int] | int, policy: str) -> "LayerScheduler":
        """Assign ``policy`` to ``layers`` (an index or an iterable of indices); later calls override."""
        if policy not in self.POLICIES:
            raise ValueError(f"policy={policy!r} is not one of {list(self.POLICIES)}")
        idx = [layers] if isinstance(layers, int) else list(layers)
        for i in idx:
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"layer index {i!r} must be a non-negative integer")
            self.assigned[i] = policy
        return self

    def resolve(self, model, defaults: Sequence[str], priced: CostModel | CalibratedCost,
                budget: int | None) -> Plan:
        """The plan for ``model``: explicit policies as assigned, ``adaptive`` layers planned."""
        L = len(model.layers)
        bad = [i for i in self.assigned if i >= L]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for a model with {L} layers")
        inv = invertible_layers(model)
        fixed: dict[int, str] = {}
        adaptive = []
        for i in range(L):
            p = self.assigned.get(i, defaults[i])
            if p == "recompute":
                p = "reverse" if inv[i] else "checkpoint"
            if p in policy_table.REVERSING and not inv[i]:
                raise ValueError(f"layer {i} cannot be reversed (its coupling has no inverse); use 'recompute' "
                                 f"or 'checkpoint'")
            if p == "adaptive":
                adaptive.append(i)
            else:
                fixed[i] = p
        if adaptive and budget is None:
            raise ValueError("'adaptive' layers need a memory budget: LayerScheduler(memory_budget=...) or a device "
                             "that reports its memory")
        return plan_layers(priced, L, budget if adaptive else None, strategy="adaptive" if adaptive else "aggressive",
                           granularity=self.recompute_granularity, invertible=inv, fixed=fixed,
                           keepable=keepable_layers(model))


class _Attached(_Scheduler):
    """A LayerScheduler attached to a model: it resolves the plan at every forward."""

    def __init__(self, model, layer_scheduler: LayerScheduler, defaults: Sequence[str]):
        super().__init__(model, memory_budget=layer_scheduler.memory_budget, optimizer=layer_scheduler.optimizer,
                         recompute_granularity=layer_scheduler.recompute_granularity)
        self.layer_scheduler = layer_scheduler
        self.defaults = list(defaults)

    def _make_plan(self, priced: CalibratedCost) -> Plan:
        needs_budget = "adaptive" in self.layer_scheduler.assigned.values()
        budget = self.budget() if needs_budget else None
        plan = self.layer_scheduler.resolve(self.model, self.defaults, priced, budget)
        if needs_budget and not plan.fits:
            warnings.warn(f"no plan fits: {plan.summary()}", stacklevel=3)
        return plan


def attach(model, scheduler) -> None:
    """``model.set_scheduler``: route every forward's policies through ``scheduler`` (None detaches).

    Accepts a LayerScheduler, or a MemoryScheduler/AdaptiveScheduler (which then acts on every forward, not
    only inside ``with``)."""
    old = getattr(model, "scheduler", None)
    model.scheduler = None
    if old is not None:
        old._uninstall()
        model.policies = old.defaults
    if scheduler is None:
        return
    defaults = list(model.policies)
    if isinstance(scheduler, LayerScheduler):
        handle = _Attached(model, scheduler, defaults)
    elif isinstance(scheduler, _Scheduler):
        if scheduler.model is not model:
            raise ValueError("this scheduler was built for another model")
        handle = scheduler
        handle.defaults = defaults
    else:
        raise TypeError(f"set_scheduler expects a LayerScheduler or a MemoryScheduler, got {type(scheduler).__name__}")
    handle._install()
    model.scheduler = handle
