"""Accuracy-parity study: why the plain baseline diverges, and which stream start / merge / init closes the
reversible model's gap. Many (variant, corpus, seed) cells of the parity setting (6 layers, d256, 4 heads,
seq 512, batch 16, 1500 steps, AdamW 1e-3), several at once on one GPU (small models leave it mostly idle),
each in its own subprocess. Writes every cell's held-out bits per byte and its training curve (loss and
gradient norm every 10 steps, held-out bits per byte every ``--eval-every`` steps).

    python benchmarks/parity_study.py --variants plain,reversible --seeds 0 1 2 --jobs 6 --out study.json
    python benchmarks/parity_study.py --tiny --variants plain,rev_sum --seeds 0 --out runs/study-tiny.json

Variants (``VARIANTS``): ``plain`` (``revnet_torch.baselines.PlainGPT``), ``plain_fp32``, ``plain_ref``
(every kernel forced to its reference), ``plain_lr5e-4``, ``reversible`` (the library's model as built), and
the reversible experiments ``rev_<name>``: how the two streams are merged at the output, how they start, and
the residual-projection init scale. Corpora: ``stdlib`` (the embedded one) and ``files:PATH`` (UTF-8 text
files, split like ``--data``).
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

FULL = dict(layers=6, d_model=256, heads=4, seq_len=512, batch_size=16, steps=1500, lr=1e-3, warmup=100,
            eval_windows=512, eval_every=250)
TINY = dict(layers=2, d_model=32, heads=2, seq_len=32, batch_size=4, steps=20, lr=3e-3, warmup=3, eval_windows=8,
            eval_every=10)

# name -> (model kind, model options, trainer overrides, environment)
VARIANTS = {
    "plain": ("plain", {}, {}, {}),
    "plain_fp32": ("plain", {}, {"precision": "fp32"}, {}),
    "plain_ref": ("plain", {}, {}, {"REVNET_KERNELS": "reference"}),
    "plain_lr5e-4": ("plain", {}, {"lr": 5e-4}, {}),
    "reversible": ("reversible", {}, {}, {}),
    "rev_fp32": ("reversible", {}, {"precision": "fp32"}, {}),
    "rev_fp16": ("reversible", {}, {"precision": "fp16"}, {}),  # ReversibleAMPTrainer(fp16=True)
    # output merge: the plain residual sum e + sum F + sum G (both streams hold e once each)
    "rev_sum": ("reversible", {"merge": "sum"}, {}, {}),
    # output merge: a learned per-channel mix a*y1 + b*y2, a = b = 1/2 at init
    "rev_mix": ("reversible", {"merge": "mix"}, {}, {}),
    # output merge: each stream through its own norm, then averaged (no shared final norm)
    "rev_norms": ("reversible", {"merge": "norms"}, {}, {}),
    # residual init: each stream receives L projections (not 2L), so scale them by L^-1/2
    "rev_init": ("reversible", {"proj_scale": "per_stream"}, {}, {}),
    "rev_sum_init": ("reversible", {"merge": "sum", "proj_scale": "per_stream"}, {}, {}),
}


def build_model(kind: str, opts: dict, config):
    import torch
    from torch import nn

    import revnet_core
    from revnet_torch.baselines import PlainGPT
    from revnet_torch.model import ReversibleTransformer
    from revnet_torch.blocks import make_norm

    if kind == "plain":
        return PlainGPT(config, memory="store")
    merge = opts.get("merge", "mean")

    class Variant(ReversibleTransformer):
        def __init__(self, cfg):
            super().__init__(cfg)
            if merge == "mix":
                self.mix = nn.Parameter(torch.full((2, cfg.d_model), 0.5))
            if merge == "norms":
                self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            if opts.get("proj_scale") == "per_stream":
                for name, p in self.named_parameters():
                    if p.dim() >= 2 and name.endswith(("proj.weight", "down.weight")):
                        nn.init.normal_(p, 0.0, cfg.init_std * cfg.num_layers ** -0.5)

        def hidden(self, input_ids):
            from revnet_torch.engine import run_layers

            x1, x2 = self.streams(input_ids)
            y1, y2 = run_layers(self.layers, self.policies, x1, x2, private_outputs=True)
            if merge == "sum":
                return self.norm(y1 + y2 - x1)
            if merge == "mix":
                return self.norm(self.mix[0] * y1 + self.mix[1] * y2)
            if merge == "norms":
                return 0.5 * self.norm(y1) + 0.5 * self.norm2(y2)
            return self.norm(y1 * 0.5 + y2 * 0.5)

    if not opts:
        return revnet_core.build("torch", config=config)
    return Variant(config)


def corpus_of(spec: str):
    from revnet_core.data import file_corpus, stdlib_corpus

    if spec == "stdlib":
        return stdlib_corpus()
    if spec.startswith("files:"):
        # a tenth of the files held out: the default twentieth leaves too few held-out bytes on small corpora
        return file_corpus([spec.removeprefix("files:")], heldout_every=10)
    raise SystemExit(f"unknown corpus {spec!r}: stdlib or files:PATH")


def run_cell(variant: str, corpus: str, seed: int, args) -> dict:
    import torch

    from revnet_core import ModelConfig
    from revnet_core.data import lm_data
    from revnet_torch.trainer import LongContextTrainer, ReversibleAMPTrainer

    kind, opts, overrides, _env = VARIANTS[variant]
    config = ModelConfig(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads, vocab_size=256,
                         max_seq_len=args.seq_len)
    torch.manual_seed(seed)
    model = build_model(kind, opts, config)
    data = lm_data(corpus_of(corpus), args.seq_len, args.batch_size, seed=seed, eval_windows_max=args.eval_windows)
    common = dict(max_length=args.seq_len, lr=overrides.get("lr", args.lr), warmup_steps=args.warmup,
                  eval_every=args.eval_every, progress=False, plot=False, seed=seed)
    if overrides.get("precision") == "fp16":
        trainer = ReversibleAMPTrainer(model, fp16=True, loss_scale="dynamic", **common)
    else:
        trainer = LongContextTrainer(model, precision=overrides.get("precision", args.precision), **common)
    t0 = time.perf_counter()
    summary = trainer.fit(data, steps=args.steps)
    wall = time.perf_counter() - t0
    train = [r for r in trainer.history if r["kind"] == "train"]
    curve = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in train if r["step"] % 10 == 0]
    evals = [{"step": r["step"], "bpb": r["eval_bits_per_byte"]} for r in trainer.history if r["kind"] == "eval"]
    return {"variant": variant, "corpus": corpus, "corpus_sha256": data.identity.get("sha256"), "seed": seed,
            "params": sum(p.numel() for p in model.parameters()), "heldout_bpb": summary["eval"]["eval_bits_per_byte"],
            "train_loss_last50": statistics.fmean(r["loss"] for r in train[-50:]),
            "max_grad_norm_seen": max(r["grad_norm"] for r in train), "curve": curve, "evals": evals,
            "wall_s": wall, "device": summary["device"], "precision": summary["precision"]}


def spread(values: list[float]) -> dict:
    n = len(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "sem": std / n ** 0.5, "n": n, "values": values}


def paired(runs: list[dict], variant: str, ref: str) -> dict | None:
    """Per-seed relative differences (percent) of ``variant`` against ``ref``: mean, std, standard error, t."""
    a = {r["seed"]: r["heldout_bpb"] for r in runs if r["variant"] == variant}
    b = {r["seed"]: r["heldout_bpb"] for r in runs if r["variant"] == ref}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [100 * (a[k] - b[k]) / b[k] for k in seeds]
    s = spread(diffs)
    return {"seeds": seeds, "diff_percent": diffs, "mean_percent": s["mean"], "std": s["std"], "sem": s["sem"],
            "t": s["mean"] / s["sem"] if s["sem"] else None}


def summarise(runs: list[dict]) -> dict:
    """Per corpus: each variant's mean / std / standard error, and its gap to ``plain`` in percent."""
    out: dict = {}
    for corpus in sorted({r["corpus"] for r in runs}):
        ok = [r for r in runs if r["corpus"] == corpus and "heldout_bpb" in r]
        by = {v: spread([r["heldout_bpb"] for r in ok if r["variant"] == v]) for v in VARIANTS
              if any(r["variant"] == v for r in ok)}
        base = by.get("plain")
        for v, s in by.items():
            if base and v != "plain":
                se = (s["sem"] ** 2 + base["sem"] ** 2) ** 0.5
                s["gap_percent_vs_plain"] = 100 * (s["mean"] - base["mean"]) / base["mean"]
                s["gap_in_standard_errors"] = (s["mean"] - base["mean"]) / se if se else None
            # Paired by seed: a seed fixes the data order, and the initial weights wherever the parameter
            # shapes agree, so per-seed differences cancel most of the seed-to-seed spread.
            for ref in ("plain", "reversible"):
                if ref != v and ref in by:
                    s[f"paired_vs_{ref}"] = paired(ok, v, ref)
        out[corpus] = by
    return out


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="plain,reversible", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--corpora", default="stdlib", help="comma list: stdlib, files:PATH")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (subprocesses on the same GPU)")
    for key, value in FULL.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier result files (several device "
                    "commands) into --out, the summary recomputed over all their runs")
    ap.add_argument("--cell", nargs=3, metavar=("VARIANT", "CORPUS", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    return args


def cell_argv(args, variant, corpus, seed):
    argv = [sys.executable, os.path.abspath(__file__), "--cell", variant, corpus, str(seed), "--out", "-",
            "--precision", args.precision]
    for key in FULL:
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], args.cell[1], int(args.cell[2]), args)))
        return 0
    if args.merge:
        parts = [json.load(open(p)) for p in args.merge]
        if any(p["settings"] != parts[0]["settings"] for p in parts):
            raise SystemExit("cannot merge results of different settings")
        runs = [r for p in parts for r in p["runs"]]
        result = {**parts[0], "runs": runs, "summary": summarise(runs),
                  "variants": {k: v for p in parts for k, v in p["variants"].items()},
                  "merged_from": [p["environment"] for p in parts]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        args.variants = ",".join(result["variants"])
        return report_summary(result["summary"], args.out)
    cells = [(v, c, s) for c in args.corpora.split(",") for s in args.seeds for v in args.variants.split(",")]
    pending, running, runs = list(cells), [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            v, c, s = pending.pop(0)
            env = {**os.environ, **VARIANTS[v][3]}
            proc = subprocess.Popen(cell_argv(args, v, c, s), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
            running.append(((v, c, s), proc))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            (v, c, s), proc = item
            out, err = proc.communicate()
            try:
                res = json.loads(out.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res = {"variant": v, "corpus": c, "seed": s, "error": (err or out)[-1500:]}
            runs.append(res)
            shown = f"{res['heldout_bpb']:.4f} bpb, train {res['train_loss_last50']:.3f}, max |g| " \
                f"{res['max_grad_norm_seen']:.1f} ({res['wall_s']:.0f} s)" if "heldout_bpb" in res else \
                "ERROR " + res["error"][-600:]
            print(f"[{time.perf_counter() - t0:5.0f} s] {v:>14} {c[:20]:>20} seed {s}: {shown}", flush=True)
            write(args, argv, runs)  # after every cell: a run cut off by a time limit keeps what finished
    return report(args, argv, runs)


def write(args, argv, runs) -> dict:
    import torch

    summary = summarise(runs)
    result = {"benchmark": "accuracy-parity study", "settings": {k: getattr(args, k) for k in FULL},
              "variants": {v: {"model": VARIANTS[v][0], "options": VARIANTS[v][1], "trainer": VARIANTS[v][2],
                               "env": VARIANTS[v][3]} for v in args.variants.split(",")},
              "environment": {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                              f"cpu ({platform.machine()})", "torch": torch.__version__,
                              "command": shlex.join(["python", "benchmarks/parity_study.py", *argv]),
                              "jobs": args.jobs},
              "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def report(args, argv, runs) -> int:
    report_summary(write(args, argv, runs)["summary"], args.out)
    return 0 if all("heldout_bpb" in r for r in runs) else 1


def report_summary(summary: dict, out: str) -> int:
    for corpus, by in summary.items():
        print(f"\n{corpus}")
        for v, s in by.items():
            gap = f"  gap {s['gap_percent_vs_plain']:+.2f}% ({s['gap_in_standard_errors']:+.1f} se)" \
                if "gap_percent_vs_plain" in s and s["gap_in_standard_errors"] is not None else ""
            pair = "".join(f"  paired vs {ref}: {p['mean_percent']:+.2f}% ± {p['sem']:.2f}"
                           for ref in ("plain", "reversible") if (p := s.get(f"paired_vs_{ref}")))
            print(f"  {v:>14}: {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']}){gap}{pair}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
