"""The ``revnet`` command: ``train``, ``bench``, ``info``, ``plugins``.

Importing this module imports no framework: settings, data and the model config are checked here, in the
framework-free core, and only then is the chosen backend's ``trainer`` module imported (the sibling module
``trainer`` of the package that registered the backend; every backend package has the same module names).
Errors a user can fix print one line, ``revnet: error: ...``, and exit with code 2; no traceback.

A subcommand is a ``(add_arguments, run)`` pair in ``SUBCOMMANDS``; a new one (``bench``) slots in there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import registry as registry_module
from .config import POLICIES, ModelConfig
from .errors import ConfigError, RevNetError

EXIT_USAGE = 2  # argparse's code for bad flags; we use it for every error the user can fix
EXIT_INTERRUPTED = 130

# Named model shapes (--size); explicit --layers/--d-model/--heads override them.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 2, "d_model": 64, "num_heads": 2},
    "small": {"num_layers": 4, "d_model": 128, "num_heads": 4},  # the default: a few minutes on a laptop CPU
    "base": {"num_layers": 6, "d_model": 256, "num_heads": 4},  # the accuracy-parity size
    "medium": {"num_layers": 12, "d_model": 512, "num_heads": 8},
    "large": {"num_layers": 24, "d_model": 1024, "num_heads": 16},  # the seed model's shape (byte vocab)
}


def _opt(default, help: str, kind=None, choices=None, flag: str | None = None, nargs=None, metavar=None):
    return field(default=default, metadata={"help": help, "kind": kind or type(default), "choices": choices,
                                            "flag": flag, "nargs": nargs, "metavar": metavar})


@dataclass
class TrainSettings:
    """Everything ``revnet train`` takes; the same names are the keys of a ``--config`` TOML file."""

    backend: str = _opt("torch", "backend to train with (see `revnet info`)")
    size: str = _opt("small", "named model shape", choices=tuple(PRESETS))
    layers: int | None = _opt(None, "number of reversible layers (overrides --size)", kind=int)
    d_model: int | None = _opt(None, "model width (overrides --size)", kind=int)
    heads: int | None = _opt(None, "attention heads (overrides --size)", kind=int)
    d_ff: int | None = _opt(None, "feed-forward width (default 4 x d_model)", kind=int)
    coupling: str = _opt("additive", "coupling name (built-ins: additive, affine; plugins add more)")
    max_seq_len: int | None = _opt(None, "the model's longest sequence (default: --seq-len)", kind=int)
    seq_len: int = _opt(256, "tokens (bytes) per training sequence")
    steps: int = _opt(200, "optimizer steps in all (a resumed run may ask for more)")
    batch_size: int = _opt(8, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    warmup: int | None = _opt(None, "warmup steps (default: min(100, steps/10))", kind=int)
    min_lr_ratio: float = _opt(0.1, "the cosine schedule ends at lr x this")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 turns clipping off")
    precision: str = _opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    policy: str = _opt("reverse", "memory policy: reverse | store | checkpoint, or one per layer, comma-separated")
    scheduler: str | None = _opt(None, "memory scheduler strategy that picks the policies at every forward "
                                 "(overrides --policy)", kind=str, choices=("adaptive", "aggressive", "balanced"))
    task: str = _opt("lm", "lm: byte-level language modelling; passkey: synthetic long-range retrieval",
                     choices=("lm", "passkey"))
    passkey_digits: int = _opt(5, "digits of the passkey (--task passkey)")
    data: list | None = _opt(None, "text files or folders to train on instead of the embedded corpus",
                             kind=str, nargs="+", metavar="PATH")
    eval_every: int = _opt(50, "steps between held-out evaluations (and at the end)")
    eval_windows: int = _opt(64, "held-out sequences per evaluation")
    checkpoint_every: int | None = _opt(None, "steps between checkpoints (one is always written at the end)",
                                        kind=int)
    out: str | None = _opt(None, "output folder (default: runs/<date-time>)", kind=str, metavar="DIR")
    resume: str | None = _opt(None, "continue from a checkpoint file or run folder (no value: the --out folder)",
                              kind=str, nargs="?", metavar="PATH")
    seed: int = _opt(0, "seed of the model init and the data order")
    device: str = _opt("auto", "auto (GPU when present), cpu, cuda, cuda:1, ...")
    progress: bool = _opt(True, "progress bar", flag="--no-progress")
    plot: bool = _opt(True, "PNG plot of loss and memory at the end", flag="--no-plot")

    # --- derived ---------------------------------------------------------------------------------------
    @property
    def policies(self) -> list[str] | None:
        """One policy per layer when ``policy`` is a comma-separated list, else None."""
        return [p.strip() for p in self.policy.split(",")] if "," in self.policy else None

    def model_config(self) -> ModelConfig:
        """The ModelConfig these settings describe (validated; byte vocabulary)."""
        shape = dict(PRESETS[self.size])
        for key, name in (("num_layers", "layers"), ("d_model", "d_model"), ("num_heads", "heads")):
            if getattr(self, name) is not None:
                shape[key] = getattr(self, name)
        max_seq_len = self.max_seq_len if self.max_seq_len is not None else self.seq_len
        if self.seq_len > max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} is larger than max_seq_len={max_seq_len}")
        return ModelConfig(**shape, d_ff=self.d_ff, vocab_size=256, max_seq_len=max_seq_len, coupling=self.coupling,
                           policy="reverse" if self.policies else self.policy)

    def validate(self) -> None:
        """ConfigError naming the first bad setting."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, choices = f.metadata["kind"], f.metadata["choices"]
            if value is None:
                if f.default is not None:
                    raise ConfigError(f"{f.name} must be set")
                continue
            if f.name == "data":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"data must be a list of paths, got {value!r}")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name}={value!r} must be of type {kind.__name__}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not one of {list(choices)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows", "seq_len", "passkey_digits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be a positive integer")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup} must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 turns clipping off)")
        policies = self.policies or [self.policy]
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            raise ConfigError(f"policy {bad[0]!r} is not one of {list(POLICIES)}")
        config = self.model_config()
        if self.policies and len(self.policies) != config.num_layers:
            raise ConfigError(f"got {len(self.policies)} policies for {config.num_layers} layers")
        if self.data is not None and self.task != "lm":
            raise ConfigError(f"--data is for --task lm; the {self.task} task makes its own data")

    @property
    def clip_norm(self) -> float | None:
        return self.max_grad_norm or None


