"""Validation tools for reversible models: gradient checks, numerical stability, common pitfalls.

``ReversibleGradientChecker`` compares, layer by layer, the gradients of the reversible backward (inputs
rebuilt from outputs) with plain autograd's (activations stored), in float64 on a copy of the model.
``StabilityAnalyzer`` measures gradient norms, stream statistics, how well each layer's inverse rebuilds
its input, and what that costs the whole stack: the layer-0 input as the reversible backward rebuilds it
through every layer, and the parameter gradients of ``reverse`` against ``store``. ``CommonPitfalls``
reads a model and a training config and names what will go wrong.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import engine
from .engine import run_layers
from .layers import PairCoupling, ReversibleLayer

_REVERSIBLE = (ReversibleLayer, PairCoupling)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def reversible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every outermost reversible layer of ``model``, in forward order."""
    if isinstance(model, _REVERSIBLE):
        return [("layer", model)]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, _REVERSIBLE) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    if not found:
        raise TypeError(f"{type(model).__name__} holds no reversible layers (ReversibleLayer or BaseCoupling)")
    return found


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _forked_rng(model: nn.Module):
    """Restores the CPU RNG, and the model's GPU's where it has one, when the block ends."""
    device = _first_param(model).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _input_streams(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom layer's two streams: from token ids through the embedding for (batch, seq), else random
    independent streams for (batch, seq, d_model)."""
    device = _first_param(model).device
    if len(input_shape) == 2:
        if not hasattr(model, "streams"):
            raise ValueError(f"input_shape={tuple(input_shape)} is (batch, seq) token ids, but "
                             f"{type(model).__name__} has no embedding; pass (batch, seq, d_model)")
        cfg = model.config
        if input_shape[1] > cfg.max_seq_len:
            raise ValueError(f"input_shape seq={input_shape[1]} exceeds the model's max_seq_len={cfg.max_seq_len}")
        ids = torch.randint(0, cfg.vocab_size, tuple(input_shape), generator=gen).to(device)
        with torch.no_grad():
            x1, x2 = model.streams(ids)
        return x1.to(dtype), x2.to(dtype)
    if len(input_shape) == 3:
        x1 = torch.randn(tuple(input_shape), generator=gen, dtype=dtype).to(device)
        x2 = torch.randn(tuple(input_shape), generator=gen, dtype=dtype).to(device)
        return x1, x2
    raise ValueError(f"input_shape={tuple(input_shape)} must be (batch, seq) or (batch, seq, d_model)")


def _max_rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    scale = max(want.abs().max().item(), 1.0)
    return (got - want).abs().max().item() / scale


class _Probe(PairCoupling):
    """Scales each stream by a parameter equal to 1, placed below the layer under test. In the reversible
    backward its gradients are computed from the inputs the layer above *rebuilt* (d scale = sum(dy * x)), so
    a layer whose inverse is off shows up here even when its own gradients do not depend on that stream."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.a = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        self.b = nn.Parameter(torch.ones((), dtype=dtype, device=device))

    def forward(self, x1, x2):
        return x1 * self.a, x2 * self.b

    def inverse(self, y1, y2):
        return y1 / self.a, y2 / self.b


class ReversibleGradientChecker:
    """Checks each reversible layer's backward against plain autograd.

    ``check_model(model, input_shape=(2, 128, 256), tolerance=1e-6)`` -> ``{layer_name: bool}``. Runs in
    float64 on a deep copy (the model, its gradients and the global RNG are left as they were), so any
    difference above rounding is a bug in a layer's inverse or its backward, not precision. Each layer runs
    on the input it really sees in the model, above a probe that exposes the inputs its backward rebuilds.
    ``last_errors`` keeps each layer's worst relative gradient error.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0):
        self.dtype = dtype
        self.seed = seed
        self.last_errors: dict[str, float] = {}

    def check_model(self, model: nn.Module, input_shape: Sequence[int], tolerance: float = 1e-6) -> dict[str, bool]:
        """Per reversible layer: do the reversible gradients (inputs and parameters) match stored-activation
        ones within ``tolerance`` (max |difference| relative to max(|reference|, 1))?"""
        work = copy.deepcopy(model).to(self.dtype)
        gen = torch.Generator().manual_seed(self.seed)
        results: dict[str, bool] = {}
        self.last_errors = {}
        with _forked_rng(work):
            x1, x2 = _input_streams(work, input_shape, self.dtype, gen)
            for name, layer in reversible_layers(work):
                err = self.layer_error(layer, x1, x2, gen)
                self.last_errors[name] = err
                results[name] = err <= tolerance
                with torch.no_grad():  # the next layer sees what this one really outputs
                    x1, x2 = layer(x1, x2)
        return results

    def layer_error(self, layer: nn.Module, x1: torch.Tensor, x2: torch.Tensor, gen: torch.Generator) -> float:
        """Worst relative error of the reversible gradients of one layer against plain autograd's."""
        c1 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype).to(x1.device)
        c2 = torch.randn(x2.shape, generator=gen, dtype=x2.dtype).to(x2.device)
        probe = _Probe(x1.dtype, x1.device)
        reverse = self._grads([probe, layer], "reverse", x1, x2, c1, c2)
        store = self._grads([probe, layer], "store", x1, x2, c1, c2)
        return max(_max_rel_err(a, b) for a, b in zip(reverse, store))

    def _grads(self, layers, policy, x1, x2, c1, c2) -> list[torch.Tensor | None]:
        params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        a, b = x1.detach().requires_grad_(True), x2.detach().requires_grad_(True)
        torch.manual_seed(self.seed)  # dropout draws the same masks under both policies
        y1, y2 = run_layers(layers, [policy] * len(layers), a, b)
        loss = (y1 * c1).sum() + (y2 * c2).sum()
        return list(torch.autograd.grad(loss, [a, b, *params], allow_unused=True))


