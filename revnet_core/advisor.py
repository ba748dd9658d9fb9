"""What fits on my GPU, and what to change: recommendations and configurations from the cost model.

``OptimizationAdvisor(model_or_config, target_seq_length=...).analyze()`` prices the model at the target
length and returns recommendations (policies, loss-head chunk, precision, attention kernel, batch), each with
the bytes or compute it is predicted to save; ``apply_recommendations(model)`` applies those that can be
applied to a built model (policies through ``model.set_policy``; the loss-head chunk and the length limit in
its config). ``OptimalConfigs.get_config(model_size=..., context_length=..., hardware=...)`` returns a layer
plan, chunk sizes and a batch that fit a named GPU.

The prices come from the backend's own cost model, found through its record (``backend=``, default: the
backend that built the model, else torch); the advisor itself imports no framework. A model is used only
through ``.config``, ``.policies``, ``.set_policy`` and its backend's ``memory.device_total_bytes``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from . import policies as policy_table
from .config import ModelConfig
from .memory import Workload, format_bytes
from .planner import Plan, plan_layers
from .presets import MODEL_SIZES
from .registry import backend_of, backend_record

DEFAULT_BACKEND = "torch"  # whose cost model prices a bare ModelConfig

MiB, GiB = 2**20, 2**30

# Total memory as nvidia-smi reports it (MiB), per GPU model.
GPUS_MIB = {
    "A100_40GB": 40960,
    "A100_80GB": 81920,
    "H100": 81559,  # H100 SXM5 80 GB
    "H100_PCIE": 81559,
    "H200": 143771,
    "L4": 23034,
    "RTX_4090": 24564,
    "RTX_3090": 24576,
    "A10G": 23028,
    "V100_32GB": 32768,
    "T4": 15360,
}
CUDA_CONTEXT = 512 * MiB  # CUDA context, cuBLAS/cuDNN workspaces: allocated outside the caching allocator's count
ALLOCATOR_HEADROOM = 0.05  # reserved exceeds allocated (cached, fragmented blocks): keep 5% of the device free


def usable_bytes(total_bytes: int) -> int:
    """Bytes a training step may allocate on a device of ``total_bytes``."""
    return int((total_bytes - CUDA_CONTEXT) * (1 - ALLOCATOR_HEADROOM))


def gpu_budget(hardware: str) -> int:
    """Usable bytes of a named GPU (``GPUS_MIB``)."""
    key = hardware.upper().replace("-", "_").replace(" ", "_")
    if key not in GPUS_MIB:
        raise ValueError(f"hardware={hardware!r} is not one of {sorted(GPUS_MIB)}")
    return usable_bytes(GPUS_MIB[key] * MiB)


# Tokens per optimizer step: pre-training follows GPT-3's batch sizes for each size (Table 2.1); fine-tuning
# uses LLaMA 2's supervised fine-tuning batch, 64 sequences of 4096 tokens (Touvron et al. 2023).
PRETRAIN_TOKENS = {"125M": 0.5e6, "350M": 0.5e6, "760M": 0.5e6, "1B": 1e6, "1.3B": 1e6, "2.7B": 1e6, "6.7B": 2e6,
                   "7B": 2e6, "13B": 2e6}
FINETUNE_TOKENS = 64 * 4096
REGIMES = ("pre-training", "fine-tuning")

@dataclass
class Recommendation:
    """One suggestion: ``category``, ``suggestion`` (what to do), ``expected_gain`` (what it buys, from the
    cost model), and ``action`` (what ``apply_recommendations`` changes; None when the user must)."""

    category: str
    suggestion: str
    expected_gain: str
    action: dict[str, Any] | None = None
    bytes_saved: int = 0
    compute_change: float = 0.0  # relative step compute, + is slower

    def __str__(self) -> str:
        return f"{self.category}: {self.suggestion} ({self.expected_gain})"


def _config_of(model_or_config) -> ModelConfig:
    if isinstance(model_or_config, ModelConfig):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if isinstance(cfg, ModelConfig):
        return cfg
    raise TypeError(f"expected a ModelConfig or a model with a .config ModelConfig, got {type(model_or_config).__name__}")


def cost_class(backend: str | None, model=None):
    """The cost model class of ``backend`` (else of the backend that built ``model``, else torch's)."""
    if backend is None:
        record = backend_of(model) if model is not None else None
        backend = record.name if record is not None and record.cost else DEFAULT_BACKEND
    return backend_record(backend).load("cost")


def _device_budget(model) -> int | None:
    """The memory of the model's device, asked of the backend that built it; else the host's RAM."""
    record = backend_of(model)
    total = record.load("memory").device_total_bytes(model) if record is not None and record.memory else None
    if total is not None:
        return usable_bytes(total)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * (1 - ALLOCATOR_HEADROOM))
    except (ValueError, OSError, AttributeError):
        return None


