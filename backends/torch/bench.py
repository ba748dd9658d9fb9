"""BenchmarkSuite: training-step memory, throughput and energy of models across sequence lengths.

Built-in baselines are named specs a fresh process can rebuild: ``plain`` (PyTorch, everything stored),
``checkpoint`` (``torch.utils.checkpoint`` per layer), ``offload`` (checkpoint + layer inputs in pinned host
memory), ``reversible`` (our stack) and ``reversible_rf`` (our stack with Rational-Fourier attention:
``attention_kind="rf"``, windowed when the config sets ``attention_window``). All get the same weights (one
seeded state dict, mapped onto each layout; RF attention's random features are its own) and the same loss
head, and all but ``reversible_rf`` the same attention kernel. On a GPU each spec cell runs in its own subprocess: an
out-of-memory fragments the allocator for whatever runs after it in the same process, so it becomes a row
``{"oom": true}`` instead. On the CPU (no allocator to fragment; memory is counted as tensor bytes) spec
cells run in this process unless a ``timeout`` asks for a child it can stop: starting a child costs seconds
of imports (torch, then torch._dynamo, which AdamW's constructor loads), far more than a tiny cell. ``nn.Module`` instances cannot be rebuilt elsewhere and run in this process, with
the out-of-memory caught.

    from revnet_torch.bench import BenchmarkSuite
    results = BenchmarkSuite().run(models={"plain": "plain", "reversible": "reversible"},
                                   sequence_lengths=[64, 128], batch_sizes=[1])
    print(results.table())

``python -m revnet_torch.bench --cell JSON`` is the per-cell entry point the suite launches.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from revnet_core.errors import ConfigError

METRICS = ("memory", "throughput", "energy")
from .options import config_of, options
from .plugin import BENCH_MODELS as SPEC_KINDS  # the record names them before torch is imported
OPTIMIZERS = ("adamw", "sgd", "none")
PRECISIONS = ("auto", "fp32", "bf16")
_PLAIN_MEMORY = {"plain": "store", "checkpoint": "checkpoint", "offload": "offload"}
# Small enough that every baseline runs a step on a laptop CPU in well under a second.
DEFAULT_CONFIG = dict(num_layers=2, d_model=64, num_heads=2, vocab_size=256)
_ATTENTION_WORDS = ("attention", "flash", "fmha", "cudnn", "sdpa", "attn")


# --- model specs ----------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A built-in model a subprocess can rebuild: ``kind`` of SPEC_KINDS, ModelConfig fields, init seed."""

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ConfigError(f"unknown model {self.kind!r}; built-in models: {', '.join(SPEC_KINDS)}")
        config_of({**DEFAULT_CONFIG, **self.config})  # a bad field fails here, not in a child

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": dict(self.config), "seed": self.seed}


def _as_spec(value: Any, config: Mapping[str, Any], seed: int) -> ModelSpec | None:
    """A ModelSpec for a name, dict or spec; None for an nn.Module (run in-process)."""
    if isinstance(value, nn.Module):
        return None
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        return ModelSpec(value, dict(config), seed)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"kind", "config", "seed"})
        if unknown or "kind" not in value:
            raise ConfigError(f"a model spec is a dict with 'kind' and optional 'config', 'seed'; got keys {sorted(value)}")
        return ModelSpec(value["kind"], {**config, **dict(value.get("config") or {})}, int(value.get("seed", seed)))
    raise ConfigError(f"a model must be an nn.Module, a name of {list(SPEC_KINDS)}, a spec dict or a ModelSpec; "
                      f"got {type(value).__name__}")


def _canonical_name(name: str) -> str:
    # The reversible layers wrap the same attention/FFN blocks one level deeper (attn.block.qkv vs attn.qkv),
    # RF attention's qkv and proj one more (attn.block.attn.qkv).
    for deep, canonical in ((".attn.block.attn.", ".attn."), (".attn.block.", ".attn."), (".ffn.block.", ".ffn.")):
        name = name.replace(deep, canonical)
    return name