@dataclass
class StabilityReport:
    """What ``StabilityAnalyzer.analyze`` measured.

    ``grad_norms``: total gradient norm of each pass; ``activation_stats``: per layer, the mean, std and max
    |value| of its two output streams over all passes; ``reconstruction_error``: per layer, the worst
    max |inverse(layer(x)) - x| relative to max(|x|, 1); ``nonfinite``: whether any loss, gradient or stream
    was inf or NaN. Whole stack, worst over the passes (None when not checked): ``stack_drift``, the
    layer-0 input rebuilt by the reversible backward through every layer, max |error| / max|x|;
    ``gradient_gap``, the relative L2 distance of all parameter gradients of ``reverse`` from ``store``'s.
    Per-layer errors do not add up to these: each error is amplified by the reconstruction below it.
    """

    num_forward_passes: int
    grad_norms: list[float] = field(default_factory=list)
    activation_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    reconstruction_error: dict[str, float] = field(default_factory=dict)
    nonfinite: bool = False
    stack_drift: float | None = None
    gradient_gap: float | None = None

    @property
    def max_grad_norm(self) -> float | None:
        return max(self.grad_norms) if self.grad_norms else None

    @property
    def max_reconstruction_error(self) -> float | None:
        return max(self.reconstruction_error.values()) if self.reconstruction_error else None

    def summary(self) -> str:
        lines = [f"{self.num_forward_passes} forward passes"]
        if self.grad_norms:
            lines.append(f"gradient norm: max {self.max_grad_norm:.4g}, "
                         f"mean {sum(self.grad_norms) / len(self.grad_norms):.4g}")
        for name, s in self.activation_stats.items():
            rec = self.reconstruction_error.get(name)
            extra = f", reconstruction error {rec:.3g}" if rec is not None else ""
            lines.append(f"{name}: mean {s['mean']:.4g}, std {s['std']:.4g}, max {s['max']:.4g}{extra}")
        if self.stack_drift is not None:
            lines.append(f"whole stack: layer-0 input rebuilt with drift {self.stack_drift:.3g} of max|x|, "
                         f"reverse vs store gradient gap {self.gradient_gap:.3g} (relative L2)")
        if self.nonfinite:
            lines.append("NON-FINITE values seen")
        return "\n".join(lines)


class _Moments:
    """Running count, sum, sum of squares and max |x| of everything added."""

    def __init__(self):
        self.n, self.s, self.ss, self.m = 0, 0.0, 0.0, 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        self.n += t.numel()
        self.s += t.sum().item()
        self.ss += (t * t).sum().item()
        self.m = max(self.m, t.abs().max().item())

    def stats(self) -> dict[str, float]:
        mean = self.s / self.n
        return {"mean": mean, "std": math.sqrt(max(self.ss / self.n - mean * mean, 0.0)), "max": self.m}


