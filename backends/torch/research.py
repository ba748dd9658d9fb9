"""Research helpers (``revnet_zero.research``): which (model size, context) cells fit a GPU and how fast,
short real runs with a loss-against-compute power law, and attention-distance statistics of a model.

What is predicted and what is measured:

- ``test_scaling_laws`` *predicts*: the torch cost model (``cost.CostModel``) simulates one training step per
  cell without allocating a tensor; ``revnet_core.planner.plan_layers`` picks the fastest per-layer plan
  whose predicted peak fits the usable bytes of ``gpu_memory_limit`` GiB (``advisor.usable_bytes``), and the
  all-``store`` plan (every activation kept, what plain autograd keeps) is the baseline. Step time is the
  cost model's FLOPs split into matmuls and the attention core, each at the rate an H200 sustained in
  measured steps (``H200``, fitted by ``fit_device_rates`` to docs/benchmarks/cost_check_h200.json).
- ``run=True`` *measures*: each cell that fits is trained for a few steps with ``LongContextTrainer`` on the
  embedded byte corpus; its held-out bits per byte against training compute (the cost model's FLOPs of a step
  without recompute, times steps) are fitted with ``L = a * C**-b (+ c)`` by least squares in log space.
- ``analyze_attention_patterns`` *measures*: the softmax weights of the chosen layers, from each layer's own
  q/k projection and rotary (captured with a forward hook on the attention block's norm), computed in query
  chunks so that no (T, T) matrix is formed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from revnet_core import policies as policy_table
from revnet_core.advisor import usable_bytes
from revnet_core.data import lm_data, stdlib_corpus
from revnet_core.errors import ConfigError, InputError
from revnet_core.memory import Workload
from revnet_core.planner import plan_layers
from revnet_core.presets import preset_config, size_name

from .blocks import AttentionBlock
from .cost import CostModel

GiB = 2**30
DEFAULT_DISTANCES = (64, 1024, 16384)  # attention weight at distance >= each of these is reported
PREDICTED_FIELDS = ("fits", "policies", "peak_bytes", "peak_gib", "baseline_peak_bytes", "baseline_peak_gib",
                    "baseline_fits", "step_flops", "relative_step_time", "predicted_step_s", "tokens_per_s")
MEASURED_FIELDS = ("bpb_init", "bpb_final", "curve", "wall_s", "loss_final")


# --- step time: FLOPs at a device's measured rates -----------------------------------------------------------
class _MatmulsOnly(CostModel):
    """The cost model with the attention core priced at zero: its step FLOPs are the matmuls alone, by the
    very rules of ``CostModel.layer_time`` (so the split cannot drift from them)."""

    def block_flops(self) -> dict[str, float]:
        return {**super().block_flops(), "attention_core": 0.0}


def step_flops(cm: CostModel, policies: Sequence[str] | str) -> tuple[float, float]:
    """(matmul FLOPs, attention-core FLOPs) of one training step of ``cm`` under ``policies``."""
    total = cm.step_time(policies)
    matmuls = _MatmulsOnly(cm.config, cm.workload).step_time(policies)
    return matmuls, total - matmuls


@dataclass(frozen=True)
class DeviceRates:
    """Sustained FLOP/s of one device for the cost model's two kinds of work: the matmuls (projections, FFN,
    loss head) and the attention core (FlashAttention's counted FLOPs). ``source``: what they were fitted to."""

    name: str
    matmul_flops_per_s: float
    attention_flops_per_s: float
    source: str

    def seconds(self, matmul_flops: float, attention_flops: float) -> float:
        return matmul_flops / self.matmul_flops_per_s + attention_flops / self.attention_flops_per_s


def fit_device_rates(cells: Iterable[tuple[CostModel, Sequence[str], float]], name: str, source: str) -> DeviceRates:
    """The two rates that best explain measured step seconds: least squares on the relative error of
    ``seconds = matmul_flops / R_m + attention_flops / R_a`` over ``cells`` of (cost model, plan, seconds)."""
    rows, seconds = [], []
    for cm, plan, s in cells:
        rows.append(step_flops(cm, plan))
        seconds.append(float(s))
    if len(rows) < 2:
        raise InputError(f"fit_device_rates needs at least 2 measured steps, got {len(rows)}")
    A = np.array(rows) / np.array(seconds)[:, None]
    inv, *_ = np.linalg.lstsq(A, np.ones(len(rows)), rcond=None)
    if not (inv > 0).all():
        raise InputError("the measured steps do not determine two positive rates: measure lengths where the "
                         "attention share differs (e.g. 16k and 64k tokens)")
    return DeviceRates(name, float(1 / inv[0]), float(1 / inv[1]), source)


# Fitted by fit_device_rates to the six steps of docs/benchmarks/cost_check_h200.json (24 layers, d 1024, bf16
# autocast, batch 1, 16k and 64k tokens, reverse/checkpoint/store); within 2% of every one of them.
# tests/torch/test_research.py refits them from that file.
H200 = DeviceRates("NVIDIA H200", 2.45015745e14, 4.41430334e14,
                   "docs/benchmarks/cost_check_h200.json (benchmarks/scheduler_frontier.py, measured step times)")


# --- power law ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    """``loss = a * compute**-b + c``, fitted in log space; ``rmse_log``: RMS of the log residuals."""

    a: float
    b: float
    c: float
    rmse_log: float
    points: int

    def predict(self, compute) -> np.ndarray:
        return self.a * np.asarray(compute, dtype=float) ** -self.b + self.c

    def formula(self) -> str:
        tail = f" + {self.c:.4g}" if self.c else ""
        return f"L = {self.a:.4g} * C^-{self.b:.4g}{tail}"


def _log_fit(logc: np.ndarray, loss: np.ndarray, c: float) -> tuple[float, float, float]:
    """(log a, b, sum of squared log residuals) of log(loss - c) = log a - b log C."""
    y = np.log(loss - c)
    X = np.stack([np.ones_like(logc), -logc], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ coef
    return float(coef[0]), float(coef[1]), float(r @ r)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], irreducible: bool = False) -> PowerLawFit:
    """Fit ``loss = a * compute**-b`` (``irreducible``: ``+ c``, 0 <= c < min(loss)) by least squares on
    log(loss - c) against log(compute); c by a grid then golden-section search on the residual."""
    C, L = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if C.shape != L.shape or C.ndim != 1:
        raise InputError(f"compute and loss must be two 1-D sequences of one length, got {C.shape} and {L.shape}")
    need = 3 if irreducible else 2
    if C.size < need:
        raise InputError(f"a power law{' with an irreducible term' if irreducible else ''} needs at least {need} "
                         f"points, got {C.size}")
    if not (np.isfinite(C).all() and np.isfinite(L).all() and (C > 0).all() and (L > 0).all()):
        raise InputError("compute and loss must be finite and > 0 to be fitted in log space")
    logc = np.log(C)
    c = 0.0
    if irreducible:
        top = float(L.min()) * (1 - 1e-9)
        residual = lambda v: _log_fit(logc, L, v)[2]  # noqa: E731
        grid = np.linspace(0.0, top, 201)
        k = int(np.argmin([residual(v) for v in grid]))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        g = (math.sqrt(5) - 1) / 2
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        f1, f2 = residual(x1), residual(x2)
        for _ in range(200):
            if hi - lo <= 1e-15 * max(1.0, top):
                break
            if f1 < f2:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - g * (hi - lo)
                f1 = residual(x1)
            else:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + g * (hi - lo)
                f2 = residual(x2)
        c = (lo + hi) / 2
    log_a, b, sse = _log_fit(logc, L, c)
    return PowerLawFit(math.exp(log_a), b, c, math.sqrt(sse / C.size), int(C.size))


