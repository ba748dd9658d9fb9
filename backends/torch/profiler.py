"""Measured memory and time: per layer (``MemoryProfiler``) and over a whole region (``DetailedMemoryProfiler``).

``MemoryProfiler(model).profile(sample_batch)`` runs each layer alone on its real inputs under each policy and
records what the forward saves (saved-tensor bytes, any device), and on CUDA the allocator's retained and
peak bytes and event-timed forward/backward; on CPU the times are wall clock. The result calibrates the
schedulers (``AdaptiveScheduler(profile=...)``).

``DetailedMemoryProfiler`` wraps a region (forward + backward) in ``torch.profiler`` with memory profiling and
turns its allocation records into a timeline of allocated bytes per device: ``report.summary()``,
``report.plot_memory_timeline(png)``, ``report.export_chrome_trace(json)`` (Perfetto / chrome://tracing).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from revnet_core import policies as policy_table
from revnet_core.memory import format_bytes
from .cost import CostModel

from .engine import run_layers
from .memory import saved_tensor_bytes
from .scheduler import workload_for


def _input_ids(batch):
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError("sample_batch must be token ids (B, T), a dict with 'input_ids', or (input_ids, ...)")
    return batch if batch.dim() == 2 else batch[None]


class _Clock:
    """Seconds between marks: CUDA events on a GPU (asynchronous kernels), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


@dataclass
class LayerProfile:
    """One layer, measured alone on its real inputs: per policy, bytes its forward saves, on CUDA the bytes
    left allocated after the forward and the peak above the start, and forward/backward seconds."""

    index: int
    saved_bytes: dict[str, int] = field(default_factory=dict)
    retained_bytes: dict[str, int | None] = field(default_factory=dict)
    peak_bytes: dict[str, int | None] = field(default_factory=dict)
    forward_s: dict[str, float] = field(default_factory=dict)
    backward_s: dict[str, float] = field(default_factory=dict)

    def seconds(self, policy: str) -> float:
        return self.forward_s[policy] + self.backward_s[policy]


@dataclass
class MemoryProfile:
    """What ``MemoryProfiler.profile`` measured, and what the cost model predicted for the same run."""

    batch: int
    seq_len: int
    device: str
    autocast: str | None
    policies: tuple[str, ...]
    layers: list[LayerProfile]
    predicted_saved_bytes: dict[str, int]  # one layer, per policy (cost model)
    model_saved_bytes: int | None = None  # the whole model's forward under its current policies
    model_predicted_saved_bytes: int | None = None

    def layer_seconds(self) -> dict[str, float]:
        """Median seconds of one layer's forward + backward, per policy."""
        return {p: statistics.median(lp.seconds(p) for lp in self.layers) for p in self.policies}

    def activation_scale(self) -> float:
        """Measured over predicted saved bytes of a stored layer (1.0 when the cost model is exact)."""
        if "store" not in self.policies or not self.predicted_saved_bytes.get("store"):
            return 1.0
        measured = statistics.median(lp.saved_bytes["store"] for lp in self.layers)
        return measured / self.predicted_saved_bytes["store"]

    def summary(self) -> str:
        rows = [f"{len(self.layers)} layers, batch {self.batch} x {self.seq_len} tokens on {self.device}"
                f"{', autocast ' + self.autocast if self.autocast else ''}"]
        head = f"{'layer':>5} " + " ".join(f"{p + ' saved':>16} {p + ' s':>10}" for p in self.policies)
        rows.append(head)
        for lp in self.layers:
            rows.append(f"{lp.index:>5} " + " ".join(
                f"{format_bytes(lp.saved_bytes[p]):>16} {lp.seconds(p):>10.4f}" for p in self.policies))
        rows.append("predicted per layer: " + ", ".join(
            f"{p} {format_bytes(b)}" for p, b in self.predicted_saved_bytes.items()))
        if self.model_saved_bytes is not None:
            rows.append(f"whole model: saved {format_bytes(self.model_saved_bytes)}, predicted "
                        f"{format_bytes(self.model_predicted_saved_bytes)}")
        return "\n".join(rows)