class StabilityAnalyzer:
    """Numerical health of a reversible LM on random token sequences.

    ``StabilityAnalyzer(model, batch_size=2, seq_len=None)``: ``seq_len`` defaults to min(max_seq_len, 128).
    The model's gradients, training mode and the global RNG are restored after ``analyze``.
    """

    def __init__(self, model: nn.Module, batch_size: int = 2, seq_len: int | None = None, seed: int = 0):
        if not (hasattr(model, "streams") and hasattr(model, "config")):
            raise TypeError(f"StabilityAnalyzer needs a ReversibleTransformer (token ids in, .loss out), "
                            f"got {type(model).__name__}")
        self.model = model
        self.batch_size = batch_size
        self.seq_len = min(model.config.max_seq_len, 128) if seq_len is None else seq_len
        self.seed = seed

    def _ids(self, gen: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, self.model.config.vocab_size, (self.batch_size, self.seq_len), generator=gen)
        return ids.to(_first_param(self.model).device)

    def analyze(self, num_forward_passes: int = 10, check_gradient_norm: bool = True,
                check_activation_stats: bool = True, check_stack: bool = True) -> StabilityReport:
        """Run ``num_forward_passes`` random batches: gradient norms (forward + backward), stream statistics
        and per-layer reconstruction error (a no-grad walk of the layers in eval mode with each layer's
        inverse); ``check_stack``: the whole-stack drift and gradient gap (two more forward + backward per
        pass, in eval mode, under the caller's autocast, the model's exact-streams setting as it trains)."""
        if num_forward_passes < 1:
            raise ValueError(f"{num_forward_passes=} must be >= 1")
        report = StabilityReport(num_forward_passes)
        moments = {name: _Moments() for name, _ in reversible_layers(self.model)}
        gen = torch.Generator().manual_seed(self.seed)
        with _forked_rng(self.model), _KeptGrads(self.model) as kept:
            for _ in range(num_forward_passes):
                ids = self._ids(gen)
                if check_gradient_norm:
                    self.model.train(kept.training)
                    report.grad_norms.append(self._grad_norm(ids, report))
                if check_activation_stats:
                    self._walk(ids, moments, report)
                if check_stack:
                    drift, gap = self._stack(ids)
                    report.stack_drift = max(report.stack_drift or 0.0, drift)
                    report.gradient_gap = max(report.gradient_gap or 0.0, gap)
        if check_activation_stats:
            report.activation_stats = {name: m.stats() for name, m in moments.items()}
        return report

    def _grad_norm(self, ids: torch.Tensor, report: StabilityReport) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = self.model(ids).loss
        loss.backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in self.model.parameters() if p.grad is not None)
        if not (math.isfinite(loss.item()) and math.isfinite(sq)):
            report.nonfinite = True
        return math.sqrt(sq)

    def _stack(self, ids: torch.Tensor) -> tuple[float, float]:
        """(drift of the rebuilt layer-0 input, reverse vs store gradient gap) on one batch, in eval mode
        (dropout would draw differently under the two policies; this measures rounding only)."""
        model = self.model
        kept = list(model.policies)
        recorder = _DriftRecorder()
        model.eval()
        try:
            store = self._policy_grads(ids, "store", recorder)
            reverse = self._policy_grads(ids, "reverse", recorder)  # the engine keeps the truth, compares
        finally:
            model.policies = kept
            model.zero_grad(set_to_none=True)
        gap = float((reverse - store).norm() / store.norm().clamp_min(1e-300))
        return max(recorder.drifts, default=0.0), gap

    def _policy_grads(self, ids: torch.Tensor, policy: str, recorder: "_DriftRecorder") -> torch.Tensor:
        """Every parameter's gradient under ``policy`` for every layer, flattened into one float64 vector."""
        self.model.set_policy(policy)
        self.model.zero_grad(set_to_none=True)
        with engine.watching(recorder):
            loss = self.model(ids).loss
        loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                          for p in self.model.parameters() if p.requires_grad])

    @torch.no_grad()
    def _walk(self, ids: torch.Tensor, moments: dict[str, _Moments], report: StabilityReport) -> None:
        # eval: the inverse must see the forward's function; dropout would draw new masks (the engine
        # replays them, this walk measures only rounding). _KeptGrads restores the mode.
        self.model.eval()
        x1, x2 = self.model.streams(ids)
        for name, layer in reversible_layers(self.model):
            y1, y2 = layer(x1, x2)
            moments[name].add(y1)
            moments[name].add(y2)
            r1, r2 = layer.inverse(y1.clone(), y2.clone())
            err = max(_max_rel_err(r1, x1), _max_rel_err(r2, x2))
            report.reconstruction_error[name] = max(report.reconstruction_error.get(name, 0.0), err)
            if not (torch.isfinite(y1).all() and torch.isfinite(y2).all()):
                report.nonfinite = True
            x1, x2 = y1, y2