def settings_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainSettings)}


def load_config_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file (top level or a ``[train]`` table); unknown keys raise ConfigError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    if "train" in raw and isinstance(raw["train"], dict):
        extra = sorted(k for k in raw if k != "train")
        if extra:
            raise ConfigError(f"config file {path!r}: keys {extra} lie outside the [train] table")
        raw = raw["train"]
    known = settings_fields()
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path!r}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if name == "data" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


def build_settings(args: argparse.Namespace) -> TrainSettings:
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_config_file(config_path))
    for name in settings_fields():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    settings = TrainSettings(**values)
    settings.validate()
    return settings


def _resolve_out(settings: TrainSettings) -> None:
    # --resume with no value continues the --out folder; --resume PATH writes next to that checkpoint.
    if settings.resume == "":
        if settings.out is None:
            raise ConfigError("--resume without a path needs --out DIR (the run folder to continue)")
        settings.resume = settings.out
    if settings.resume is not None and not Path(settings.resume).exists():
        raise ConfigError(f"nothing to resume at {settings.resume!r}")
    if settings.out is None:
        if settings.resume is not None:
            p = Path(settings.resume)
            settings.out = os.fspath(p if p.is_dir() else p.parent)
        else:
            base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
            out, n = base, 1
            while out.exists():
                n += 1
                out = base.with_name(f"{base.name}-{n}")
            settings.out = os.fspath(out)


def make_data(settings: TrainSettings):
    """The TrainingData of these settings, built in the core (no framework)."""
    if settings.task == "passkey":
        from .tasks import passkey_data

        return passkey_data(settings.seq_len, settings.batch_size, settings.seed, settings.eval_windows,
                            settings.passkey_digits)
    from .data import file_corpus, lm_data, stdlib_corpus

    corpus = file_corpus(settings.data) if settings.data else stdlib_corpus()
    return lm_data(corpus, settings.seq_len, settings.batch_size, settings.seed, settings.eval_windows)


def backend_module_name(backend: str, module: str) -> str:
    """The import name of ``module`` (e.g. "trainer") in the package that registered ``backend``, checked to
    exist without importing it (so no framework is imported before the settings and data are checked)."""
    entry = registry_module.registry().backends.get(backend)
    if entry is None:
        registry_module.get_backend(backend)  # raises UnknownNameError listing the installed backends
    owner = getattr(entry.obj, "__module__", "") or ""
    package = owner.rpartition(".")[0]
    if not package:
        raise ConfigError(f"backend {backend!r} was registered by {owner!r}, which is not inside a package; "
                          f"it has no {module} module")
    name = f"{package}.{module}"
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"backend {backend!r} has no {module} module ({name} not found)")
    return name