class MemoryProfiler:
    """Per-layer measured memory and time of ``model`` (a ReversibleTransformer) on a sample batch."""

    def __init__(self, model, policies: Sequence[str] = policy_table.WHOLE_LAYER, repeats: int = 1,
                 warmup: int = 1):
        for attr in ("layers", "streams", "config"):
            if not hasattr(model, attr):
                raise TypeError(f"MemoryProfiler needs a ReversibleTransformer-like model (with .{attr})")
        self.model = model
        self.policies = tuple(policies)
        self.repeats = max(1, int(repeats))
        self.warmup = max(0, int(warmup))  # untimed runs first: the first call of a kernel pays its setup

    def profile(self, sample_batch, whole_model: bool = True) -> MemoryProfile:
        """Measure every layer under every policy; the model's gradients and RNG state are left as they were."""
        model = self.model
        ids = _input_ids(sample_batch)
        device = next(model.parameters()).device
        ids = ids.to(device)
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
            with torch.no_grad():
                x1, x2 = model.streams(ids)
                inputs = []
                for layer in model.layers:
                    inputs.append((x1, x2))
                    x1, x2 = layer(x1, x2)
            layers = [self._layer(i, layer, *inputs[i], device) for i, layer in enumerate(model.layers)]
            model_saved = model_pred = None
            w = workload_for(model, ids.shape[0], ids.shape[1])
            cm = CostModel(model.config, w)
            if whole_model:
                model_saved = self._model_saved(ids)
                model_pred = cm.saved_bytes(list(model.policies))  # the engine ran exactly these
        predicted = {p: cm.layer_saved_bytes(p) for p in self.policies}
        return MemoryProfile(ids.shape[0], ids.shape[1], str(device), w.autocast_dtype, self.policies, layers,
                             predicted, model_saved, model_pred)

    def _layer(self, index: int, layer, x1: torch.Tensor, x2: torch.Tensor, device) -> LayerProfile:
        out = LayerProfile(index)
        clock = _Clock(device)
        cuda = device.type == "cuda"
        params = [p for p in layer.parameters() if p.requires_grad]
        for policy in self.policies:
            fwd, bwd = [], []
            for rep in range(self.warmup + self.repeats):
                a = x1.detach().clone().requires_grad_(True)
                b = x2.detach().clone().requires_grad_(True)
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                t0 = clock.mark()
                with saved_tensor_bytes(exclude=params) as saved:
                    y1, y2 = run_layers([layer], [policy], a, b)
                t1 = clock.mark()
                retained = torch.cuda.memory_allocated(device) - base if cuda else None
                grads = torch.autograd.grad((y1, y2), [a, b, *params], (torch.ones_like(y1), torch.ones_like(y2)),
                                            allow_unused=True)
                t2 = clock.mark()
                peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
                if rep >= self.warmup:
                    fwd.append(clock.seconds(t0, t1))
                    bwd.append(clock.seconds(t1, t2))
                del grads, y1, y2, a, b
            out.saved_bytes[policy] = saved["bytes"]
            out.retained_bytes[policy] = retained
            out.peak_bytes[policy] = peak
            out.forward_s[policy] = statistics.median(fwd)
            out.backward_s[policy] = statistics.median(bwd)
        return out

    def _model_saved(self, ids) -> int:
        """Saved-tensor bytes of one forward of the whole model under its policies (gradients restored)."""
        model = self.model
        params = list(model.parameters())
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with saved_tensor_bytes(exclude=params) as saved:
                loss = model(ids).loss
            loss.backward()
        finally:
            for p, g in zip(params, before):
                p.grad = g
        return saved["bytes"]


