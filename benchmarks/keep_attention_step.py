"""The seed model's training step with the attention kept (policy reverse_keep_attention) beside reverse,
the project's own checkpoint-per-layer step (same blocks, same kernels) and a plain checkpointed GPT.

Methods (each (method, length) cell in its own subprocess, as benchmarks/seed_step.py):
  reverse           every layer reverse (today's default)
  keep              every layer reverse_keep_attention
  plan              the planner's plan (layer granularity, kept attention offered) under --budget-ratio times
                    the cost model's all-reverse peak
  checkpoint        the reversible model with every layer under torch.utils.checkpoint (same kernels)
  plain_checkpoint  PlainGPT with a checkpoint per block (revnet_torch.baselines)

Peak = torch.cuda.max_memory_allocated over the timed steps (AdamW's state exists), time = their median.
``--check`` first compares kept and reverse gradients on a small model on the GPU (bf16 and fp32) and
reports which kernel family ran.

    python benchmarks/keep_attention_step.py --seq 65536 --methods reverse,keep,checkpoint --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seed_step import SEED, environment, timed_steps  # noqa: E402

METHODS = ("reverse", "keep", "plan", "checkpoint", "plain_checkpoint")
KEEP = "reverse_keep_attention"


def plan_for(model, seq: int, ratio: float) -> tuple[list[str], dict]:
    """The planner's plan under ``ratio`` x the all-reverse predicted peak, and what it predicts."""
    from revnet_core.memory import Workload
    from revnet_core.planner import plan_layers
    from revnet_torch.cost import CostModel
    from revnet_torch.scheduler import keepable_layers

    L = len(model.layers)
    cm = CostModel(model.config, Workload(batch=1, seq_len=seq, autocast_dtype="bfloat16", device="cuda"))
    base = cm.peak_bytes(["reverse"] * L)
    plan = plan_layers(cm, L, int(ratio * base), strategy="adaptive", granularity="layer",
                       keepable=keepable_layers(model))
    return list(plan.policies), {"summary": plan.summary(), "predicted_peak_gib": plan.peak_bytes / 2**30,
                                 "predicted_reverse_peak_gib": base / 2**30,
                                 "relative_compute": plan.relative_time}


def run_cell(method: str, seq: int, layers: int, steps: int, ratio: float) -> dict:
    import torch

    import revnet_core
    from revnet_torch.baselines import PlainGPT
    from revnet_torch.options import config_of

    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = config_of({**SEED, "num_layers": layers, "max_seq_len": seq})
    extra: dict = {}
    if method == "plain_checkpoint":
        model = PlainGPT(cfg, memory="checkpoint")
    else:
        model = revnet_core.build("torch", config=cfg)
        if method == "plan":
            policies, extra = plan_for(model, seq, ratio)
        else:
            policies = {"reverse": "reverse", "keep": KEEP, "checkpoint": "checkpoint"}[method]
        model.set_policy(policies)
        from revnet_core.policies import summary
        extra["policies"] = summary(model.policies)
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, SEED["vocab_size"], (1, seq), device=dev)
    try:
        times, losses = timed_steps(model, ids, opt, steps)
    except torch.OutOfMemoryError:
        return {"oom": True, **extra}
    from revnet_torch import kept_attention

    return {"oom": False, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_s_median": statistics.median(times), "step_s_all": times, "losses": losses,
            "kept_kernel": sorted({v for v in kept_attention._CHOICE.values()}), **extra}


def gpu_check() -> dict:
    """Kept against reverse on the GPU: a 4-layer d512 model at 8k tokens, gradients' relative difference."""
    import torch

    import revnet_core
    from revnet_torch import kept_attention

    out = {}
    for name, dtype, auto in (("bf16", torch.float32, True), ("fp32", torch.float32, False)):
        torch.manual_seed(0)
        model = revnet_core.build("torch", num_layers=4, d_model=512, num_heads=8, vocab_size=256,
                                  max_seq_len=8192, attn_head_chunk=4).to("cuda", dtype)
        ids = torch.randint(0, 256, (1, 8192), device="cuda")
        grads = {}
        for pol in ("store", "reverse", KEEP):
            model.set_policy(pol)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=auto):
                loss = model(ids).loss
            loss.backward()
            grads[pol] = (float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters()]))
        ref = grads["store"][1]
        out[name] = {p: {"loss": l, "rel_grad_diff_vs_store": float((g - ref).norm() / ref.norm())}
                     for p, (l, g) in grads.items()}
        probe = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16 if auto else torch.float32)
        out[name]["kernel"] = kept_attention.family(probe)  # the family the kept layers ran
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seq", default="65536")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-ratio", type=float, default=1.5)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cell", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1]), args.layers, args.steps, args.budget_ratio)))
        return 0
    result = {"environment": environment(), "config": {**SEED, "num_layers": args.layers}, "rows": []}
    if args.check:
        result["gpu_check"] = gpu_check()
        print(json.dumps(result["gpu_check"], indent=1), flush=True)
    for seq in [int(s) for s in args.seq.split(",")]:
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--cell", method, str(seq), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--budget-ratio", str(args.budget_ratio)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res = {"error": (proc.stderr or proc.stdout)[-2000:]}
            row = {"method": method, "seq": seq, **res}
            result["rows"].append(row)
            shown = "OOM" if row.get("oom") else ("ERROR" if "error" in row else
                    f"{row['peak_allocated_gib']:6.2f} GiB  {row['step_s_median']:7.3f} s")
            print(f"{method:>17} {seq:>8} {shown}  {row.get('policies', '')}", flush=True)
            if "error" in row:
                print(row["error"], file=sys.stderr)
            if args.out:  # after every cell: a command cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