class OptimizationAdvisor:
    """Recommendations for training ``model_or_config`` at ``target_seq_length`` tokens within a budget.

    The budget is ``memory_budget`` (bytes), else the named ``hardware`` (see ``GPUS_MIB``), else the memory of
    the model's device. ``autocast_dtype`` and ``optimizer`` describe the training step being planned.
    """

    def __init__(self, model_or_config, target_seq_length: int, *, batch_size: int = 1, hardware: str | None = None,
                 memory_budget: int | None = None, autocast_dtype: str | None = "bfloat16", optimizer: str = "adamw",
                 device: str = "cuda", backend: str | None = None):
        self.model = None if isinstance(model_or_config, ModelConfig) else model_or_config
        self.cost_model = cost_class(backend, self.model)
        self.config = _config_of(model_or_config)
        if not isinstance(target_seq_length, int) or target_seq_length < 2:
            raise ValueError(f"target_seq_length={target_seq_length!r} must be an integer >= 2")
        self.target = target_seq_length
        self.batch = batch_size
        if memory_budget is not None:
            self.budget = int(memory_budget)
        elif hardware is not None:
            self.budget = gpu_budget(hardware)
        else:
            self.budget = _device_budget(self.model) if self.model is not None else None
            if self.budget is None:
                raise ValueError("give memory_budget= (bytes) or hardware= (e.g. 'A100_80GB') to advise a config")
        self.workload = Workload(batch=batch_size, seq_len=target_seq_length, autocast_dtype=autocast_dtype,
                                 optimizer=optimizer, device=device)
        self.recommendations: list[Recommendation] = []

    def _cm(self, config: ModelConfig | None = None, **changes):
        from dataclasses import replace

        return self.cost_model(config or self.config.replace(max_seq_len=max(self.config.max_seq_len, self.target)),
                         replace(self.workload, **changes))

    def analyze(self) -> list[Recommendation]:
        """Price the target run and return what to change, most important first."""
        cfg = self.config.replace(max_seq_len=max(self.config.max_seq_len, self.target))
        cm = self._cm(cfg)
        L = cfg.num_layers
        recs: list[Recommendation] = []
        if self.target > self.config.max_seq_len:
            recs.append(Recommendation(
                "sequence_length", f"raise max_seq_len from {self.config.max_seq_len} to {self.target} (rotary "
                "positions have no length-bound parameters)", "the target length is accepted at all",
                {"config": {"max_seq_len": self.target}}))
        current = list(getattr(self.model, "policies", None) or [cfg.policy] * L)
        current = [p if p in policy_table.BY_NAME else "store" for p in current]
        cur_peak, cur_rel = cm.peak_bytes(current), cm.relative_step_time(current)
        plan = plan_layers(cm, L, self.budget, strategy="adaptive", granularity="layer")
        if not plan.fits:
            least = cm.peak_bytes(["reverse"] * L)
            recs.append(Recommendation(
                "capacity", f"{self.batch} x {self.target} tokens does not fit: the least-memory plan needs "
                f"{format_bytes(least)} of {format_bytes(self.budget)}; shorten the sequence, lower the batch or "
                "use a larger device", f"short by {format_bytes(least - self.budget)}", None))
        elif tuple(current) != plan.policies:
            saved = cur_peak - plan.peak_bytes
            recs.append(Recommendation(
                "memory_policy", f"use per-layer policies {policy_table.summary(plan.policies)}",
                f"step compute {cur_rel:.3f}x -> {plan.relative_time:.3f}x of storing every layer; predicted peak "
                f"{format_bytes(cur_peak)} -> {format_bytes(plan.peak_bytes)} of the {format_bytes(self.budget)} "
                "budget", {"policies": list(plan.policies)}, saved, plan.relative_time - cur_rel))
        if plan.fits:
            block = plan_layers(cm, L, self.budget, strategy="adaptive", granularity="block")
            if block.relative_time < plan.relative_time - 0.005:
                recs.append(Recommendation(
                    "granularity", "recompute single blocks of stored layers: "
                    "MemoryScheduler(model, strategy='adaptive', recompute_granularity='block')",
                    f"step compute {plan.relative_time:.3f}x -> {block.relative_time:.3f}x within the same budget",
                    None, plan.peak_bytes - block.peak_bytes, block.relative_time - plan.relative_time))
        base = plan.policies if plan.fits else tuple(["reverse"] * L)
        recs += self._loss_head(cfg, base)
        optimizer = self.optimizer_recommendation()
        if optimizer is not None:
            recs.append(optimizer)
        if self.workload.autocast_dtype is None:
            bf = self._cm(cfg, autocast_dtype="bfloat16")
            saved = cm.peak_bytes(list(base)) - bf.peak_bytes(list(base))
            effect = f"{format_bytes(saved)} less at the peak" if saved >= 0 else (
                f"{format_bytes(-saved)} MORE at the peak (this attention keeps an fp32 softmax and a bf16 copy)")
            recs.append(Recommendation(
                "precision", "run the forward under torch.autocast(dtype=torch.bfloat16) (the streams stay fp32)",
                f"{effect}, and bf16 tensor-core matmuls", None, saved))
        # The backend's kernel options are its own: its cost model names a better choice, if any.
        for category, suggestion, better in getattr(cm, "kernel_alternatives", lambda: [])():
            saved = cm.peak_bytes(list(base)) - self.cost_model(better, cm.workload).peak_bytes(list(base))
            recs.append(Recommendation(category, suggestion, f"{format_bytes(saved)} less at the peak", None,
                                       saved))  # None: a built model's kernels are chosen; the user rebuilds
        recs += self._batch(cfg)
        self.recommendations = recs
        return recs

    def optimizer_recommendation(self) -> Recommendation | None:
        """A leaner optimizer option (the backend's ladder, e.g. ``revnet_torch.optim_cost.LADDER``) when plain
        AdamW, with every layer reversed, fills too much of the budget; None when AdamW has room (or the
        backend's cost model cannot price options)."""
        cfg = self.config.replace(max_seq_len=max(self.config.max_seq_len, self.target))
        cm = self._cm(cfg)
        if not hasattr(cm, "choose_optimizer"):
            return None
        name, peaks, how = cm.choose_optimizer(["reverse"] * cfg.num_layers, self.budget)
        if name == "adamw":
            return None
        return Recommendation(
            "optimizer", how, f"predicted peak {format_bytes(peaks['adamw'])} -> "
            f"{format_bytes(peaks[name])} of the {format_bytes(self.budget)} budget (every layer reversed)",
            {"optimizer": name}, peaks["adamw"] - peaks[name])

    def _loss_head(self, cfg: ModelConfig, plan: tuple[str, ...]) -> list[Recommendation]:
        """The largest loss-head chunk (fewer, larger matmuls) whose peak is within 1% of the smallest's."""
        peaks = {}
        for n in (256, 512, 1024, 2048, 4096, 8192):
            peaks[n] = self._cm(cfg.replace(loss_chunk_size=n)).peak_bytes(list(plan))
        floor = min(peaks.values())
        best = max(n for n, p in peaks.items() if p <= floor * 1.01)
        if best == cfg.loss_chunk_size:
            return []
        cur = self._cm(cfg).peak_bytes(list(plan))
        return [Recommendation(
            "loss_head", f"set loss_chunk_size={best} (now {cfg.loss_chunk_size})",
            f"peak {format_bytes(cur)} -> {format_bytes(peaks[best])}" + (
                "" if peaks[best] < cur else f"; {best // cfg.loss_chunk_size}x fewer head matmuls at no memory cost"),
            {"config": {"loss_chunk_size": best}}, cur - peaks[best])]

    def _batch(self, cfg: ModelConfig) -> list[Recommendation]:
        """The largest batch at which the least-memory plan still fits."""
        L = cfg.num_layers
        best = 0
        b = 1
        while b <= 1024:
            if self._cm(cfg, batch=b).peak_bytes(["reverse"] * L) > self.budget:
                break
            best = b
            b *= 2
        if best <= self.batch:
            return []
        return [Recommendation("batch", f"a batch of up to {best} sequences of {self.target} tokens fits "
                               "(every layer reversed)", f"{best // max(self.batch, 1)}x the tokens per step", None)]

    def apply_recommendations(self, model=None):
        """Apply what can be applied to a built model: policies (``set_policy``) and the loss-head chunk and
        length limit (its config); an ``optimizer`` action is the trainer's to take. Returns the model."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("apply_recommendations needs a model")
        recs = self.recommendations or self.analyze()
        for rec in recs:
            if not rec.action:
                continue
            if "policies" in rec.action:
                model.set_policy(rec.action["policies"])
            if "config" in rec.action and hasattr(model, "config"):
                model.config = model.config.replace(**rec.action["config"])
        return model


@dataclass
class OptimalConfig:
    """A configuration that fits: architecture, per-layer plan, chunk sizes, batch and accumulation."""

    model_size: str
    hardware: str
    context_length: int
    training_regime: str
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    vocab_size: int
    coupling_type: str
    recompute_granularity: str
    policies: list[str]
    loss_chunk_size: int
    ffn_chunk_size: int
    batch_size: int
    gradient_accumulation_steps: int
    predicted_peak_bytes: int
    budget_bytes: int
    relative_step_time: float
    fits: bool
    notes: list[str] = field(default_factory=list)
    optimizer: str = "adamw"  # an option of the backend's cost model (revnet_torch.optim_cost.OPTIMIZER_OPTIONS)
    @property
    def policy(self) -> str:
        return policy_table.summary(self.policies)

    def model_config(self) -> ModelConfig:
        return ModelConfig(num_layers=self.num_layers, d_model=self.d_model, num_heads=self.num_heads,
                           d_ff=self.d_ff, vocab_size=self.vocab_size, max_seq_len=self.context_length,
                           coupling=self.coupling_type, loss_chunk_size=self.loss_chunk_size,
                           ffn_chunk_size=self.ffn_chunk_size)

    def summary(self) -> str:
        fit = "fits" if self.fits else "does NOT fit"
        return (f"{self.model_size} ({self.num_layers} layers, d {self.d_model}, {self.num_heads} heads) at "
                f"{self.context_length} tokens on {self.hardware}: {fit}; batch {self.batch_size} x "
                f"{self.gradient_accumulation_steps} accumulation steps; {self.policy} "
                f"({self.recompute_granularity} granularity, {self.coupling_type} coupling); loss chunk "
                f"{self.loss_chunk_size}, FFN chunk {self.ffn_chunk_size}; predicted peak "
                f"{format_bytes(self.predicted_peak_bytes)} of {format_bytes(self.budget_bytes)}; step compute "
                f"{self.relative_step_time:.3f}x of storing every layer; optimizer {self.optimizer}")


class OptimalConfigs:
    """``OptimalConfigs.get_config(model_size='7B', context_length=131072, hardware='A100_40GB')``."""

    @staticmethod
    def get_config(model_size: str, context_length: int, hardware: str, training_regime: str = "pre-training",
                   *, autocast_dtype: str = "bfloat16", vocab_size: int = 50257,
                   max_batch: int = 64, backend: str = DEFAULT_BACKEND, optimizer: str = "auto") -> OptimalConfig:
        """The fastest configuration (per token) that fits ``hardware`` at ``context_length``, from the cost model.

        Tried: the additive coupling (and affine if additive does not fit); layer and block granularity; batches
        1, 2, 4, ... while the compute per token does not grow; then loss-head chunks 1024..8192 and FFN chunks
        4096..32768. Kept: the lowest predicted compute per token, ties (within 1%) to the larger batch and
        chunks. Gradient accumulation reaches the regime's tokens per optimizer step.
        ``optimizer``: "auto" asks the cost model's ``choose_optimizer`` at batch 1 with every layer reversed (with
        accumulation only the state's options: every gradient exists on the earlier micro-batches); or name an
        option (torch: ``revnet_torch.optim_cost.OPTIMIZER_OPTIONS``). Every peak below is priced with it.
        """
        if model_size not in MODEL_SIZES:
            raise ValueError(f"model_size={model_size!r} is not one of {list(MODEL_SIZES)}")
        if training_regime not in REGIMES:
            raise ValueError(f"training_regime={training_regime!r} is not one of {list(REGIMES)}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length={context_length!r} must be an integer >= 2")
        budget = gpu_budget(hardware)
        Plain = cost_class(backend)
        layers, d, heads = MODEL_SIZES[model_size]
        base = ModelConfig(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d, vocab_size=vocab_size,
                           max_seq_len=context_length)
        notes: list[str] = []
        target = PRETRAIN_TOKENS[model_size] if training_regime == "pre-training" else FINETUNE_TOKENS
        first = Plain(base, Workload(batch=1, seq_len=context_length, autocast_dtype=autocast_dtype))
        how = ""
        if optimizer == "auto" and hasattr(first, "choose_optimizer"):
            optimizer, _, how = first.choose_optimizer(["reverse"] * layers, budget, target > context_length)
        elif optimizer == "auto":
            optimizer = "adamw"
        elif not hasattr(first, "with_optimizer"):
            raise ValueError(f"optimizer={optimizer!r}: the {backend} cost model prices only 'auto' (AdamW)")
        chosen = optimizer

        def CostModel(config, workload):  # the backend's cost model, its peaks priced with the chosen option
            cm = Plain(config, workload)
            return cm.with_optimizer(chosen) if hasattr(cm, "with_optimizer") else cm

        best = None
        for coupling in ("additive", "affine"):  # affine only if additive (less memory, fewer FLOPs) fails
            if best is not None:
                break
            cfg = base.replace(coupling=coupling)
            b = 1
            while b <= max_batch:
                w = Workload(batch=b, seq_len=context_length, autocast_dtype=autocast_dtype)
                cm = CostModel(cfg, w)
                if cm.peak_bytes(["reverse"] * layers) > budget:
                    break
                improved = False
                # The block menu contains the attention menu, so its plan is never slower; the granularity
                # reported is the coarsest that expresses the plan.
                for gran in ("layer", "block"):
                    plan = plan_layers(cm, layers, budget, granularity=gran)
                    if not plan.fits:
                        continue
                    if gran == "block" and "recompute_ffn" not in plan.policies:
                        gran = "attention" if "recompute_attention" in plan.policies else "layer"
                    per_token = plan.step_time / (b * context_length)
                    if best is None or per_token < best[0] * 0.99 or (per_token <= best[0] * 1.01 and b > best[2]):
                        best = (per_token, cfg, b, gran, plan)
                        improved = True
                if not improved:  # a larger batch only adds recompute per token from here on
                    break
                b *= 2
        if best is None:
            cm = CostModel(base, Workload(batch=1, seq_len=context_length, autocast_dtype=autocast_dtype))
            least = cm.peak_bytes(["reverse"] * layers)
            notes.append(f"does not fit: even with every layer reversed the step needs {format_bytes(least)} of "
                         f"{format_bytes(budget)}")
            plan = Plan(tuple(["reverse"] * layers), least, cm.step_time(["reverse"] * layers),
                        cm.relative_step_time(["reverse"] * layers), budget, False, "aggressive", "layer")
            cfg, b, gran = base, 1, "layer"
        else:
            _, cfg, b, gran, plan = best
        cfg, loss_chunk, ffn_chunk, peak = OptimalConfigs._chunks(CostModel, cfg, b, context_length, autocast_dtype,
                                                                  plan, budget)
        accum = max(1, math.ceil(target / (b * context_length)))
        notes.append(f"{training_regime}: {int(target)} tokens per optimizer step -> {accum} accumulation steps")
        if chosen != "adamw":
            notes.append(f"optimizer: {how or chosen}")
        return OptimalConfig(model_size, hardware, context_length, training_regime, layers, d, heads, 4 * d,
                             vocab_size, cfg.coupling, gran, list(plan.policies), loss_chunk, ffn_chunk, b, accum,
                             peak, budget, plan.relative_time, peak <= budget, notes, chosen)

    @staticmethod
    def _chunks(CostModel, cfg, batch, T, autocast, plan, budget):
        """The largest loss-head and FFN chunks whose peak stays within 1% of the smallest's (and fits)."""
        w = Workload(batch=batch, seq_len=T, autocast_dtype=autocast)
        best_cfg, best_peak = cfg, CostModel(cfg, w).peak_bytes(list(plan.policies))
        for field_name, options in (("loss_chunk_size", (1024, 2048, 4096, 8192)),
                                    ("ffn_chunk_size", (4096, 8192, 16384, 32768))):
            peaks = {n: CostModel(best_cfg.replace(**{field_name: n}), w).peak_bytes(list(plan.policies))
                     for n in options}
            floor = min(peaks.values())
            n = max(k for k, p in peaks.items() if p <= floor * 1.01 and p <= budget) if any(
                p <= budget for p in peaks.values()) else getattr(best_cfg, field_name)
            best_cfg = best_cfg.replace(**{field_name: n})
            best_peak = peaks.get(n, best_peak)
        return best_cfg, best_cfg.loss_chunk_size, best_cfg.ffn_chunk_size, best_peak