# --- the whole-region profiler ---------------------------------------------------------------------------------
@dataclass
class MemoryReport:
    """A profiled region: allocated bytes over time per device, the ops that ran, and the peaks."""

    timelines: dict[str, list[tuple[float, int]]]  # device -> [(ms since start, bytes allocated)]
    baselines: dict[str, int]  # device -> bytes allocated when the region began (known on CUDA; 0 on CPU)
    ops: list[dict]  # name, ts (us since start), dur (us), tid, device
    duration_ms: float
    cuda_max_allocated: int | None = None
    cuda_max_reserved: int | None = None
    top_memory: list[tuple[str, int]] = field(default_factory=list)
    top_time: list[tuple[str, float]] = field(default_factory=list)

    def peak(self, device: str = "cpu") -> tuple[float, int]:
        """(ms, bytes) of the highest point of a device's timeline, baseline included."""
        tl = self.timelines.get(device) or [(0.0, 0)]
        t, b = max(tl, key=lambda x: x[1])
        return t, b + self.baselines.get(device, 0)

    def op_at(self, t_ms: float, device: str = "cpu") -> str:
        """The innermost op running at ``t_ms``."""
        us = t_ms * 1000.0
        best = None
        for op in self.ops:
            if op["device"] == device and op["ts"] <= us <= op["ts"] + op["dur"]:
                if best is None or op["dur"] <= best["dur"]:
                    best = op
        return best["name"] if best else "(between ops)"

    def summary(self) -> str:
        rows = [f"profiled region: {self.duration_ms:.1f} ms, {len(self.ops)} ops"]
        for dev in sorted(self.timelines):
            t, b = self.peak(dev)
            base = self.baselines.get(dev, 0)
            where = self.op_at(t, dev)
            start = f"{format_bytes(base)} at start, " if dev == "cuda" else ""
            rows.append(f"{dev}: {start}peak {format_bytes(b)} ({format_bytes(b - base)} above the start) at "
                        f"{t:.1f} ms in {where}")
        if self.cuda_max_allocated is not None:
            rows.append(f"cuda allocator: max allocated {format_bytes(self.cuda_max_allocated)}, max reserved "
                        f"{format_bytes(self.cuda_max_reserved)} (reserved - allocated: cached and fragmented)")
        if self.top_memory:
            rows.append("ops allocating the most (self, all calls):")
            rows += [f"  {format_bytes(b):>12}  {name}" for name, b in self.top_memory]
        if self.top_time:
            rows.append("ops taking the most time (self, all calls):")
            rows += [f"  {ms:>10.2f} ms  {name}" for name, ms in self.top_time]
        return "\n".join(rows)

    def plot_memory_timeline(self, path: str, title: str | None = None) -> str:
        """Write a PNG of allocated bytes over time (one line per device) and return its path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
        for dev, tl in sorted(self.timelines.items()):
            if not tl:
                continue
            base = self.baselines.get(dev, 0)
            xs = [t for t, _ in tl]
            ys = [(b + base) / 2**20 for _, b in tl]
            ax.step(xs, ys, where="post", label=f"{dev} allocated")
            t, b = self.peak(dev)
            ax.annotate(f"peak {format_bytes(b)}", (t, b / 2**20), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("time since start (ms)")
        ax.set_ylabel("allocated (MiB)" + ("" if "cuda" in self.timelines else ", relative to the start"))
        ax.set_title(title or "memory timeline")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        return path

    def export_chrome_trace(self, path: str) -> str:
        """Write a Chrome trace (JSON: ops as complete events, allocated bytes as counters) for Perfetto or
        chrome://tracing, and return its path."""
        events: list[dict] = [
            {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "CPU ops"}},
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "CUDA kernels"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "memory"}},
        ]
        for op in self.ops:
            events.append({"ph": "X", "name": op["name"], "cat": op["device"], "ts": op["ts"], "dur": op["dur"],
                           "pid": 1 if op["device"] == "cuda" else 0, "tid": op["tid"]})
        for dev, tl in self.timelines.items():
            base = self.baselines.get(dev, 0)
            for t, b in tl:
                events.append({"ph": "C", "name": f"{dev} allocated (MiB)", "pid": 2, "tid": 0, "ts": t * 1000.0,
                               "args": {"MiB": round((b + base) / 2**20, 4)}})
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path