# --- train -------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="settings file; flags given here override it")
    for name, f in settings_fields().items():
        meta = f.metadata
        flag = meta["flag"] or "--" + name.replace("_", "-")
        helptext = meta["help"]
        if meta["kind"] is bool:
            parser.add_argument(flag, dest=name, action="store_false", default=argparse.SUPPRESS, help=f"no {helptext}")
            continue
        default = "" if name == "resume" else None
        if f.default is not None and "default" not in helptext:
            helptext += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": helptext,
                                  "metavar": {int: "N", float: "X"}.get(meta["kind"], "NAME")}
        if meta["nargs"] == "?":
            kwargs.update(nargs="?", const=default)
        elif meta["nargs"]:
            kwargs["nargs"] = meta["nargs"]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
            del kwargs["metavar"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        kwargs["type"] = meta["kind"]
        parser.add_argument(flag, **kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    _resolve_out(settings)
    trainer_name = backend_module_name(settings.backend, "trainer")  # an unknown backend fails before the data
    data = make_data(settings)  # bad data fails before a framework is imported
    trainer = importlib.import_module(trainer_name)
    config = settings.model_config()
    d = data.identity
    source = f"{d['source']}" + (f" (Python {d['python_version']}, sha256 {d['sha256'][:12]})" if "sha256" in d else "")
    print(f"revnet train: {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
          f"seq_len {settings.seq_len}, {settings.steps} steps, task {settings.task}, data {source}, "
          f"out {settings.out}", file=sys.stderr)
    summary = trainer.run(settings, data)
    _print_summary(settings, summary)
    if summary.get("stopped"):
        again = _without_run_folder(args._argv or []) + ["--resume", settings.out]
        print(f"stopped at step {summary['step']} of {summary['steps']}; continue with:\n  revnet {shlex.join(again)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _without_run_folder(argv: list[str]) -> list[str]:
    """``argv`` less its --out and --resume flags (and their values)."""
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token in ("--out", "--resume"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = token == "--out" or (nxt is not None and not nxt.startswith("-"))
            continue
        if token.startswith(("--out=", "--resume=")):
            continue
        out.append(token)
    return out


def _print_summary(settings: TrainSettings, summary: dict[str, Any]) -> None:
    lines = [f"step {summary['step']}/{summary['steps']}  train loss {summary['loss']:.4f}  "
             f"params {summary.get('params', 0) / 1e6:.2f}M  device {summary['device']}  {summary['precision']}"]
    ev = summary.get("eval") or {}
    if ev:
        parts = [f"held-out loss {ev['eval_loss']:.4f}"]
        if "eval_bits_per_byte" in ev:
            parts.append(f"bits per byte {ev['eval_bits_per_byte']:.4f}")
        if "eval_accuracy" in ev:
            parts.append(f"passkey accuracy {ev['eval_accuracy']:.3f} (digits {ev['eval_token_accuracy']:.3f})")
        lines.append("  ".join(parts))
    for key in ("checkpoint", "log", "plot", "result"):
        if key in summary.get("paths", {}):
            lines.append(f"{key:>10}: {summary['paths'][key]}")
    print("\n".join(lines))


# --- bench -------------------------------------------------------------------------------------------
# The built-in models of the backends' ``bench`` module (revnet_torch.bench.SPEC_KINDS; a test keeps the two
# in step), named here so a bad name fails before a framework is imported.
BENCH_MODELS = ("plain", "checkpoint", "offload", "reversible")
BENCH_METRICS = ("memory", "throughput", "energy")


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--backend", default="torch", metavar="NAME", help="backend whose bench module runs the cells (default: torch)")
    a("--models", default="plain,checkpoint,reversible", metavar="LIST",
      help=f"comma-separated, of {', '.join(BENCH_MODELS)} (default: plain,checkpoint,reversible)")
    a("--seq", default="128,256", metavar="LIST", help="sequence lengths, comma-separated; 4k = 4096 (default: 128,256)")
    a("--batch", default="1", metavar="LIST", help="one batch size, or one per length (default: 1)")
    a("--layers", type=int, default=2, metavar="N", help="layers (default: 2)")
    a("--d-model", type=int, default=64, metavar="N", help="model width (default: 64)")
    a("--heads", type=int, default=2, metavar="N", help="attention heads (default: 2)")
    a("--d-ff", type=int, default=None, metavar="N", help="feed-forward width (default: 4 x d_model)")
    a("--vocab", type=int, default=256, metavar="N", help="vocabulary size (default: 256; the seed model: 50257)")
    a("--activation", default="gelu", metavar="NAME", help="FFN activation (default: gelu)")
    a("--steps", type=int, default=3, metavar="N", help="timed steps per cell; time is their median (default: 3)")
    a("--warmup", type=int, default=1, metavar="N", help="untimed steps before them (default: 1)")
    a("--metrics", default=",".join(BENCH_METRICS), metavar="LIST", help="of memory, throughput, energy (default: all)")
    a("--optimizer", default="adamw", choices=("adamw", "sgd", "none"), help="stepped in every step (default: adamw)")
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"),
      help="auto: bf16 autocast on GPU, fp32 on CPU (default: auto)")
    a("--device", default="auto", metavar="NAME", help="auto (GPU when present), cpu, cuda, cuda:1 (default: auto)")
    a("--seed", type=int, default=0, metavar="N", help="seed of the weights (shared by every model) and the ids")
    a("--timeout", type=float, default=None, metavar="S", help="seconds a cell may run before it is an error row")
    a("--out", default=None, metavar="DIR", help="folder for bench.json and bench.png (default: runs/bench-<date-time>)")
    a("--no-plot", dest="plot", action="store_false", help="no PNG")


def _int_list(text: str, flag: str, minimum: int) -> list[int]:
    values = []
    for token in text.split(","):
        t = token.strip().lower()
        scale = 1
        if t.endswith("k"):
            t, scale = t[:-1], 1024
        elif t.endswith("m"):
            t, scale = t[:-1], 1024 * 1024
        if not t.isdigit() or int(t) * scale < minimum:
            raise ConfigError(f"{flag} {text!r}: {token.strip()!r} is not an integer >= {minimum} "
                              f"(give a comma-separated list such as 1024,4096 or 4k,16k)")
        values.append(int(t) * scale)
    return values


def _name_list(text: str, flag: str, known: tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    for name in names:
        if name not in known:
            raise ConfigError(f"{flag}: unknown name {name!r}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {text!r} names a model twice")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    models = _name_list(args.models, "--models", BENCH_MODELS)
    lengths = _int_list(args.seq, "--seq", 2)  # the next-token loss needs two tokens
    batches = _int_list(args.batch, "--batch", 1)
    metrics = _name_list(args.metrics, "--metrics", BENCH_METRICS)
    if len(batches) not in (1, len(lengths)):
        raise ConfigError(f"--batch gives {len(batches)} sizes for {len(lengths)} lengths: give one, or one per length")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < minimum:
            raise ConfigError(f"{flag}={value} must be >= {minimum}")
    if args.device != "auto" and not (args.device == "cpu" or args.device.split(":")[0] == "cuda"
                                      and args.device.partition(":")[2] in ("", *map(str, range(64)))):
        raise ConfigError(f"--device {args.device!r} is not auto, cpu, cuda or cuda:N")
    config = {"num_layers": args.layers, "d_model": args.d_model, "num_heads": args.heads, "d_ff": args.d_ff,
              "vocab_size": args.vocab, "activation": args.activation}
    ModelConfig.from_kwargs(**config, max_seq_len=max(lengths))  # a bad shape fails before torch is imported
    bench_name = backend_module_name(args.backend, "bench")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    bench = importlib.import_module(bench_name)
    command = "revnet " + shlex.join(getattr(args, "_argv", None) or ["bench"])
    print(f"revnet bench: {', '.join(models)} at {', '.join(map(str, lengths))} tokens; {args.layers} layers, "
          f"d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}; one subprocess per cell", file=sys.stderr)
    suite = bench.BenchmarkSuite(config=config, seed=args.seed, timeout=args.timeout, verbose=True)
    results = suite.run(models={m: m for m in models}, sequence_lengths=lengths, batch_sizes=batches,
                        metrics=metrics, steps=args.steps, warmup=args.warmup,
                        device=None if args.device == "auto" else args.device, optimizer=args.optimizer,
                        precision=args.precision, command=command, save_to=out / "bench.json")
    print(results.table())
    print(f"      json: {results.to_json(out / 'bench.json')}")
    if args.plot:
        print(f"      plot: {suite.plot_results(results, out / 'bench.png')}")
    failed = [r for r in results if r.get("error")]
    for r in failed:
        print(f"revnet: error: {r['model']} at {r['seq']} tokens: {r['error'].splitlines()[-1][:300]}", file=sys.stderr)
    return 1 if failed else 0


# --- info / plugins ------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _device_line() -> str:
    if importlib.util.find_spec("torch") is None:
        return f"CPU ({platform.machine()}); torch not installed, no GPU probe"
    import torch  # only here: `revnet info` is allowed to look at the hardware

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA: {', '.join(names)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def plugin_rows() -> list[dict[str, str]]:
    """The registry's listing (``registry.describe()``): a row per backend, coupling and kernel, then one per
    failed plugin; keys kind, name, plugin, distribution, reason. Built here where the registry has none."""
    describe = getattr(registry_module, "describe", None)
    if callable(describe):
        return list(describe())
    reg = registry_module.registry()
    rows = []
    for kind, entries in (("backend", reg.backends.values()), ("coupling", reg.couplings.values()),
                          ("kernel", reg.kernels)):
        rows += [dict(kind=kind, name=e.name, plugin=e.plugin, distribution=e.distribution, reason="")
                 for e in sorted(entries, key=lambda e: e.name)]
    rows += [dict(kind="failed", name=p, plugin=p, distribution="", reason=why) for p, why in sorted(reg.failures.items())]
    return rows


def _table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> list[str]:
    widths = {c: max([len(c)] + [len(str(r.get(c, "") or "-")) for r in rows]) for c in columns}
    lines = ["  " + "  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for r in rows:
        lines.append("  " + "  ".join(str(r.get(c, "") or "-").ljust(widths[c]) for c in columns).rstrip())
    return lines


def _plugin_lines() -> list[str]:
    rows = plugin_rows()
    if not rows:
        return ["  none"]
    columns = ("kind", "name", "plugin", "distribution") + (("reason",) if any(r.get("reason") for r in rows) else ())
    return _table(rows, columns)


def _kernel_lines() -> list[str]:
    by_device: dict[str, list[str]] = {}
    for entry in registry_module.registry().kernels:
        k = entry.obj
        devices = getattr(k, "devices", None) or getattr(k, "device", None) or "*"
        devices = [devices] if isinstance(devices, str) else sorted(devices)
        dtypes = getattr(k, "dtypes", None)
        detail = "" if not dtypes or "*" in dtypes else f" ({', '.join(sorted(dtypes))})"
        for dev in devices:
            by_device.setdefault("any device" if dev == "*" else dev, []).append(entry.name + detail)
    if not by_device:
        return ["  none registered (the backends use their framework's own kernels)"]
    return [f"  {dev}: {', '.join(sorted(names))}" for dev, names in sorted(by_device.items())]


def cmd_info(args: argparse.Namespace) -> int:
    rows = plugin_rows()
    versions = {"revnet-zero": _version("revnet-zero"), "python": platform.python_version(),
                "torch": _version("torch"), "jax": _version("jax"), "triton": _version("triton")}
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))
    print(f"device: {_device_line()}")
    for kind in ("backend", "coupling"):
        names = [f"{r['name']} ({r['distribution'] or r['plugin']})" for r in rows if r["kind"] == kind]
        print(f"{kind}s: {', '.join(names) or 'none'}")
    print("kernels by device:")
    print("\n".join(_kernel_lines()))
    print("plugins:")
    print("\n".join(_plugin_lines()))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps(plugin_rows(), indent=2))
        return 0
    print("plugins:")
    print("\n".join(_plugin_lines()))
    return 0


def _add_plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable listing")


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a reversible LM (no arguments: a small model on the embedded corpus)", add_train_arguments,
              cmd_train),
    "bench": ("training-step memory, time and energy of built-in models (one subprocess per cell)",
              _add_bench_arguments, cmd_bench),
    "info": ("installed backends, couplings, kernels, plugins, versions and the device", lambda p: None, cmd_info),
    "plugins": ("the plugins and what each registered", _add_plugins_arguments, cmd_plugins),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="revnet", description="RevNet-Zero: reversible transformers for "
                                     "long-context training.")
    parser.add_argument("--version", action="version", version=f"revnet-zero {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (helptext, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``revnet`` and ``python -m revnet_core``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message already
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args._argv = argv
    try:
        return args.func(args)
    except RevNetError as exc:
        print(f"revnet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("revnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `revnet info | head`: the reader left; nothing more to say
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # a folder we cannot write, a disk that is full: the message says which
        print(f"revnet: error: {exc}", file=sys.stderr)
        return 1