# --- the scaling-law result ---------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_json(path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path


@dataclass
class ScalingResult:
    """``table``: one row per (size, context) in the order asked (keys: size, params, layers, d_model,
    context, batch and the ``PREDICTED_FIELDS``; ``predicted_step_s``/``tokens_per_s`` are None where no plan
    fits). ``runs``/``fit``: the measured short runs and their power law (``run=True`` only)."""

    table: list[dict[str, Any]]
    gpu_memory_limit_gib: float
    budget_bytes: int
    workload: dict[str, Any]
    device_rates: DeviceRates
    granularity: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    fit: PowerLawFit | None = None
    notes: list[str] = field(default_factory=list)
    models: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)  # keep_models=True: trained ones

    def cell(self, size, context: int) -> dict[str, Any]:
        """The row of (size, context); size as a preset name or a parameter count."""
        name = size_name(size)
        for row in self.table:
            if row["size"] == name and row["context"] == context:
                return row
        raise ConfigError(f"no cell ({name}, {context}) in this result")

    def to_dict(self) -> dict[str, Any]:
        return {
            "predicted": ("cost model (revnet_torch.cost.CostModel) and planner: no tensor allocated; step "
                          f"seconds at {self.device_rates.name} rates fitted to {self.device_rates.source}"),
            "predicted_fields": list(PREDICTED_FIELDS),
            "measured_fields": list(MEASURED_FIELDS) if self.runs else [],
            "gpu_memory_limit_gib": self.gpu_memory_limit_gib, "budget_bytes": self.budget_bytes,
            "workload": self.workload, "device_rates": asdict(self.device_rates), "granularity": self.granularity,
            "table": self.table, "runs": self.runs,
            "fit": None if self.fit is None else {**asdict(self.fit), "formula": self.fit.formula()},
            "notes": self.notes,
        }

    def to_json(self, path, **extra: Any) -> Path:
        """Write the result (and ``extra`` keys, e.g. ``command=``) as JSON; returns the path."""
        return _write_json(path, {**extra, **self.to_dict()})

    def plot(self, path) -> Path:
        """A PNG: the fit / no-fit grid with predicted peak GiB (store-everything in brackets), predicted step
        time against context per size, and with runs, held-out bits per byte against training compute."""
        plt = _plt()
        sizes = list(dict.fromkeys(r["size"] for r in self.table))
        contexts = sorted({r["context"] for r in self.table})
        panels = 3 if self.runs else 2
        fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.6))
        ax = axes[0]
        grid = np.full((len(sizes), len(contexts)), np.nan)
        for r in self.table:
            i, j = sizes.index(r["size"]), contexts.index(r["context"])
            grid[i, j] = 1.0 if r["fits"] else 0.0
            ax.text(j, i, f"{_gib(r['peak_gib'])}\n({_gib(r['baseline_peak_gib'])})", ha="center", va="center",
                    fontsize=7)
        ax.imshow(grid, cmap="RdYlGn", vmin=-0.3, vmax=1.3, aspect="auto")
        ax.set_xticks(range(len(contexts)), [_tokens(c) for c in contexts])
        ax.set_yticks(range(len(sizes)), sizes)
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"fits {self.gpu_memory_limit_gib:g} GiB? predicted peak GiB\n(store everything)", fontsize=9)
        ax = axes[1]
        for k, s in enumerate(sizes):
            pts = [(r["context"], r["predicted_step_s"]) for r in self.table if r["size"] == s and r["fits"]]
            if pts:
                ax.plot(*zip(*sorted(pts)), "o-", color=f"C{k}", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("predicted step s")
        ax.set_title(f"predicted step time ({self.device_rates.name} rates)", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if self.runs:
            ax = axes[2]
            for k, run in enumerate(self.runs):
                xs, ys = zip(*run["curve"])
                ax.plot(xs, ys, ".-", color=f"C{k}", alpha=0.6, label=f"{run['size']} @ {run['context']}")
            C = np.array([r["train_flops"] for r in self.runs])
            ax.plot(C, [r["bpb_final"] for r in self.runs], "ko", ms=4)
            if self.fit is not None:
                xs = np.geomspace(C.min(), C.max(), 50)
                ax.plot(xs, self.fit.predict(xs), "k--", label=self.fit.formula())
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training compute (FLOPs, cost model)")
            ax.set_ylabel("held-out bits per byte (measured)")
            ax.set_title("short runs", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return _save_png(fig, path)


def _save_png(fig, path) -> Path:
    """Write ``fig`` to ``path`` (folders made) as PNG and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    _plt().close(fig)
    return path


def _gib(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _tokens(n: int) -> str:
    for size, unit in ((2**20, "M"), (2**10, "k")):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# --- attention statistics -----------------------------------------------------------------------------------
def distance_bin_edges(seq_len: int) -> list[int]:
    """Edges of the log distance bins covering 0 .. seq_len - 1: bin 0 is distance 0, bin k >= 1 is
    [2**(k-1), 2**k)."""
    top = max(1, (seq_len - 1).bit_length())
    return [0] + [2**k for k in range(top + 1)]


def attention_statistics(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, window: int | None = None,
                         distances: Sequence[int] = DEFAULT_DISTANCES,
                         max_elements: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Statistics of softmax(q k^T / sqrt(hd)) per head, averaged over the batch and the queries.

    q, k: (B, H, T, hd). The mask is the attention kernels' (kernels/attn.py): query i sees keys j <= i when
    causal, only those with i - j < ``window`` when windowed, every key otherwise. Distance is i - j (|i - j|
    without causality). Scores are computed for a chunk of queries at a time, at most ``max_elements``
    scores at once, in promote(q.dtype, float32); sums in float64. Returns float64 tensors: ``mean_distance``
    (H,), ``entropy`` (H,) in nats, ``fraction_beyond`` (len(distances), H): weight at distance >= each,
    ``histogram`` (H, bins): weight per ``distance_bin_edges`` bin (each row sums to 1).
    """
    B, H, T, hd = q.shape
    dev = q.device
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(hd)
    edges = distance_bin_edges(T)
    f64 = torch.float64
    mean = torch.zeros(H, dtype=f64, device=dev)
    ent = torch.zeros(H, dtype=f64, device=dev)
    beyond = torch.zeros(len(distances), H, dtype=f64, device=dev)
    hist = torch.zeros(H, len(edges) - 1, dtype=f64, device=dev)
    chunk = max(1, max_elements // max(1, B * T))
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        keys = e if causal else T  # a causal chunk of queries sees no key past its last query
        i = torch.arange(s, e, device=dev)
        dist = i[:, None] - torch.arange(keys, device=dev)[None, :]  # (c, keys)
        visible = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
        if window is not None:
            visible &= dist < window
        dist_f = (dist if causal else dist.abs()).to(acc)
        for h in range(H):
            scores = torch.matmul(q[:, h, s:e].to(acc), k[:, h, :keys].to(acc).transpose(-1, -2)).mul_(scale)
            p = scores.masked_fill_(~visible, float("-inf")).softmax(-1)  # (B, c, keys)
            mean[h] += (p * dist_f).clamp_(min=0).sum(dtype=f64)
            ent[h] -= torch.special.xlogy(p, p).sum(dtype=f64)
            # Distance ranges are runs of keys: their weights are differences of the cumulative weight (no
            # per-element bin index, no scatter).
            upto = _KeyMass(p.cumsum(-1, dtype=f64))
            for n, D in enumerate(distances):
                far = upto(i - D) + (0.0 if causal else upto.total - upto(i + D - 1))
                beyond[n, h] += far.sum()
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                mass = upto(i - lo) - upto(i - hi)
                if not causal and lo > 0:
                    mass = mass + upto(i + hi - 1) - upto(i + lo - 1)
                hist[h, b] += mass.sum()
            del scores, p, upto
    rows = B * T
    return {"mean_distance": mean / rows, "entropy": ent / rows, "fraction_beyond": beyond / rows,
            "histogram": hist / rows}


class _KeyMass:
    """``upto(x)``: the weight of keys j <= x[r] for each query row r, from the cumulative weights cs (B, c, K)
    (0 where x < 0, the row's total where x >= K - 1); (B, c)."""

    def __init__(self, cs: torch.Tensor):
        self.cs = cs
        self.total = cs[..., -1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, c, K = self.cs.shape
        got = self.cs.gather(-1, x.clamp(0, K - 1).view(1, c, 1).expand(B, c, 1)).squeeze(-1)
        return torch.where(x[None] < 0, torch.zeros_like(got), got)


def _attention_blocks(model) -> list[AttentionBlock]:
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "config"):
        raise ConfigError(f"{type(model).__name__} is not a revnet_torch model (no .layers and .config); pass a "
                          "ReversibleTransformer")
    blocks = [getattr(getattr(layer, "attn", None), "block", None) for layer in layers]
    for i, b in enumerate(blocks):
        if not isinstance(b, AttentionBlock):
            raise ConfigError(f"layer {i}'s attention is {type(b).__name__}, not softmax attention "
                              "(Rational-Fourier attention never forms its weights); analyze a model with "
                              "use_rational_attention=False")
    return blocks


def layer_qkv(block: AttentionBlock, h: torch.Tensor):
    """rope(q), rope(k), v (B, H, T, hd) of normed input h (B, T, d), through the block's own projection and
    rotary (``AttentionBlock._heads``: the code its forward runs)."""
    return block._heads(block.qkv(h), block.num_heads)


@contextlib.contextmanager
def _on_attention_input(blocks: dict[int, AttentionBlock], fn: Callable[[int, AttentionBlock, torch.Tensor], None]):
    """Call ``fn(layer, block, normed input)`` once per forward for each block: a hook on the block's norm,
    whose output both attention paths (whole, and head-chunked) project."""
    seen: set[int] = set()
    handles = []
    for i, block in blocks.items():
        def hook(module, args, out, i=i, block=block):
            if i not in seen:
                seen.add(i)
                fn(i, block, out)
        handles.append(block.norm.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _run_forward(model, ids: torch.Tensor) -> None:
    kwargs = {"compute_loss": False} if "compute_loss" in inspect.signature(model.forward).parameters else {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            model(ids, **kwargs)
    finally:
        model.train(was)


def capture_qkv(model, input_ids: torch.Tensor, layers: Iterable[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """{layer: (rope(q), rope(k), v)}, each (B, H, T, hd), of one eval forward of ``model`` on input_ids (B, T).
    Short sequences only: it keeps them all."""
    blocks = _attention_blocks(model)
    out: dict[int, tuple[torch.Tensor, ...]] = {}

    def keep(i, block, h):
        out[i] = tuple(t.detach() for t in layer_qkv(block, h))

    with _on_attention_input({i: blocks[i] for i in layers}, keep):
        _run_forward(model, input_ids)
    return out


@dataclass
class AttentionPatterns:
    """Attention-distance statistics per layer (``layers``, in order) and head: ``mean_distance`` and
    ``entropy`` (nats) [layer][head]; ``fraction_beyond`` {distance: [layer][head]} of weight at distance >=
    it; ``histogram`` [layer][head][bin] over ``bin_edges`` (bin k covers [edges[k], edges[k+1])).
    ``uniform_mean_distance``: the mean distance if every query attended uniformly to what it may see
    (causal, no window: (T - 1) / 4)."""

    layers: list[int]
    sequence_length: int
    batch: int
    heads: int
    distances: list[int]
    mean_distance: list[list[float]]
    entropy: list[list[float]]
    fraction_beyond: dict[int, list[list[float]]]
    histogram: list[list[list[float]]]
    bin_edges: list[int]
    uniform_mean_distance: float | None
    causal: bool
    window: int | None
    input: str
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction_beyond"] = {str(k): v for k, v in self.fraction_beyond.items()}
        d["measured"] = ("softmax weights of the model's own q/k projections and rotary, computed in query "
                         "chunks (no (T, T) matrix); averaged over batch and queries")
        return d

    def to_json(self, path, **extra: Any) -> Path:
        """Write the statistics (and ``extra`` keys, e.g. ``command=``) as JSON; returns the path."""
        return _write_json(path, {**extra, **self.to_dict()})

    def plot(self, path) -> Path:
        """A PNG: mean distance and entropy heatmaps (layer x head), and each layer's distance histogram
        (mean over heads)."""
        plt = _plt()
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
        for ax, values, title in ((axes[0], self.mean_distance, "mean attention distance (tokens)"),
                                  (axes[1], self.entropy, "attention entropy (nats)")):
            im = ax.imshow(np.array(values), aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers])
            ax.set_xticks(range(self.heads))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax)
        ax = axes[2]
        centers = [max(lo, 0.5) for lo in self.bin_edges[:-1]]  # distance 0 drawn at 0.5 on the log axis
        for k, layer in enumerate(self.layers):
            ax.plot(centers, np.array(self.histogram[k]).mean(0), "o-", ms=3, label=f"layer {layer}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distance bin lower edge (tokens; 0 at 0.5)")
        ax.set_ylabel("attention weight (mean over heads)")
        ax.set_title(f"distance histogram at T = {self.sequence_length}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _save_png(fig, path)


def _corpus_ids(T: int, vocab_size: int) -> tuple[np.ndarray, str]:
    if vocab_size < 256:
        raise InputError(f"the default input is bytes (ids 0..255) but the model's vocab_size is {vocab_size}; "
                         "pass input_ids=")
    corpus = stdlib_corpus()
    for name, arr in (("held-out", corpus.heldout), ("training", corpus.train)):
        if arr.size >= T:
            return arr[:T], f"the first {T} bytes of the embedded corpus's {name} split (sha256 {corpus.sha256[:12]})"
    raise InputError(f"sequence_length={T} exceeds the embedded corpus ({corpus.train.size} bytes); pass input_ids=")


def _check_layers(layer_range, depth: int) -> list[int]:
    try:
        layers = [int(i) for i in layer_range]
    except TypeError:
        raise ConfigError(f"layer_range={layer_range!r} must be an iterable of layer indices, e.g. range(0, "
                          f"{depth})") from None
    if not layers:
        raise ConfigError("layer_range is empty: name at least one layer")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"layer_range has {bad}, outside the model's {depth} layers (0..{depth - 1})")
    return list(dict.fromkeys(layers))


# --- the README's object --------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return int(value)


class MemoryEfficientResearch:
    """``research.test_scaling_laws(model_sizes=['125M', '1.3B'], context_lengths=[8192, 32768],
    gpu_memory_limit=40)`` and ``research.analyze_attention_patterns(model, sequence_length, layer_range)``.

    The priced training step: ``batch_size`` sequences, ``autocast_dtype`` autocast (fp32 weights and AdamW
    state), the preset shapes at ``vocab_size`` (GPT-2's, so parameter counts match the names), per-layer
    plans of ``granularity`` (layer | attention | block), step seconds at ``device_rates``. Priced cells are
    cached on the object, so asking again with another memory limit costs no new simulation.
    """

    def __init__(self, *, batch_size: int = 1, autocast_dtype: str | None = "bfloat16", vocab_size: int = 50257,
                 granularity: str = "layer", device_rates: DeviceRates = H200):
        if granularity not in policy_table.GRANULARITIES:
            raise ConfigError(f"granularity={granularity!r} is not one of {list(policy_table.GRANULARITIES)}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.autocast_dtype = autocast_dtype
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.granularity = granularity
        self.device_rates = device_rates
        self._cost_models: dict[tuple[str, int], CostModel] = {}

    def _cost_model(self, name: str, T: int) -> CostModel:
        key = (name, T)
        if key not in self._cost_models:
            cfg = preset_config(name, vocab_size=self.vocab_size, max_seq_len=T)
            self._cost_models[key] = CostModel(cfg, Workload(batch=self.batch_size, seq_len=T,
                                                             autocast_dtype=self.autocast_dtype))
        return self._cost_models[key]

    def price(self, size, context: int, budget_bytes: int) -> dict[str, Any]:
        """One table row (see ``ScalingResult``): the fastest plan within ``budget_bytes`` or, when none fits,
        the least-memory plan and what it would need."""
        name = size_name(size)
        cm = self._cost_model(name, context)
        L = cm.config.num_layers
        least = ["reverse"] * L
        least_peak = cm.peak_bytes(least)
        baseline = cm.peak_bytes("store")
        if min(least_peak, baseline) <= budget_bytes:  # some plan fits: the planner finds the fastest
            plan = plan_layers(cm, L, budget_bytes, strategy="adaptive", granularity=self.granularity)
            policies, peak, fits = list(plan.policies), plan.peak_bytes, plan.fits
        elif baseline < least_peak:  # short contexts: storing can need less than the reversed backward
            policies, peak, fits = ["store"] * L, baseline, False
        else:
            policies, peak, fits = least, least_peak, False
        matmuls, attention = step_flops(cm, policies)
        seconds = self.device_rates.seconds(matmuls, attention) if fits else None
        return {
            "size": name, "params": cm.parameter_count(), "layers": L, "d_model": cm.config.d_model,
            "context": context, "batch": self.batch_size, "fits": bool(fits),
            "policies": policy_table.summary(policies), "policy_per_layer": policies,
            "peak_bytes": int(peak), "peak_gib": peak / GiB,
            "baseline_peak_bytes": int(baseline), "baseline_peak_gib": baseline / GiB,
            "baseline_fits": bool(baseline <= budget_bytes),
            "step_flops": matmuls + attention, "relative_step_time": cm.relative_step_time(policies),
            "predicted_step_s": seconds,
            "tokens_per_s": None if seconds is None else self.batch_size * context / seconds,
        }

    def test_scaling_laws(self, model_sizes: Sequence, context_lengths: Sequence[int], gpu_memory_limit: float, *,
                          run: bool = False, steps: int = 30, run_batch_size: int = 4, lr: float = 2e-3,
                          eval_windows: int = 16, eval_points: int = 4, seed: int = 0, irreducible: bool = False,
                          device: str | None = None, keep_models: bool = False) -> ScalingResult:
        """Price every (size, context) cell on a GPU of ``gpu_memory_limit`` GiB (the table is predicted).

        model_sizes: preset names ('125M', '1.3B', 'tiny', ...) or parameter counts (125e6).
        ``run=True``: train each cell that fits for ``steps`` optimizer steps (``run_batch_size`` sequences,
        ``lr``, fp32, the embedded byte corpus, the cell's plan, vocabulary 256) with ``LongContextTrainer``
        and fit held-out bits per byte against training compute (``irreducible``: with a constant term). Meant
        for the small presets and short contexts on a CPU. ``keep_models``: the trained models stay in
        ``result.models[(size, context)]`` (e.g. for ``analyze_attention_patterns``).
        """
        if isinstance(model_sizes, (str, int, float)) or not len(model_sizes):
            raise ConfigError(f"model_sizes={model_sizes!r} must be a non-empty list of sizes, e.g. ['125M', '350M']")
        names = [size_name(s) for s in model_sizes]
        if isinstance(context_lengths, (str, int)) or not len(context_lengths):
            raise ConfigError(f"context_lengths={context_lengths!r} must be a non-empty list of token counts")
        for T in context_lengths:
            if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 2:
                raise ConfigError(f"context length {T!r} must be an integer >= 2 tokens")
        if isinstance(gpu_memory_limit, bool) or not isinstance(gpu_memory_limit, (int, float)) or \
                not math.isfinite(gpu_memory_limit) or gpu_memory_limit <= 0:
            raise ConfigError(f"gpu_memory_limit={gpu_memory_limit!r} must be a positive number of GiB")
        budget = usable_bytes(int(gpu_memory_limit * GiB))
        if budget <= 0:
            raise ConfigError(f"gpu_memory_limit={gpu_memory_limit} GiB leaves nothing once the CUDA context is "
                              "set aside; give at least 1 GiB")
        table = [self.price(n, int(T), budget) for n in names for T in context_lengths]
        result = ScalingResult(table, float(gpu_memory_limit), budget,
                               {"batch": self.batch_size, "autocast_dtype": self.autocast_dtype,
                                "param_dtype": "float32", "optimizer": "adamw", "vocab_size": self.vocab_size},
                               self.device_rates, self.granularity)
        if run:
            self._run(result, _positive_int("steps", steps), _positive_int("run_batch_size", run_batch_size), lr,
                      _positive_int("eval_windows", eval_windows), _positive_int("eval_points", eval_points), seed,
                      irreducible, device, keep_models)
        return result

    def _run(self, result: ScalingResult, steps: int, batch: int, lr: float, eval_windows: int, eval_points: int,
             seed: int, irreducible: bool, device: str | None, keep_models: bool) -> None:
        from .model import ReversibleTransformer
        from .trainer import LongContextTrainer

        corpus = stdlib_corpus()
        for row in result.table:
            if not row["fits"]:
                result.notes.append(f"not run: {row['size']} at {row['context']} does not fit")
                continue
            T = row["context"]
            cfg = preset_config(row["size"], max_seq_len=T)  # bytes: vocabulary 256
            torch.manual_seed(seed)
            model = ReversibleTransformer(cfg)
            model.set_policy(row["policy_per_layer"])
            trainer = LongContextTrainer(model, max_length=T, lr=lr, warmup_steps=max(1, steps // 10),
                                         precision="fp32", eval_every=max(1, steps // eval_points), device=device,
                                         seed=seed, progress=False, plot=False)
            data = lm_data(corpus, T, batch, seed, eval_windows_max=eval_windows)
            cm = CostModel(cfg, Workload(batch=batch, seq_len=T, autocast_dtype=None,
                                         device="cuda" if trainer.device.type == "cuda" else "cpu"))
            per_step = cm.step_time("store")  # learning compute; the plan's recompute is overhead
            t0 = time.perf_counter()
            init = trainer.evaluate(data)["eval_bits_per_byte"]
            summary = trainer.fit(data, steps=steps)
            curve = [[r["step"] * per_step, r["eval_bits_per_byte"]] for r in trainer.history
                     if r.get("kind") == "eval"]
            result.runs.append({
                "size": row["size"], "context": T, "params": sum(p.numel() for p in model.parameters()),
                "steps": steps, "batch": batch, "lr": lr, "tokens": steps * batch * T,
                "policies": row["policies"], "flops_per_step": per_step,
                "executed_flops_per_step": cm.step_time(row["policy_per_layer"]),
                "train_flops": steps * per_step, "bpb_init": init, "bpb_final": curve[-1][1], "curve": curve,
                "loss_final": summary["loss"], "wall_s": time.perf_counter() - t0, "device": summary["device"],
            })
            if keep_models:
                result.models[(row["size"], T)] = model
        if len(result.runs) >= (3 if irreducible else 2):
            result.fit = fit_power_law([r["train_flops"] for r in result.runs], [r["bpb_final"] for r in result.runs],
                                       irreducible)
        else:
            result.notes.append(f"no power law: {len(result.runs)} run(s), need {3 if irreducible else 2}")

    def analyze_attention_patterns(self, model, sequence_length: int, layer_range: Iterable[int],
                                   input_ids: torch.Tensor | None = None, *,
                                   distances: Sequence[int] = DEFAULT_DISTANCES,
                                   max_elements: int = 1 << 24) -> AttentionPatterns:
        """Attention-distance statistics of ``layer_range`` layers of a torch ``ReversibleTransformer`` on one
        eval forward of ``sequence_length`` tokens (default input: bytes of the embedded corpus; or
        ``input_ids`` (B, T) / (T,) with T = sequence_length). Each layer's statistics are computed inside the
        forward and its q, k dropped: memory holds one layer's q, k and ``max_elements`` scores."""
        blocks = _attention_blocks(model)
        layers = _check_layers(layer_range, len(blocks))
        max_len = model.config.max_seq_len
        if isinstance(sequence_length, bool) or not isinstance(sequence_length, (int, np.integer)) or \
                not 2 <= sequence_length <= max_len:
            raise InputError(f"sequence_length={sequence_length!r} must be an integer in [2, max_seq_len={max_len}]")
        T = int(sequence_length)
        dists = [_positive_int("distance", D) for D in distances]
        dev = next(model.parameters()).device
        if input_ids is None:
            arr, where = _corpus_ids(T, model.config.vocab_size)
            input_ids = torch.from_numpy(arr.astype(np.int64))[None].to(dev)
        else:
            if not isinstance(input_ids, torch.Tensor):
                raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
            if input_ids.dim() != 2 or input_ids.shape[1] != T:
                raise InputError(f"input_ids of shape {tuple(input_ids.shape)} must be (batch, {T}) for "
                                 f"sequence_length={T}")
            input_ids = input_ids.to(dev)
            where = f"input_ids {tuple(input_ids.shape)}"
        stats: dict[int, dict[str, torch.Tensor]] = {}

        def measure(i, block, h):
            q, k, _ = layer_qkv(block, h)
            stats[i] = {n: v.cpu() for n, v in attention_statistics(
                q, k, causal=block.causal, window=block.window, distances=dists, max_elements=max_elements).items()}

        t0 = time.perf_counter()
        with _on_attention_input({i: blocks[i] for i in layers}, measure):
            _run_forward(model, input_ids)
        first = blocks[layers[0]]
        uniform = (T - 1) / 4 if first.causal and first.window is None else None
        return AttentionPatterns(
            layers=layers, sequence_length=T, batch=int(input_ids.shape[0]), heads=first.num_heads,
            distances=dists, mean_distance=[stats[i]["mean_distance"].tolist() for i in layers],
            entropy=[stats[i]["entropy"].tolist() for i in layers],
            fraction_beyond={D: [stats[i]["fraction_beyond"][n].tolist() for i in layers] for n, D in enumerate(dists)},
            histogram=[stats[i]["histogram"].tolist() for i in layers], bin_edges=distance_bin_edges(T),
            uniform_mean_distance=uniform, causal=first.causal, window=first.window, input=where,
            wall_s=time.perf_counter() - t0)