def build_model(spec: ModelSpec, max_seq_len: int) -> nn.Module:
    """The spec's model on CPU, with the weights every kind of the same config and seed shares."""
    import revnet_core
    from .baselines import PlainGPT

    cfg = config_of({**DEFAULT_CONFIG, **spec.config})
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_seq_len))
    torch.manual_seed(spec.seed)
    # The plain model's state dict is the reference every kind loads, so "same weights" does not depend on
    # the constructors drawing random numbers in the same order.
    reference = PlainGPT(cfg, memory="store").state_dict()
    if spec.kind == "reversible_rf":
        cfg = cfg if cfg.attention_kind == "rf" else cfg.replace(attention_kind="rf")
    elif spec.kind != "reversible" and cfg.attention_kind != "softmax":
        raise ConfigError(f"attention_kind={cfg.attention_kind!r} for the {spec.kind!r} baseline: the PyTorch "
                          "baselines run softmax attention; RF attention is the 'reversible_rf' model")
    if spec.kind in ("reversible", "reversible_rf"):
        model = revnet_core.build("torch", config=cfg)
    else:
        model = PlainGPT(cfg, memory=_PLAIN_MEMORY[spec.kind])
    own = model.state_dict()
    mapped = {name: reference[_canonical_name(name)] for name in own if _canonical_name(name) in reference}
    unused = sorted(set(reference) - {_canonical_name(n) for n in mapped})
    if unused:
        raise ConfigError(f"{spec.kind} model does not take reference weights {unused[:5]}")
    # Parameters only one kind has (e.g. an affine coupling's scales) keep their own seeded init.
    model.load_state_dict(mapped, strict=False)
    return model


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's weights under canonical names: equal digests, equal weights."""
    h = hashlib.sha256()
    for name, t in sorted((_canonical_name(n), t) for n, t in model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- one cell ---------------------------------------------------------------------------------------------
def _loss_of(out: Any, ids: torch.Tensor) -> torch.Tensor:
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    if isinstance(out, Mapping) and out.get("loss") is not None:
        return out["loss"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if isinstance(out, torch.Tensor):
        if out.dim() == 0:
            return out
        if out.dim() == 3 and out.shape[:2] == ids.shape:  # logits: next-token cross-entropy
            return nn.functional.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    raise TypeError("the model's forward(ids) must return a scalar loss, (B, T, V) logits, or an object or dict "
                    f"with a 'loss'; got {type(out).__name__}")


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for owner in (cfg, model):
        v = getattr(owner, "vocab_size", None)
        if isinstance(v, int) and v > 0:
            return v
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ConfigError(f"cannot tell the vocabulary size of {type(model).__name__}: give it a config.vocab_size, "
                      "a vocab_size attribute or an nn.Embedding")


def _make_optimizer(name: str, params: list, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    return None


def _autocast(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _EnergyMeter:
    """NVML's total-energy counter of the GPU ``device`` (millijoules since the driver loaded), or the reason
    there is none."""

    def __init__(self, device: torch.device):
        self.handle, self.reason = None, None
        if device.type != "cuda":
            self.reason = f"no GPU: NVML's energy counter measures NVIDIA GPUs only (device is {device.type})"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = self._handle(pynvml, index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
        except Exception as exc:  # NVML errors are many classes; any of them means no reading
            self.handle = None
            self.reason = f"NVML energy counter unavailable: {type(exc).__name__}: {exc}"

    @staticmethod
    def _handle(pynvml, index: int):
        # By PCI bus id where torch knows it: NVML's indices ignore CUDA_VISIBLE_DEVICES.
        props = torch.cuda.get_device_properties(index)
        if getattr(props, "pci_bus_id", None) is not None:
            busid = "%08x:%02x:%02x.0" % (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(busid)
            except Exception:
                if os.environ.get("CUDA_VISIBLE_DEVICES"):
                    raise  # the index would name a different GPU than torch's
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def read_mj(self) -> int | None:
        return None if self.handle is None else int(self._read(self.handle))


def _attention_ops(prof) -> list[str]:
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in _ATTENTION_WORDS)})


class _OpRecorder:
    """Names the attention ops one step runs: on CUDA the GPU kernels (profiler), elsewhere the aten ops the
    dispatcher chose (a dispatch mode: the profiler's start-up alone costs a second per CPU cell)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ops: list[str] | None = None

    @contextlib.contextmanager
    def record(self):
        if self.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                yield
                _sync(self.device)
            self.ops = _attention_ops(prof)
            return
        from torch.utils._python_dispatch import TorchDispatchMode

        seen: set[str] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if any(w in name.lower() for w in _ATTENTION_WORDS):
                    seen.add(name)
                return func(*args, **(kwargs or {}))

        with Mode():
            yield
        self.ops = sorted(seen)


def measure(model: nn.Module, seq: int, batch: int, *, steps: int = 3, warmup: int = 1,
            device: str | torch.device | None = None, metrics: Sequence[str] = METRICS, optimizer: str = "adamw",
            precision: str = "auto", seed: int = 0) -> dict[str, Any]:
    """One cell in this process: ``warmup`` untimed steps, then ``steps`` timed training steps (forward,
    backward, optimizer step). Out of memory returns ``{"oom": True, ...}``. See docs/benchmarks.md."""
    device = torch.device(device) if device is not None else default_device()
    try:
        return _measure(model, seq, batch, steps, warmup, device, metrics, optimizer, precision, seed)
    except torch.OutOfMemoryError as exc:
        model.zero_grad(set_to_none=True)  # a half-done backward's gradients would outlive the cell
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"oom": True, "oom_message": str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""}


def _measure(model, seq, batch, steps, warmup, device, metrics, optimizer, precision, seed) -> dict[str, Any]:
    model = model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(model), (batch, seq), generator=gen).to(device)
    tokens = batch * seq
    energy = _EnergyMeter(device) if "energy" in metrics else None

    def step() -> float:
        with _autocast(precision, device):
            loss = _loss_of(model(ids), ids)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    recorder = _OpRecorder(device)
    losses = []
    for i in range(warmup):
        if i == 0:
            # The first warm-up step names the attention ops that really ran, at no cost to the timed steps.
            try:
                with recorder.record():
                    losses.append(step())
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                if "profiler" not in str(exc).lower():
                    raise
                losses.append(step())  # a profiler that cannot start (CUPTI busy): measure without it
        else:
            losses.append(step())
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
    e0 = energy.read_mj() if energy is not None else None
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - t0)
    e1 = energy.read_mj() if energy is not None else None

    row: dict[str, Any] = {"oom": False, "tokens": tokens, "losses": losses,
                           "params": sum(p.numel() for p in model.parameters()),
                           "attention_ops": recorder.ops if recorder.ops is not None else "unknown (no warm-up step)"}
    if "throughput" in metrics:
        med = statistics.median(times)
        row.update(step_s_median=med, step_s_all=times, tokens_per_s=tokens / med,
                   time_kind="cuda-synchronized perf_counter" if device.type == "cuda" else "CPU wall time")
    if "memory" in metrics:
        if device.type == "cuda":
            host = torch.cuda.host_memory_stats().get("allocated_bytes.all.peak") \
                if hasattr(torch.cuda, "host_memory_stats") else None
            row.update(memory_kind="cuda peak over the timed steps incl. the optimizer step",
                       peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
                       peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
                       pinned_host_peak_bytes=None if host is None else int(host))
        else:
            row.update(_device_independent_memory(model, ids, opt, precision, device))
    if "energy" in metrics:
        if e0 is None or e1 is None:
            row.update(energy_available=False, energy_reason=energy.reason)
        else:
            joules = (e1 - e0) / 1000.0
            row.update(energy_available=True, energy_j_per_step=joules / steps,
                       energy_j_per_token=joules / (steps * tokens), energy_source="NVML total energy counter")
    return row


def _device_independent_memory(model, ids, opt, precision, device) -> dict[str, Any]:
    """Bytes the forward leaves for the backward, from one extra (untimed) step: what autograd saves, and every
    tensor alive after the forward less what was alive before it (catches tensors stashed on ``ctx``)."""
    from .memory import live_tensor_bytes, saved_tensor_bytes

    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    before = live_tensor_bytes(exclude=params)
    # The hooks keep each saved tensor as a Python object, so the live count below sees what C++ autograd
    # nodes hold too (a baseline's own hooks, checkpoint's or offload's, take precedence inside it).
    with saved_tensor_bytes(exclude=params) as saved:
        with _autocast(precision, device):
            loss = _loss_of(model(ids), ids)
        live = live_tensor_bytes(exclude=params) - before
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    state = sum(p.numel() * p.element_size() for p in params)
    if opt is not None:
        state += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor))
    return {"memory_kind": "device-independent bytes after the forward (CPU)", "saved_bytes": int(saved["bytes"]),
            "live_bytes": int(live), "param_and_optimizer_bytes": int(state)}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_spec_cell(cell: Mapping[str, Any]) -> dict[str, Any]:
    """Build the spec's model and measure it (what the child process runs); weights digest included."""
    spec = ModelSpec(**cell["spec"])
    model = build_model(spec, cell["seq"])
    digest = weights_digest(model)
    row = measure(model, cell["seq"], cell["batch"], steps=cell["steps"], warmup=cell["warmup"],
                  device=cell["device"], metrics=cell["metrics"], optimizer=cell["optimizer"],
                  precision=cell["precision"], seed=cell.get("seed", 0))
    row["weights_sha256"] = digest
    opts = options(model.config)
    row["attention"] = ("reference matmul attention" if opts.attention == "reference" else
                        "SDPA, fused backends allowed" if opts.use_flash_attention else "SDPA pinned to math")
    return row


def _child_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """A cell's row from its child process: the JSON on its last stdout line, or what went wrong."""
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if proc.returncode == -9:  # the kernel's OOM killer sends SIGKILL: host memory ran out
        return {"oom": True, "oom_message": "process killed by SIGKILL (host out of memory, most likely)"}
    tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    return {"oom": False, "error": f"cell exited with code {proc.returncode}: {tail}"}


# --- results ----------------------------------------------------------------------------------------------
def environment(command: str | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Device, versions and the command, for every result file."""
    device = device or default_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} torch threads"
    try:
        version = metadata.version("revnet-zero")
    except metadata.PackageNotFoundError:
        version = None
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(), "revnet_zero": version,
            "command": command or shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "data": "uniform random token ids (no corpus)", "corpus_sha256": None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class BenchmarkResults(list):
    """The rows of a run (one dict per model x length) with ``environment`` and ``settings`` attached."""

    def __init__(self, rows: Iterable[dict] = (), environment: dict | None = None, settings: dict | None = None):
        super().__init__(rows)
        self.environment = dict(environment or {})
        self.settings = dict(settings or {})

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "settings": self.settings, "rows": list(self)}

    def to_json(self, path) -> str:
        """Write the results as JSON (atomically); returns the path."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, path) -> "BenchmarkResults":
        with open(path) as f:
            raw = json.load(f)
        return cls(raw["rows"], raw.get("environment"), raw.get("settings"))

    def table(self) -> str:
        """A plain-text table: model, batch, length, memory, step time, throughput, energy."""
        cols = ("model", "batch", "seq", "memory", "step s", "tokens/s", "J/token")
        body = []
        for r in self:
            if r.get("oom"):
                cells = ["OOM"] + [""] * 3
            elif r.get("error"):
                cells = ["ERROR"] + [""] * 3
            else:
                cells = [_memory_text(r),
                         f"{r['step_s_median']:.4f}" if "step_s_median" in r else "-",
                         f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
                         f"{r['energy_j_per_token']:.3g}" if r.get("energy_available") else "n/a"]
            body.append([str(r["model"]), str(r["batch"]), str(r["seq"])] + cells)
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
        env = self.environment
        if env:
            lines.append(f"device: {env.get('device')}; torch {env.get('torch')}; python {env.get('python')}")
        notes = sorted({r.get("memory_kind") for r in self if r.get("memory_kind")})
        lines += [f"memory: {n}" for n in notes]
        reasons = sorted({r.get("energy_reason") for r in self if r.get("energy_reason")})
        lines += [f"energy unavailable: {n}" for n in reasons]
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _memory_text(r: dict) -> str:
    if "peak_allocated_bytes" in r:
        return f"{_fmt_bytes(r['peak_allocated_bytes'])} (res {_fmt_bytes(r['peak_reserved_bytes'])})"
    if "live_bytes" in r:
        return f"{_fmt_bytes(r['live_bytes'])} (saved {_fmt_bytes(r['saved_bytes'])})"
    return "-"


def memory_value(row: dict) -> float | None:
    """The row's headline memory in bytes: CUDA peak allocated, or on CPU the live bytes after the forward."""
    for key in ("peak_allocated_bytes", "live_bytes"):
        if row.get(key) is not None:
            return float(row[key])
    return None


# --- the suite --------------------------------------------------------------------------------------------
class BenchmarkSuite:
    """Runs models over sequence lengths. ``config``: ModelConfig fields of the built-in models (merged over
    DEFAULT_CONFIG); ``seed``: their shared weights and the token ids; ``timeout``: seconds a subprocess cell
    may run before it becomes an error row; ``verbose``: a line on stderr per finished cell."""

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0, timeout: float | None = None,
                 verbose: bool = False):
        self.config = {**DEFAULT_CONFIG, **dict(config or {})}
        config_of(self.config)
        self.seed = seed
        self.timeout = timeout
        self.verbose = verbose

    def run(self, models: Mapping[str, Any], sequence_lengths: Sequence[int], batch_sizes: Sequence[int] | int = 1,
            metrics: Sequence[str] = METRICS, steps: int = 3, warmup: int = 1, device: str | None = None,
            optimizer: str | None = "adamw", precision: str = "auto", command: str | None = None,
            save_to=None) -> BenchmarkResults:
        """Measure every model at every length (batch ``batch_sizes[i]`` at ``sequence_lengths[i]``, or one batch
        size for all). A model is an ``nn.Module`` (run in this process, its weights restored before each cell),
        a built-in name of SPEC_KINDS, a dict ``{"kind", "config", "seed"}`` or a ModelSpec (each cell in a
        subprocess of its own, except on the CPU without a ``timeout``: see the module docstring). ``save_to``: a JSON path rewritten after every cell, so a run cut short keeps
        what it measured."""
        lengths, batches = _check_lengths(sequence_lengths, batch_sizes)
        metrics = list(metrics)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ConfigError(f"metrics {bad or metrics} must be a non-empty list of {list(METRICS)}")
        for name, value in (("steps", steps), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
                raise ConfigError(f"{name}={value!r} must be an integer >= {1 if name == 'steps' else 0}")
        optimizer = "none" if optimizer is None else optimizer
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={optimizer!r} is not one of {list(OPTIMIZERS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
        if not models:
            raise ConfigError("models is empty: give at least one model")
        specs = {name: _as_spec(value, self.config, self.seed) for name, value in models.items()}
        try:
            dev = torch.device(device) if device is not None else default_device()
        except RuntimeError as exc:
            raise ConfigError(f"device={device!r} is not a torch device: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__})")
        env = environment(command, dev)
        settings = {"metrics": metrics, "steps": steps, "warmup": warmup, "optimizer": optimizer,
                    "precision": precision, "seed": self.seed, "config": self.config,
                    "sequence_lengths": lengths, "batch_sizes": batches}
        rows, initial = [], {}
        for seq, batch in zip(lengths, batches):
            for name, value in models.items():
                spec = specs[name]
                base = {"model": name, "seq": seq, "batch": batch}
                if spec is None:
                    # Every cell starts from the weights the model came with, not from the last cell's steps.
                    if name not in initial:
                        initial[name] = {k: v.detach().to("cpu", copy=True) for k, v in value.state_dict().items()}
                    else:
                        value.load_state_dict(initial[name])
                    base.update(implementation=f"in-process nn.Module {type(value).__name__}",
                                weights_sha256=weights_digest(value))
                    torch.manual_seed(self.seed)
                    res = measure(value, seq, batch, steps=steps, warmup=warmup, device=dev, metrics=metrics,
                                  optimizer=optimizer, precision=precision, seed=self.seed)
                else:
                    cell = {"spec": spec.to_dict(), "seq": seq, "batch": batch, "steps": steps, "warmup": warmup,
                            "device": str(dev), "metrics": metrics, "optimizer": optimizer, "precision": precision,
                            "seed": self.seed}
                    here = dev.type == "cpu" and self.timeout is None
                    res = run_spec_cell(cell) if here else self._run_child(cell)
                    base.update(implementation=f"built-in {spec.kind} ({'in-process' if here else 'subprocess'})",
                                spec=spec.to_dict())
                rows.append({**base, **res})
                if save_to is not None:
                    BenchmarkResults(rows, env, settings).to_json(save_to)
                if self.verbose:
                    r = rows[-1]
                    shown = "OOM" if r.get("oom") else "ERROR" if r.get("error") else \
                        f"{_memory_text(r)}  {r.get('step_s_median', float('nan')):.4f} s"
                    print(f"  {name:>12} {seq:>9} x {batch}: {shown}", file=sys.stderr, flush=True)
        return BenchmarkResults(rows, env, settings)

    def _run_child(self, cell: dict) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "revnet_torch.bench", "--cell", json.dumps(cell)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"oom": False, "error": f"cell timed out after {self.timeout} s"}
        return _child_result(proc)

    def plot_results(self, results: BenchmarkResults, path) -> str:
        """A PNG of memory and throughput against sequence length, one line per model; OOM cells marked x."""
        return plot_results(results, path)


def _check_lengths(sequence_lengths, batch_sizes) -> tuple[list[int], list[int]]:
    lengths = list(sequence_lengths)
    if not lengths or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in lengths):
        raise ConfigError(f"sequence_lengths={lengths!r} must be a non-empty list of integers >= 2 "
                          "(a next-token loss needs two tokens)")
    batches = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if len(batches) == 1:
        batches = batches * len(lengths)
    if len(batches) != len(lengths):
        raise ConfigError(f"got {len(batches)} batch sizes for {len(lengths)} sequence lengths: give one per "
                          "length, or one for all")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ConfigError(f"batch_sizes={batches!r} must be positive integers")
    return lengths, batches


def _length_text(n: int) -> str:
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def plot_results(results: BenchmarkResults, path) -> str:
    """A PNG of memory and throughput against sequence length, one line per model; OOM cells marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in results))
    cuda = any("peak_allocated_bytes" in r for r in results)
    for i, name in enumerate(models):
        color = f"C{i}"
        rows = sorted((r for r in results if r["model"] == name), key=lambda r: r["seq"])
        ok = [r for r in rows if not r.get("oom") and not r.get("error")]
        mem = [(r["seq"], memory_value(r) / 2**20) for r in ok if memory_value(r) is not None]
        tps = [(r["seq"], r["tokens_per_s"]) for r in ok if "tokens_per_s" in r]
        if mem:
            ax_mem.plot(*zip(*mem), "o-", color=color, label=name)
        if tps:
            ax_tps.plot(*zip(*tps), "o-", color=color, label=name)
        # OOM cells sit on the axis floor so they show where a model stopped fitting.
        for r in rows:
            if r.get("oom"):
                for ax in (ax_mem, ax_tps):
                    ax.plot([r["seq"]], [0], "x", color=color, markersize=10, mew=2, clip_on=False,
                            label=f"{name}: out of memory" if ax is ax_mem else None)
                    ax.annotate("OOM", (r["seq"], 0), textcoords="offset points", xytext=(4, 6), color=color,
                                fontsize=8, annotation_clip=False)
    lengths = sorted({r["seq"] for r in results})
    for ax in (ax_mem, ax_tps):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_text(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_mem.set_ylabel("peak allocated (MiB)" if cuda else "live bytes after forward (MiB)")
    ax_tps.set_ylabel("tokens / s (median step)")
    ax_mem.set_title("memory" + ("" if cuda else " (device-independent count)"))
    ax_tps.set_title("throughput" + ("" if cuda else " (CPU wall time)"))
    ax_mem.legend(fontsize=8)
    env = getattr(results, "environment", {}) or {}
    if env:
        fig.suptitle(f"{env.get('device')} - torch {env.get('torch')}", fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="one benchmark cell (launched by BenchmarkSuite)")
    ap.add_argument("--cell", required=True, help="the cell as JSON")
    args = ap.parse_args(argv)
    print(json.dumps(run_spec_cell(json.loads(args.cell))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