class DetailedMemoryProfiler:
    """``with DetailedMemoryProfiler() as prof: ...forward, backward...``; then ``prof.generate_report()``.

    Uses ``torch.profiler`` with ``profile_memory=True``: every allocation and free is a record, so the
    timeline is exact on every device. On CUDA the allocator's peak statistics are reset at entry (the
    report then also gives ``max_memory_allocated``/``max_memory_reserved`` of the region).
    """

    def __init__(self, record_shapes: bool = False, top: int = 8):
        self.record_shapes = record_shapes
        self.top = top
        self._prof = None
        self._report = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._cuda = torch.cuda.is_available()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        self._cuda_base = 0
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._prof = profile(activities=acts, profile_memory=True, record_shapes=self.record_shapes)
        self._prof.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._elapsed = time.perf_counter() - self._t0
        self._prof.__exit__(*exc)
        self._cuda_peak = torch.cuda.max_memory_allocated() if self._cuda else None
        self._cuda_reserved = torch.cuda.max_memory_reserved() if self._cuda else None
        self._report = None

    def generate_report(self) -> MemoryReport:
        if self._prof is None:
            raise RuntimeError("generate_report() needs a profiled region: use `with profiler: ...` first")
        if self._report is None:
            self._report = self._build()
        return self._report

    def _build(self) -> MemoryReport:
        raw = self._raw_events()
        mem = [e for e in raw if e[0] == "[memory]"]
        ops = [e for e in raw if e[0] != "[memory]" and e[3] > 0]
        t0 = min((e[1] for e in raw), default=0)
        timelines: dict[str, list[tuple[float, int]]] = {}
        totals: dict[str, int] = {}
        for name, start, nbytes, _, dev, _ in sorted(mem, key=lambda e: e[1]):
            totals[dev] = totals.get(dev, 0) + nbytes
            timelines.setdefault(dev, [(0.0, 0)]).append(((start - t0) / 1e6, totals[dev]))
        op_rows = [{"name": name, "ts": (start - t0) / 1e3, "dur": dur / 1e3, "tid": tid, "device": dev}
                   for name, start, _, dur, dev, tid in ops]
        top_mem, top_time = [], []
        try:
            avg = self._prof.key_averages()
            top_mem = sorted(((e.key, int(e.self_cpu_memory_usage + getattr(e, "self_device_memory_usage", 0)))
                              for e in avg), key=lambda x: -x[1])[: self.top]
            top_time = sorted(((e.key, e.self_cpu_time_total / 1000.0) for e in avg), key=lambda x: -x[1])[: self.top]
        except Exception:  # aggregation is a convenience; the timeline does not depend on it
            pass
        return MemoryReport(timelines, {"cuda": self._cuda_base} if self._cuda else {}, op_rows,
                            self._elapsed * 1000.0, self._cuda_peak, self._cuda_reserved,
                            [x for x in top_mem if x[1] > 0], [x for x in top_time if x[1] > 0])

    def _raw_events(self) -> list[tuple]:
        """(name, start_ns, nbytes, duration_ns, device, thread) per profiler record.

        The raw records (``kineto_results``) keep every allocation with its own timestamp; the aggregated
        ``events()`` fold frees inside an op into that op, which hides peaks inside custom autograd Functions.
        """
        results = getattr(self._prof.profiler, "kineto_results", None)
        out = []
        if results is not None:
            cuda_type = torch.autograd.DeviceType.CUDA
            for e in results.events():
                dev = "cuda" if e.device_type() == cuda_type else "cpu"
                name = e.name()
                nbytes = e.nbytes() if name == "[memory]" else 0
                out.append((name, e.start_ns(), nbytes, e.duration_ns(), dev, e.start_thread_id()))
            return out
        for e in self._prof.events():  # fallback: op-level memory, coarser
            start = int(e.time_range.start * 1000)
            dur = int((e.time_range.end - e.time_range.start) * 1000)
            if e.name == "[memory]":
                out.append(("[memory]", start, e.cpu_memory_usage, 0, "cpu", e.thread))
            else:
                out.append((e.name, start, 0, dur, "cpu", e.thread))
                if e.self_cpu_memory_usage:
                    out.append(("[memory]", start, e.self_cpu_memory_usage, 0, "cpu", e.thread))
        return out
