"""Accuracy parity: the reversible LM against a plain single-stream GPT of the same width, depth and
parameter count, on the embedded corpus (this Python's standard library, byte-level), same data order,
tokens and LR schedule, several seeds each. Reports held-out bits per byte, mean and spread, and the gap.

    python benchmarks/parity.py --out docs/benchmarks/parity.json          # GPU: 6 layers d256, 1500 steps
    python benchmarks/parity.py --tiny --out runs/parity-tiny.json         # CPU smoke: no tolerance claim
    python benchmarks/parity.py --seeds 0 --out s0.json  (then s1, s2)    # one seed per command, then
    python benchmarks/parity.py --merge s0.json s1.json s2.json --out docs/benchmarks/parity.json

Each (model, seed) run goes in its own subprocess (an out-of-memory or a crash is a result, not the end of
the benchmark) unless ``--in-process``. The JSON names the device, versions, Python version, corpus hash and
the command. The target (issue 3): the reversible model's held-out bits per byte within 1% of the plain one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

MODELS = ("reversible", "plain")
FULL = dict(layers=6, d_model=256, heads=4, seq_len=512, batch_size=16, steps=1500, lr=1e-3, warmup=100,
            eval_windows=512)  # 12.3M training tokens per run; half the held-out bytes per evaluation
TINY = dict(layers=2, d_model=32, heads=2, seq_len=32, batch_size=4, steps=30, lr=3e-3, warmup=3, eval_windows=8)


def model_config(args):
    from revnet_core import ModelConfig

    return ModelConfig(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads, vocab_size=256,
                       max_seq_len=args.seq_len)


def run_one(model_name: str, seed: int, args) -> dict:
    """Train one model for one seed; returns its losses and held-out bits per byte."""
    import torch

    import revnet_core
    from revnet_core.data import lm_data, stdlib_corpus
    from revnet_torch.baselines import PlainGPT
    from revnet_torch.trainer import LongContextTrainer

    config = model_config(args)
    torch.manual_seed(seed)
    model = revnet_core.build("torch", config=config) if model_name == "reversible" else PlainGPT(config, memory="store")
    data = lm_data(stdlib_corpus(), args.seq_len, args.batch_size, seed=seed, eval_windows_max=args.eval_windows)
    trainer = LongContextTrainer(model, max_length=args.seq_len, lr=args.lr, warmup_steps=args.warmup,
                                 precision=args.precision, eval_every=args.eval_every, progress=args.progress,
                                 plot=False, seed=seed)
    t0 = time.perf_counter()
    summary = trainer.fit(data, steps=args.steps)
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.history if r["kind"] == "train"]
    evals = [{"step": r["step"], "bpb": r["eval_bits_per_byte"]} for r in trainer.history if r["kind"] == "eval"]
    return {
        "model": model_name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
        "heldout_bpb": summary["eval"]["eval_bits_per_byte"], "heldout_loss_nats": summary["eval"]["eval_loss"],
        "train_loss_first10": statistics.fmean(losses[:10]), "train_loss_last10": statistics.fmean(losses[-10:]),
        "evals": evals, "wall_s": wall, "peak_mem_bytes": summary["peak_mem_bytes"], "mem_kind": summary["mem_kind"],
        "device": summary["device"], "precision": summary["precision"],
        "tokens": args.steps * args.batch_size * args.seq_len,
    }


def spread(values: list[float]) -> dict:
    n = len(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "sem": std / n ** 0.5, "min": min(values),
            "max": max(values), "values": values}


def summarise(runs: list[dict], tiny: bool) -> dict:
    ok = [r for r in runs if "heldout_bpb" in r]
    by = {m: spread([r["heldout_bpb"] for r in ok if r["model"] == m]) for m in MODELS
          if any(r["model"] == m for r in ok)}
    out: dict = {"heldout_bpb": by}
    if len(by) == 2:
        rev, plain = by["reversible"], by["plain"]
        gap = rev["mean"] - plain["mean"]
        se = (rev["sem"] ** 2 + plain["sem"] ** 2) ** 0.5
        out.update(gap_bpb=gap, gap_percent=100 * gap / plain["mean"],
                   gap_in_standard_errors=gap / se if se else None)
        # The target is "reversible costs no quality": at most 1% worse (a better score also meets it).
        out["no_worse_than_1_percent"] = None if tiny else bool(out["gap_percent"] <= 1.0)
    if tiny:
        out["note"] = "tiny smoke run: no tolerance claim"
    return out


def environment(argv: list[str]) -> dict:
    import torch

    from revnet_core.data import stdlib_corpus

    corpus = stdlib_corpus()
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(),
        "corpus": corpus.identity(),
        "command": shlex.join(["python", "benchmarks/parity.py", *argv]),
    }


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long CPU smoke run (no tolerance claim)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    for key, value in FULL.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value} "
                        f"(tiny: {TINY[key]})")
    ap.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps (default: end only)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", default=None, help="JSON file (default docs/benchmarks/parity.json; tiny: "
                    "runs/parity-tiny.json)")
    ap.add_argument("--in-process", action="store_true", help="run every cell in this process")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the runs of earlier result files (e.g. one "
                    "per seed, each a separate command) into --out, with the summary recomputed")
    ap.add_argument("--cell", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = "runs/parity-tiny.json" if args.tiny else "docs/benchmarks/parity.json"
    return args


def merge(paths: list[str], out: str, argv: list[str]) -> int:
    """One result from several files of the same settings: their runs together, the summary recomputed."""
    parts = [json.load(open(p)) for p in paths]
    keys = ("layers", "d_model", "heads", "seq_len", "batch_size", "steps", "lr", "warmup", "precision")
    settings = [{k: p["settings"][k] for k in keys} for p in parts]
    if any(s != settings[0] for s in settings):
        print(f"cannot merge results of different settings: {settings}", file=sys.stderr)
        return 2
    if len({p["environment"]["corpus"]["sha256"] for p in parts}) != 1:
        print("cannot merge results on different corpora (corpus sha256 differs)", file=sys.stderr)
        return 2
    result = dict(parts[0])
    result["runs"] = [r for p in parts for r in p["runs"]]
    cells = [(r["model"], r["seed"]) for r in result["runs"]]
    if len(set(cells)) != len(cells):
        print(f"the files repeat a (model, seed) run: {sorted(c for c in set(cells) if cells.count(c) > 1)}",
              file=sys.stderr)
        return 2
    result["settings"] = {**parts[0]["settings"], "seeds": sorted({r["seed"] for r in result["runs"]})}
    result["summary"] = summarise(result["runs"], parts[0]["settings"]["tiny"])
    result["merged_from"] = [{"path": p, "command": part["environment"]["command"]} for p, part in zip(paths, parts)]
    result["environment"] = {**parts[0]["environment"], "command": shlex.join(["python", "benchmarks/parity.py", *argv])}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}: {json.dumps(result['summary'].get('gap_percent'))}% gap")
    return 0


def _cell_argv(args, model: str, seed: int) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--cell", model, str(seed), "--precision", args.precision]
    for key in FULL:
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    if args.eval_every:
        argv += ["--eval-every", str(args.eval_every)]
    return argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.cell:
        print(json.dumps(run_one(args.cell[0], int(args.cell[1]), args)))
        return 0
    if args.merge:
        return merge(args.merge, args.out, argv)
    runs = []
    for seed in args.seeds:
        for model in args.models:
            if args.in_process:
                res = run_one(model, seed, args)
            else:
                proc = subprocess.run(_cell_argv(args, model, seed), capture_output=True, text=True)
                try:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    res = {"model": model, "seed": seed, "error": (proc.stderr or proc.stdout)[-2000:]}
            runs.append(res)
            shown = f"{res['heldout_bpb']:.4f} bpb  ({res['wall_s']:.0f} s, {res['params']:,} params)" \
                if "heldout_bpb" in res else "ERROR\n" + res["error"]
            print(f"{model:>10} seed {seed}: {shown}", flush=True)
    result = {
        "benchmark": "accuracy parity: reversible vs plain GPT, held-out bits per byte",
        "environment": environment(argv),
        "settings": {k: getattr(args, k) for k in (*FULL, "seeds", "models", "precision", "tiny")},
        "model_config": model_config(args).to_dict(),  # attention kernel choice, activation, norm, streams
        "summary": summarise(runs, args.tiny),
        "runs": runs,
    }
    s = result["summary"]
    if "gap_percent" in s:
        print(f"reversible {s['heldout_bpb']['reversible']['mean']:.4f} ± {s['heldout_bpb']['reversible']['std']:.4f}, "
              f"plain {s['heldout_bpb']['plain']['mean']:.4f} ± {s['heldout_bpb']['plain']['std']:.4f} bpb: "
              f"gap {s['gap_percent']:+.2f}%")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all("heldout_bpb" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