class _DriftRecorder:
    """Takes the engine's drift reports (the drift monitor's interface) without acting on them."""

    def __init__(self):
        self.drifts: list[float] = []

    def record(self, layers: range, drift: float) -> None:
        self.drifts.append(drift)


class _KeptGrads:
    """Puts back the model's ``.grad`` tensors and training mode after the block."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        self.training = self.model.training
        for p, _ in self.grads:
            p.grad = None
        return self

    def __exit__(self, *exc):
        for p, g in self.grads:
            p.grad = g
        self.model.train(self.training)


@dataclass(frozen=True)
class Pitfall:
    """One problem ``CommonPitfalls.check`` found: a short ``name``, ``severity`` (error | warning), what is
    wrong (``description``) and what to do (``solution``)."""

    name: str
    severity: str
    description: str
    solution: str


def _setting(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` set in a dict or an object with attributes."""
    for n in names:
        value = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if value is not None:
            return value
    return default


def _has(cfg: Any, name: str) -> bool:
    return name in cfg if isinstance(cfg, dict) else hasattr(cfg, name)


class CommonPitfalls:
    """Checks a model and its training settings for the mistakes that break reversible training.

    ``training_config`` is a dict or any object with attributes; the keys read are ``seq_len`` (or
    ``max_length``, ``sequence_length``), ``batch_size``, ``lr`` (``learning_rate``), ``max_grad_norm``
    (``gradient_clip``; None or 0 means off), ``memory_budget`` (bytes), ``precision`` (fp32 | bf16 | fp16)
    or ``fp16=True``, and ``device``. Unset keys skip their check.
    """

    # GPT-style decoders train stably up to about this lr at 12 layers; deeper stacks need less, roughly
    # as 1/sqrt(depth) (the residual sum's variance grows with depth). A rule of thumb, hence a warning.
    LR_AT_12_LAYERS = 2e-3

    def check(self, model: nn.Module, training_config: Any = None) -> list[Pitfall]:
        """Every pitfall found, errors first."""
        cfg = {} if training_config is None else training_config
        found: list[Pitfall] = []
        for rule in (self._low_precision_streams, self._sequence_too_long, self._batch_norm, self._budget_floor,
                     self._no_clipping, self._lr_for_depth, self._all_stored):
            found.extend(rule(model, cfg))
        return sorted(found, key=lambda p: p.severity != "error")

    def _low_precision_streams(self, model, cfg) -> Iterator[Pitfall]:
        mc = getattr(model, "config", None)
        stream = getattr(mc, "stream_dtype", None)
        params = {p.dtype for p in model.parameters()}
        if stream == "float16" or torch.float16 in params:
            yield Pitfall(
                "fp16_streams", "error",
                "the residual streams are float16: each layer's inverse subtracts what its forward added, and "
                "fp16's 11-bit mantissa (and 65504 range) makes the rebuilt activations drift from the real "
                "ones with depth, so gradients go wrong silently",
                "keep streams and parameters in float32 (stream_dtype='float32') and compute in bf16 under "
                "autocast (LongContextTrainer(precision='bf16'))")
        elif stream == "bfloat16" or torch.bfloat16 in params:
            yield Pitfall(
                "bf16_streams", "warning",
                "the residual streams are bfloat16 (8-bit mantissa): reconstruction error grows with depth",
                "keep stream_dtype='float32'; autocast still runs the matmuls in bf16")
        precision = str(_setting(cfg, "precision", default="")).lower()
        if _setting(cfg, "fp16", default=False) or precision in ("fp16", "float16", "16-mixed"):
            yield Pitfall(
                "fp16_autocast", "warning",
                "fp16 autocast: activations past 65504 overflow to inf, and a reversible backward rebuilds "
                "inputs from outputs, so one inf poisons every layer below",
                "use bf16 autocast (same speed on A100/H100, fp32's range) with float32 streams")

    def _sequence_too_long(self, model, cfg) -> Iterator[Pitfall]:
        seq = _setting(cfg, "seq_len", "max_length", "sequence_length", "context_length")
        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if seq is not None and limit is not None and seq > limit:
            yield Pitfall(
                "sequence_past_max_seq_len", "error",
                f"training sequences of {seq} tokens exceed the model's max_seq_len={limit}: every such batch "
                "raises InputError",
                f"build the model with max_seq_len>={seq} (rotary positions need no retraining to extend), or "
                f"train on max_length<={limit}")

    def _batch_norm(self, model, cfg) -> Iterator[Pitfall]:
        for name, layer in reversible_layers(model):
            for sub, m in layer.named_modules():
                if isinstance(m, _BATCH_NORMS):
                    yield Pitfall(
                        "batch_norm_in_reversible_block", "error",
                        f"{name}.{sub} is a {type(m).__name__} inside a reversible block: in training it "
                        "normalises with statistics of the batch (tokens of other sequences leak in) and the "
                        "backward's recompute updates its running statistics a second time",
                        "use LayerNorm or RMSNorm (per token), or freeze it with .eval()")

    def _budget_floor(self, model, cfg) -> Iterator[Pitfall]:
        budget = _setting(cfg, "memory_budget")
        mc = getattr(model, "config", None)
        seq = _setting(cfg, "seq_len", "max_length", "sequence_length", "context_length")
        if budget is None or mc is None or seq is None:
            return
        from revnet_core.memory import Workload
        from .cost import CostModel

        device = str(_setting(cfg, "device", default=_first_param(model).device.type))
        precision = str(_setting(cfg, "precision", default="bf16" if device.startswith("cuda") else "fp32"))
        workload = Workload(batch=int(_setting(cfg, "batch_size", default=1)), seq_len=int(seq),
                            param_dtype=str(_first_param(model).dtype).removeprefix("torch."),
                            autocast_dtype="bfloat16" if precision in ("bf16", "bfloat16") or (
                                precision == "auto" and device.startswith("cuda")) else None,
                            device="cuda" if device.startswith("cuda") else "cpu")
        floor = CostModel(mc, workload).peak_bytes("reverse")
        if budget < floor:
            yield Pitfall(
                "budget_below_floor", "error",
                f"memory_budget={budget / 2**30:.2f} GiB is below the cost model's floor for this model at "
                f"batch {workload.batch} x {seq} tokens: {floor / 2**30:.2f} GiB with every layer reversed "
                "(parameters, gradients, optimizer state, the streams and one layer's backward)",
                "shorten the sequence or the batch, use a smaller model, or a device with more memory")

    def _no_clipping(self, model, cfg) -> Iterator[Pitfall]:
        if not (_has(cfg, "max_grad_norm") or _has(cfg, "gradient_clip")):
            return
        clip = _setting(cfg, "max_grad_norm", "gradient_clip")
        if not clip:
            yield Pitfall(
                "no_gradient_clipping", "warning",
                "gradient clipping is off: deep reversible stacks have no stored activations to damp a spike, "
                "and one large update can diverge the run",
                "clip the global gradient norm at 1.0 (LongContextTrainer's default max_grad_norm=1.0)")

    def _lr_for_depth(self, model, cfg) -> Iterator[Pitfall]:
        lr = _setting(cfg, "lr", "learning_rate")
        depth = len(reversible_layers(model))
        if lr is None:
            return
        limit = self.LR_AT_12_LAYERS * math.sqrt(12 / max(depth, 12))
        if lr > limit:
            yield Pitfall(
                "lr_too_high_for_depth", "warning",
                f"lr={lr:g} is high for {depth} layers: stable runs of this depth use at most about {limit:.2g}",
                f"lower the peak lr to <= {limit:.2g} and keep a warmup (LongContextTrainer's default)")

    def _all_stored(self, model, cfg) -> Iterator[Pitfall]:
        policies = getattr(model, "policies", None)
        if policies and all(p == "store" for p in policies):
            yield Pitfall(
                "every_layer_stored", "warning",
                "every layer's policy is 'store': activations are kept like a plain transformer's, so the "
                "reversible layers save no memory",
                "model.set_policy('reverse'), or let a MemoryScheduler choose per layer")
