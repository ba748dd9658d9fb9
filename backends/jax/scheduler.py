"""``JAXMemoryScheduler``: how the layer stack of a ``ReversibleTransformerJAX`` trades memory for recompute,
in the user's README's names (``rematerialization_policy``), each one a policy of ``revnet_core.policies``;
or, with ``rematerialization_policy="auto"``, one policy per layer from the core's planner
(``revnet_core.planner.plan_layers``) under a memory budget, priced by ``XLACost``: XLA's own buffer plan and
FLOP count of the training step, read off small compiled probes (no device memory used, nothing run).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from revnet_core.errors import ConfigError
from revnet_core.planner import GRANULARITIES, STRATEGIES, Plan, plan_layers
from revnet_core.policies import REMATERIALIZATION

from .memory import compiled_memory, device_total_bytes, host_memory_available

HEADROOM = 0.05  # of the device's memory left free when no budget is given (as the torch scheduler's)
AUTO = "auto"
REPLANS = 3  # times the planner is asked again when XLA's exact plan of its choice passes the budget


class XLACost:
    """The planner's ``Priced`` for a JAX model's training step at one input shape, from XLA itself.

    For each policy of the menu, XLA compiles the gradient step (``value_and_grad`` of the loss) of the same
    model with fewer layers, nothing allocated or run: memory from the model's own loop (a scan by default) at
    depths 2 and 4, FLOPs from an unrolled loop at depths 1 and 2 (XLA's cost analysis counts a scan's body
    once). The differences are what one more layer of that policy adds; the rest is what does not grow with
    depth (embedding, loss head, one layer's backward working set). A plan is priced as

        peak  = arguments + outputs + optimizer state + max over its policies of the fixed part
                + sum over layers of the per-layer part
        time  = the same sum over FLOPs (a recompute adds its forward's FLOPs)

    Arguments and outputs are the full model's (parameters, ids; gradients, loss); ``optimizer_state`` is
    bytes per parameter byte (AdamW's two moments: 2.0). XLA's buffer plan is not exactly additive, so
    ``JAXMemoryScheduler`` compiles the chosen plan once more and records XLA's exact figure beside it.
    """

    def __init__(self, model, input_shape: tuple[int, int], policies: Sequence[str] = GRANULARITIES["layer"],
                 optimizer_state: float = 2.0, use_scan: bool = True):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.per_layer: dict[str, tuple[int, float]] = {}
        self.fixed: dict[str, tuple[int, float]] = {}
        for policy in policies:
            t2, t4 = (self._probe(n, policy, use_scan)[0] for n in (2, 4))
            f1, f2 = (self._probe(n, policy, False)[1] for n in (1, 2))
            self.per_layer[policy] = ((t4 - t2) // 2, f2 - f1)
            self.fixed[policy] = (t2 - (t4 - t2), f1 - (f2 - f1))
        params = jax.eval_shape(model.init, jax.random.key(0))
        param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
        ids = jax.ShapeDtypeStruct(self.input_shape, jnp.int32)
        self.optimizer_bytes = int(param_bytes * optimizer_state)
        # arguments (params, ids) + outputs (gradients, the loss) + optimizer moments
        self.constant = int(param_bytes * 2 + ids.size * 4 + 8) + self.optimizer_bytes

    def _probe(self, depth: int, policy: str, use_scan: bool) -> tuple[int, float]:
        """(temp bytes, FLOPs) of the gradient step at ``depth`` layers, all ``policy``."""
        probe = type(self.model)(self.model.config.replace(num_layers=depth), use_scan=use_scan,
                                 compute_dtype=self.model.compute_dtype, param_dtype=self.model.param_dtype)
        probe = probe.replace(policies=policy, remat_policy=self.model.remat_policy)
        params = jax.eval_shape(probe.init, jax.random.key(0))
        ids = jax.ShapeDtypeStruct(self.input_shape, jnp.int32)
        compiled = jax.jit(jax.value_and_grad(probe.loss)).lower(params, ids).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return int(compiled.memory_analysis().temp_size_in_bytes), float(cost.get("flops", 0.0))

    def _check(self, policies: Sequence[str]) -> None:
        unknown = sorted(set(policies) - set(self.per_layer))
        if unknown:
            raise ConfigError(f"XLACost was probed for {sorted(self.per_layer)}, not {unknown}")

    def peak_bytes(self, policies: Sequence[str]) -> int:
        self._check(policies)
        return (self.constant + max(self.fixed[p][0] for p in policies)
                + sum(self.per_layer[p][0] for p in policies))

    def step_time(self, policies: Sequence[str]) -> float:
        self._check(policies)
        return max(self.fixed[p][1] for p in policies) + sum(self.per_layer[p][1] for p in policies)


_COSTS: dict[tuple, XLACost] = {}


def xla_cost(model, input_shape: tuple[int, int], policies: Sequence[str] = GRANULARITIES["layer"],
             use_scan: bool = True) -> XLACost:
    """``XLACost`` of this model's architecture and dtypes, made once per process (its probes compile)."""
    import json

    key = (json.dumps(model.config.to_dict(), sort_keys=True, default=str), model.compute_dtype,
           model.param_dtype, model.remat_policy, tuple(input_shape), tuple(policies), use_scan)
    if key not in _COSTS:
        _COSTS[key] = XLACost(model, input_shape, policies, use_scan=use_scan)
    return _COSTS[key]


def step_memory(model, input_shape: tuple[int, int]) -> dict[str, int]:
    """XLA's plan of ``model``'s gradient step at ``input_shape`` (``compiled_memory``), nothing allocated."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    return compiled_memory(jax.value_and_grad(model.loss), params, jax.ShapeDtypeStruct(tuple(input_shape),
                                                                                       jnp.int32))


class ScheduledModel:
    """A model with a memory schedule applied. ``scheduled(params, inputs)`` -> logits (B, T, V);
    ``scheduled.loss(params, inputs, labels=None)`` -> scalar; both pure, for ``jax.jit`` / ``jax.grad``.
    ``plan``: the planner's ``Plan`` when the schedule came from it (None otherwise); ``compiled_peak``: XLA's
    exact bytes for that plan's step (temporaries, arguments, outputs, optimizer state as priced)."""

    def __init__(self, model, description: str, plan: Plan | None = None, compiled_peak: int | None = None):
        self.model = model
        self.description = description
        self.plan = plan
        self.compiled_peak = compiled_peak

    def __call__(self, params, inputs, *, key=None):
        return self.model.apply(params, inputs, key=key)

    def loss(self, params, inputs, labels=None, *, key=None):
        return self.model.loss(params, inputs, labels, key=key)

    def __repr__(self) -> str:
        return f"ScheduledModel({self.description})"


class JAXMemoryScheduler:
    """How the layer stack of a ``ReversibleTransformerJAX`` keeps what its backward needs.

    ``rematerialization_policy``:

    * ``"reverse"``: the reversible backward; keeps no activation per layer (the default);
    * ``"full"``: ``jax.checkpoint`` per layer; keeps each layer's two input streams;
    * ``"selective"``: ``jax.checkpoint`` saving the outputs of the weight matmuls
      (``dots_with_no_batch_dims_saveable``) and recomputing the rest (attention, norms, activations);
    * ``"none"``: plain autodiff; keeps everything;
    * ``"auto"``: one policy per layer, the core planner's fastest plan under ``memory_budget`` bytes
      (``strategy`` and ``recompute_granularity`` as the torch ``MemoryScheduler``'s; the JAX backend takes the
      "layer" menu, store or reverse), priced by ``XLACost`` at ``schedule(model, input_shape=(B, T))``.
      Without a budget: the device's memory less 5% (a CPU states none: give one).

    ``offload_to_cpu`` moves what ``full`` / ``selective`` keep to pinned host memory (layer inputs, resp.
    the saved matmul outputs) where the platform has one; elsewhere it warns and keeps them on device.
    With ``reverse``, ``none`` or ``auto`` there is nothing to offload and it warns. ``scan_layers`` runs the
    stack with ``lax.scan`` (compile time flat in depth) instead of a Python loop.
    """

    def __init__(self, scan_layers: bool = True, rematerialization_policy: str = "reverse",
                 offload_to_cpu: bool = False, *, memory_budget: int | None = None, strategy: str = "adaptive",
                 recompute_granularity: str = "layer"):
        if rematerialization_policy not in (*REMATERIALIZATION, AUTO):
            raise ValueError(f"rematerialization_policy={rematerialization_policy!r} is not one of "
                             f"{[*REMATERIALIZATION, AUTO]}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
        if recompute_granularity not in GRANULARITIES:
            raise ValueError(f"recompute_granularity={recompute_granularity!r} is not one of {list(GRANULARITIES)}")
        if recompute_granularity != "layer":
            raise ConfigError(f"recompute_granularity={recompute_granularity!r}: the JAX backend builds whole-layer "
                              "policies only (store, checkpoint, reverse); use 'layer'")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                          or memory_budget <= 0):
            raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
        if memory_budget is not None and rematerialization_policy != AUTO:
            raise ConfigError(f"memory_budget is the planner's: it needs rematerialization_policy='auto', "
                              f"not {rematerialization_policy!r}")
        self.scan_layers = bool(scan_layers)
        self.rematerialization_policy = rematerialization_policy
        self.offload_to_cpu = bool(offload_to_cpu)
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self.strategy = strategy
        self.recompute_granularity = recompute_granularity

    def budget(self, model) -> int | None:
        """The planner's budget: ``memory_budget``, else the device's total less ``HEADROOM`` (None for the
        aggressive strategy, and for balanced, which needs none)."""
        if self.strategy == "aggressive" or (self.strategy == "balanced" and self.memory_budget is None):
            return None
        if self.memory_budget is not None:
            return self.memory_budget
        total = device_total_bytes(model)
        if total is None:
            raise ConfigError(f"{jax.devices()[0].platform} states no memory size: give JAXMemoryScheduler a "
                              "memory_budget (bytes)")
        return int(total * (1 - HEADROOM))

    def plan(self, model, input_shape: tuple[int, int]) -> tuple[Plan, int]:
        """(the planner's plan for ``model`` at ``input_shape`` (batch, seq), XLA's exact peak for it).

        The chosen plan is compiled and XLA's figure checked against the budget; where the sum the planner
        priced came out below it (a plan XLA packs worse than the probes), the budget is lowered by the
        overshoot and the planner asked again, at most ``REPLANS`` times."""
        budget = target = self.budget(model)
        cost = xla_cost(model, input_shape, GRANULARITIES[self.recompute_granularity], use_scan=self.scan_layers)
        for _ in range(REPLANS + 1):
            plan = plan_layers(cost, model.config.num_layers, target, strategy=self.strategy,
                               granularity=self.recompute_granularity)
            mem = step_memory(model.replace(policies=plan.policies, use_scan=self.scan_layers), input_shape)
            exact = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"] + cost.optimizer_bytes
            if budget is None or exact <= budget or all(p == plan.policies[0] for p in plan.policies):
                break  # fits, or nothing left to give up (a uniform plan is priced exactly)
            target -= exact - budget
        return plan, exact

    def schedule(self, model, input_shape: tuple[int, int] | None = None) -> ScheduledModel:
        """``model`` (a ReversibleTransformerJAX) with this schedule; the original model is unchanged.
        ``input_shape`` (batch, seq) is what ``"auto"`` plans for."""
        remat = self.rematerialization_policy
        offload = self.offload_to_cpu
        if offload and remat in ("reverse", "none", AUTO):
            warnings.warn(f"offload_to_cpu has no effect with rematerialization_policy={remat!r}: "
                          + ("plain autodiff keeps everything on device" if remat == "none"
                             else "the reversible backward keeps no activations"), stacklevel=2)
            offload = False
        if offload and not host_memory_available():
            warnings.warn(f"offload_to_cpu=True but {jax.devices()[0].platform} has no pinned host memory "
                          "space; activations stay on device", stacklevel=2)
            offload = False
        if remat == AUTO:
            if input_shape is None:
                raise ConfigError("rematerialization_policy='auto' plans for one input shape: "
                                  "schedule(model, input_shape=(batch, seq))")
            plan, exact = self.plan(model, input_shape)
            description = f"scan_layers={self.scan_layers}, {plan.summary()}"
            return ScheduledModel(model.replace(policies=plan.policies, use_scan=self.scan_layers), description,
                                  plan, exact)
        options: dict[str, Any] = {"use_scan": self.scan_layers, "policies": REMATERIALIZATION[remat]}
        if options["policies"] == "checkpoint":
            cp = jax.checkpoint_policies
            if remat == "selective":
                options["remat_policy"] = (cp.offload_dot_with_no_batch_dims("device", "pinned_host") if offload
                                           else cp.dots_with_no_batch_dims_saveable)
            else:
                options["offload"] = offload
        description = (f"scan_layers={self.scan_layers}, rematerialization_policy={remat!r}, "
                       f"offload_to_cpu={offload}")
        return ScheduledModel(model.replace(**options), description)

    def __repr__(self) -> str:
        extra = (f", memory_budget={self.memory_budget}, strategy={self.strategy!r}"
                 if self.rematerialization_policy == AUTO else "")
        return (f"JAXMemoryScheduler(scan_layers={self.scan_layers}, "
                f"rematerialization_policy={self.rematerialization_policy!r}, "
                f"offload_to_cpu={self.offload_to_cpu}{extra})")
