"""The ``revnet`` command: ``train``, ``bench``, ``generate``, ``info``, ``plugins``.

Importing this module imports no framework: settings, data and the model config are checked in the
framework-free core, and only then does a command load what it needs from the backend's record
(``revnet_core.registry.BackendRecord``: its trainer, bench, device probe). A backend without that part
gets a one-line error naming it. Errors a user can fix print one line, ``revnet: error: ...``, and exit
with code 2; no traceback.

A subcommand is a ``(add_arguments, run)`` pair in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from revnet_core import registry as registry_module
from revnet_core.config import ModelConfig
from revnet_core.errors import ConfigError, RevNetError
from revnet_core.settings import TrainSettings, make_data

from .cli_settings import build_settings, resolve_out, settings_fields

EXIT_USAGE = 2  # argparse's code for bad flags; we use it for every error the user can fix
EXIT_INTERRUPTED = 130

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
    resolve_out(settings)
    record = registry_module.backend_record(settings.backend)  # an unknown backend fails before the data
    record.require("trainer")  # so does a backend without a trainer
    data = make_data(settings)  # bad data fails before a framework is imported
    trainer = record.load("trainer")
    config = settings.model_config()
    d = data.identity
    if d.get("source") == "token-file":  # its header: how many ids, of what vocabulary
        source = (f"token file {settings.tokens} ({d['tokens']:,} tokens, vocab {d['vocab_size']}, sha256 "
                  f"{d['sha256'][:12]})")
    else:
        source = f"{d['source']}" + (f" (Python {d['python_version']}, sha256 {d['sha256'][:12]})"
                                     if "sha256" in d else "")
    resuming = f"resuming {settings.resume}, " if settings.resume else ""
    print(f"revnet train: {resuming}{config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
          f"seq_len {settings.seq_len}, {settings.steps} steps, task {settings.task}, data {source}, "
          f"out {settings.out}", file=sys.stderr)
    summary = trainer.run(settings, data)
    _print_summary(settings, summary)
    if summary.get("stopped"):
        again = _without_run_folder(args._argv or []) + ["--resume", settings.out]
        print(f"stopped at step {summary['step']} of {summary['steps']}; continue with:\n  revnet {shlex.join(again)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.get("interrupted"):  # Ctrl-C while the last files were written: they were finished first
        print(f"revnet: interrupted after the run's files were written (step {summary['step']} of "
              f"{summary['steps']}, complete)", file=sys.stderr)
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
    loss = "-" if summary["loss"] is None else f"{summary['loss']:.4f}"  # None: stopped before a step finished
    resumed = f"  (resumed from step {summary['resumed_from']})" if summary.get("resumed_from") is not None else ""
    lines = [f"step {summary['step']}/{summary['steps']}{resumed}  train loss {loss}  "
             f"params {summary.get('params', 0) / 1e6:.2f}M  device {summary['device']}  {summary['precision']}"]
    if summary.get("precision") == "fp16":
        lines[0] += f"  overflow steps skipped {summary.get('overflow_steps', 0)}"
    ev = summary.get("eval") or {}
    if ev:
        # After a stop the last evaluation may be older than the last step: say which step it is from.
        parts = [f"held-out loss {ev['eval_loss']:.4f} (step {ev.get('step', summary['step'])})"]
        if "eval_bits_per_byte" in ev:
            parts.append(f"bits per byte {ev['eval_bits_per_byte']:.4f}")
        elif "eval_bits_per_token" in ev:  # a token file's ids are not bytes: no bits per byte to claim
            parts[0] = parts[0].replace("held-out loss", "held-out loss per token")
            parts.append(f"bits per token {ev['eval_bits_per_token']:.4f}")
        if "eval_accuracy" in ev:
            parts.append(f"passkey accuracy {ev['eval_accuracy']:.3f} (digits {ev['eval_token_accuracy']:.3f})")
        lines.append("  ".join(parts))
    for key in ("checkpoint", "log", "plot", "result"):
        if key in summary.get("paths", {}):
            lines.append(f"{key:>10}: {summary['paths'][key]}")
    print("\n".join(lines))

# --- bench -------------------------------------------------------------------------------------------
BENCH_METRICS = ("memory", "throughput", "energy")

def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--backend", default="torch", metavar="NAME", help="backend whose bench module runs the cells (default: torch)")
    a("--models", default="plain,checkpoint,reversible", metavar="LIST",
      help="comma-separated, of the backend's built-in models (torch: plain, checkpoint, offload, reversible; "
      "default: plain,checkpoint,reversible)")
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
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"),  # bench: no loss scaling, so no fp16
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
    record = registry_module.backend_record(args.backend)
    record.require("bench")
    models = _name_list(args.models, "--models", record.bench_models)
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
    out = Path(args.out) if args.out else Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    bench = record.load("bench")
    command = "revnet " + shlex.join(getattr(args, "_argv", None) or ["bench"])
    print(f"revnet bench: {', '.join(models)} at {', '.join(map(str, lengths))} tokens; {args.layers} layers, "
          f"d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}", file=sys.stderr)
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

# --- generate ----------------------------------------------------------------------------------------
def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--checkpoint", required=True, metavar="PATH",
      help="a training checkpoint: runs/NAME/checkpoint.pt or its folder")
    a("--prompt", required=True, metavar="TEXT", help="text to continue (its UTF-8 bytes are the ids)")
    a("--max-new-tokens", type=int, default=200, metavar="N", help="bytes to generate (default: 200)")
    a("--temperature", type=float, default=1.0, metavar="X", help="0: greedy; else softmax(logits / X) (default: 1.0)")
    a("--top-k", type=int, default=None, metavar="N", help="draw from the N most likely only (default: all)")
    a("--seed", type=int, default=0, metavar="N", help="seed of the draws (default: 0)")
    a("--device", default="auto", metavar="NAME", help="auto (GPU when present), cpu, cuda, cuda:1 (default: auto)")

def cmd_generate(args: argparse.Namespace) -> int:
    # The checks that need no framework come first, so a typo costs no torch import.
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ConfigError(f"--temperature={args.temperature} must be a finite number >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k={args.top_k} must be >= 1")
    path = Path(args.checkpoint)
    if not (path.is_file() or (path / "checkpoint.pt").is_file()):
        raise ConfigError(f"--checkpoint {args.checkpoint!r}: no such checkpoint file (or folder holding "
                          "checkpoint.pt)")
    from revnet_torch.generate import generate_text, load_for_inference  # checkpoints are torch's (issue 19)

    model = load_for_inference(path, args.device)
    text = generate_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed)
    print(text)
    return 0

# --- info / plugins ------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None

def _device_lines() -> list[str]:
    """One line per installed backend with a device probe; the probe imports its framework (``revnet info``
    is allowed to look at the hardware), and a backend whose framework is missing says so."""
    lines = []
    for name in registry_module.backends_with("memory"):
        try:
            line = registry_module.backend_record(name).load("memory").describe_devices()
        except ImportError as exc:
            line = f"not available ({exc.name or exc} not installed)"
        except Exception as exc:  # a broken driver must not hide the rest of the listing
            line = f"probe failed: {type(exc).__name__}: {exc}"
        lines.append(f"  {name}: {line}")
    return lines or [f"  CPU ({platform.machine()}); no backend has a device probe"]

def plugin_rows() -> list[dict[str, str]]:
    """The registry's listing (``registry.describe()``): kind, name, plugin, distribution, reason."""
    return registry_module.describe()

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
    print("devices:")
    print("\n".join(_device_lines()))
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
    "bench": ("training-step memory, time and energy of built-in models (a subprocess per cell on a GPU)",
              _add_bench_arguments, cmd_bench),
    "generate": ("continue a prompt with a trained checkpoint (byte-level models; KV cache)",
                 _add_generate_arguments, cmd_generate),
    "info": ("installed backends, couplings, kernels, plugins, versions and the device", lambda p: None, cmd_info),
    "plugins": ("the plugins and what each registered", _add_plugins_arguments, cmd_plugins),
}

def build_parser() -> argparse.ArgumentParser:
    from revnet_core import __version__

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
    """Entry point of ``revnet`` and ``python -m revnet_zero``; returns the exit code."""
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
