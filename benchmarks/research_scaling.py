"""The README's research calls, end to end: which (size, context) cells fit a 40 GiB GPU and at what step time
(predicted), short real runs on this CPU with a loss-against-compute power law (measured), and the attention
distances of the largest trained small model against the same model at initialisation (measured).

    python benchmarks/research_scaling.py       # ~1.5 minutes on 2 CPU threads; writes docs/benchmarks/research/

Outputs (each JSON records the exact command): scaling.{json,png} (the README grid: 125M, 350M, 1.3B, 2.7B x
8k..512k tokens at 40 GiB), scaling_run.{json,png} (run=True over tiny/small x 64..512 tokens),
attention.{json,png} (the trained 'small' model at 512 tokens; ``init`` holds the untrained one's), and
README.md, rendered from the three JSON files.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_SIZES = ["125M", "350M", "1.3B", "2.7B"]
README_CONTEXTS = [8192, 32768, 131072, 524288]
RUN_SIZES = ["tiny", "small"]
RUN_CONTEXTS = [64, 128, 256, 512]


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}


def render_readme(out: Path, steps: int) -> str:
    """docs/benchmarks/research/README.md, rendered from the three JSON files beside it."""
    s, r, a = (json.loads((out / f"{n}.json").read_text()) for n in ("scaling", "scaling_run", "attention"))
    lines = ["# Research helpers: committed results", "",
             f"Rendered by `{s['command']}` from scaling.json, scaling_run.json and attention.json (each records its "
             f"command and environment: CPU, torch {s['environment']['torch']}, {s['environment']['threads']} "
             "threads). What the numbers are: docs/research.md.", "",
             f"## Which cells fit {s['gpu_memory_limit_gib']:g} GiB (predicted: cost model + planner; step seconds at "
             "fitted H200 rates)", "",
             "| size | context | fits | plan | peak GiB | store-everything GiB | step s | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for x in s["table"]:
        st = "-" if x["predicted_step_s"] is None else f"{x['predicted_step_s']:.3g}"
        tp = "-" if x["tokens_per_s"] is None else f"{x['tokens_per_s']:,.0f}"
        lines.append(f"| {x['size']} | {x['context']} | {'yes' if x['fits'] else 'no'} | {x['policies']} | "
                     f"{x['peak_gib']:.2f} | {x['baseline_peak_gib']:.2f} | {st} | {tp} |")
    lines += ["", f"Budget: {s['budget_bytes'] / 2**30:.2f} GiB usable of {s['gpu_memory_limit_gib']:g} GiB. "
              f"Pricing took {s['wall_s']:.0f} s on this CPU.", "",
              f"## Short runs (measured: held-out bits per byte of the embedded corpus, {steps} steps, batch 4, fp32, "
              "CPU)", "",
              "| size | context | params | bits/byte at init | after | training FLOPs | wall s |",
              "|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['size']} | {x['context']} | {x['params']:,} | {x['bpb_init']:.3f} | {x['bpb_final']:.3f} "
                     f"| {x['train_flops']:.3g} | {x['wall_s']:.1f} |")
    f = r["fit"]
    if f:
        lines += ["", f"Fit over the {f['points']} final points: {f['formula']} "
                  f"(RMS log residual {f['rmse_log']:.4f}). "
                  "Every run has the same number of steps, so compute grows with model size and context together: "
                  "a short-run exponent of this setup, not a law of the architecture."]
    lines += ["", f"## Attention distances (measured: {a['model']}; {a['input']})", "",
              f"Uniform causal attention would give a mean distance of {a['uniform_mean_distance']:.2f}.", "",
              "| layer | mean distance per head (trained) | at init | entropy per head (nats, trained) | "
              f"weight at distance >= {a['distances'][1]} |", "|---|---|---|---|---|"]
    for n, layer in enumerate(a["layers"]):
        row = [", ".join(f"{v:.1f}" for v in a["mean_distance"][n]),
               ", ".join(f"{v:.1f}" for v in a["init"]["mean_distance"][n]),
               ", ".join(f"{v:.2f}" for v in a["entropy"][n]),
               ", ".join(f"{v:.2f}" for v in a["fraction_beyond"][str(a["distances"][1])][n])]
        lines.append(f"| {layer} | " + " | ".join(row) + " |")
    gpu = out / "attention_262k_h200.json"
    if gpu.exists():
        g = json.loads(gpu.read_text())
        md = [v for per_layer in g["mean_distance"] for v in per_layer]
        lines += ["", "## The README's attention call on a GPU (measured)", "",
                  f"`{g['command']}` on an {g['environment']['gpu']} (torch {g['environment']['torch']}): "
                  f"{g['model']}, {g['sequence_length']} tokens ({g['input']}), layers "
                  f"{g['layers'][0]}-{g['layers'][-1]}, {g['heads']} heads: {g['wall_s']:.0f} s for the forward and "
                  f"the statistics, peak {g['peak_allocated_bytes'] / 2**30:.1f} GiB allocated, where one fp32 (T, T) "
                  f"matrix of one head would be {g['full_matrix_bytes_per_head'] / 2**30:.0f} GiB. Untrained, every "
                  f"head is close to uniform: mean distance {min(md):,.0f} to {max(md):,.0f} against "
                  f"{g['uniform_mean_distance']:,.2f} for uniform attention (attention_262k_h200.json)."]
    return "\n".join(lines) + "\n"


def readme_attention(out: Path, max_elements: int, argv) -> int:
    """The README's ``analyze_attention_patterns(model=large_model, sequence_length=262144,
    layer_range=range(20, 24))`` on a GPU: a freshly initialised 24-layer, d 1024 model (no trained one of that
    size exists here), timed, with the peak memory against the (T, T) matrix it never forms."""
    import torch

    from revnet_zero import ReversibleTransformer
    from revnet_zero.research import MemoryEfficientResearch

    if not torch.cuda.is_available():
        raise SystemExit("--readme-attention needs a GPU")
    out.mkdir(parents=True, exist_ok=True)
    T = 262144
    torch.manual_seed(0)
    model = ReversibleTransformer(num_layers=24, d_model=1024, num_heads=16, max_seq_len=T).cuda()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = MemoryEfficientResearch().analyze_attention_patterns(model=model, sequence_length=T,
                                                               layer_range=range(20, 24), max_elements=max_elements)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name()
    tag = "h200" if "H200" in gpu else gpu.split()[-1].lower()
    command = " ".join(["python", "benchmarks/research_scaling.py", *map(shlex.quote, argv or sys.argv[1:])])
    env = {**environment(), "gpu": gpu, "cuda": torch.version.cuda}
    peak = torch.cuda.max_memory_allocated()
    res.to_json(out / f"attention_262k_{tag}.json", command=command, environment=env, wall_s_total=wall,
                peak_allocated_bytes=peak, full_matrix_bytes_per_head=T * T * 4,
                model="ReversibleTransformer(num_layers=24, d_model=1024, num_heads=16), fresh init (seed 0), fp32")
    res.plot(out / f"attention_262k_{tag}.png")
    print(f"{gpu}: {wall:.1f} s, peak {peak / 2**30:.2f} GiB (one fp32 (T, T) matrix: {T * T * 4 / 2**30:.0f} GiB)")
    for n, layer in enumerate(res.layers):
        print(f"  layer {layer}: mean distance {[round(v, 1) for v in res.mean_distance[n]]} (uniform "
              f"{res.uniform_mean_distance:.1f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "research"))
    ap.add_argument("--gpu-memory-limit", type=float, default=40.0, help="GiB")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run=True cell")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--readme-attention", action="store_true",
                    help="GPU only: the README's analyze_attention_patterns call (24 x 1024 model, 262144 tokens, "
                         "layers 20-23) -> attention_262k_<gpu>.{json,png}; nothing else")
    ap.add_argument("--max-elements", type=int, default=1 << 28, help="scores at once (--readme-attention)")
    args = ap.parse_args(argv)
    if args.readme_attention:
        return readme_attention(Path(args.out), args.max_elements, argv)

    import torch

    from revnet_zero.research import MemoryEfficientResearch
    from revnet_torch.model import ReversibleTransformer
    from revnet_core.presets import preset_config

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/research_scaling.py", *map(shlex.quote, argv or sys.argv[1:])])
    env = environment()
    research = MemoryEfficientResearch()

    t0 = time.perf_counter()
    scaling = research.test_scaling_laws(model_sizes=README_SIZES, context_lengths=README_CONTEXTS,
                                         gpu_memory_limit=args.gpu_memory_limit)
    pricing_s = time.perf_counter() - t0
    scaling.to_json(out / "scaling.json", command=command, environment=env, wall_s=pricing_s)
    scaling.plot(out / "scaling.png")
    print(f"priced {len(scaling.table)} cells in {pricing_s:.1f} s")
    for r in scaling.table:
        step = "-" if r["predicted_step_s"] is None else f"{r['predicted_step_s']:.3f} s"
        print(f"  {r['size']:>5} {r['context']:>7}: fits={r['fits']!s:5} {r['policies']:24} peak "
              f"{r['peak_gib']:7.2f} GiB (store {r['baseline_peak_gib']:8.2f}) step {step}")

    t0 = time.perf_counter()
    runs = research.test_scaling_laws(model_sizes=RUN_SIZES, context_lengths=RUN_CONTEXTS,
                                      gpu_memory_limit=args.gpu_memory_limit, run=True, steps=args.steps,
                                      run_batch_size=4, eval_windows=16, device="cpu", keep_models=True)
    run_s = time.perf_counter() - t0
    runs.to_json(out / "scaling_run.json", command=command, environment=env, wall_s=run_s)
    runs.plot(out / "scaling_run.png")
    print(f"trained {len(runs.runs)} cells in {run_s:.1f} s; fit {runs.fit.formula() if runs.fit else None}")
    for r in runs.runs:
        print(f"  {r['size']:>5} {r['context']:>4}: {r['bpb_init']:.3f} -> {r['bpb_final']:.3f} bits/byte, "
              f"{r['train_flops']:.3g} FLOPs, {r['wall_s']:.1f} s")

    T = max(RUN_CONTEXTS)
    trained = runs.models[("small", T)]
    distances = (8, 64, 256)
    layers = range(trained.config.num_layers)
    attention = research.analyze_attention_patterns(trained, T, layers, distances=distances)
    torch.manual_seed(0)  # the seed the run used: the same model before training
    init = research.analyze_attention_patterns(ReversibleTransformer(preset_config("small", max_seq_len=T)), T,
                                               layers, distances=distances)
    attention.to_json(out / "attention.json", command=command, environment=env,
                      model=f"'small' after {args.steps} steps at {T} tokens (scaling_run.json)", init=init.to_dict())
    attention.plot(out / "attention.png")
    print(f"attention at {T} tokens (uniform mean distance {attention.uniform_mean_distance:.1f}):")
    for n, layer in enumerate(attention.layers):
        md = ", ".join(f"{v:.1f}" for v in attention.mean_distance[n])
        md0 = ", ".join(f"{v:.1f}" for v in init.mean_distance[n])
        print(f"  layer {layer}: mean distance per head {md} (init {md0})")
    (out / "README.md").write_text(render_readme(out, args.steps))
    print(json.dumps({"files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
