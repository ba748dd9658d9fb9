"""Large models on one GPU: 1.3B and 7B shapes at long contexts, the optimizer inside the backward against
the optimizer after it and against checkpointing with the same optimizer.

Methods (bf16 autocast throughout; AdamW lr 1e-4):
- ``checkpoint``: the plain GPT of the same shape with every layer checkpointed, fp32 weights, fused AdamW
  after the backward (the baseline).
- ``reversible``: our model, fp32 weights, fused AdamW after the backward.
- ``inbackward``: our model, fp32 weights, AdamW inside the backward (revnet_torch.optim.OptimizerInBackward):
  no full-model gradients.
- ``inbackward-bf16``: as ``inbackward`` with bf16 weights, stochastic rounding, fp32 AdamW state.

Each cell runs in its own subprocess (an out-of-memory is a result) with a time limit; the model is built on
the GPU. Peak = torch.cuda.max_memory_allocated over the timed steps (after step 1, when the optimizer state
exists); time = median of the timed steps.

    python benchmarks/large_models.py --cells 7B:131072:inbackward-bf16,7B:131072:checkpoint --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_step import timed_steps  # noqa: E402

METHODS = ("checkpoint", "reversible", "inbackward", "inbackward-bf16")


def build(method: str, size: str, seq: int):
    import torch

    import revnet_core
    from revnet_core.presets import preset_config
    from revnet_torch.baselines import PlainGPT

    cfg = preset_config(size, vocab_size=50257, max_seq_len=seq)
    with torch.device("cuda"):
        model = PlainGPT(cfg, memory="checkpoint") if method == "checkpoint" else revnet_core.build("torch", config=cfg)
    if method == "inbackward-bf16":
        model = model.to(torch.bfloat16)
    return model


def optimizer(method: str, model):
    import torch

    from revnet_torch.optim import OptimizerInBackward

    if method.startswith("inbackward"):
        return OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-4, fused=True,
                                   stochastic_rounding=method.endswith("bf16"))
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def run_cell(method: str, size: str, seq: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = build(method, size, seq)
    opt = optimizer(method, model)
    t_build = time.perf_counter() - t_build
    ids = torch.randint(0, 50257, (1, seq), device="cuda")
    try:
        times, losses = timed_steps(model, ids, opt, steps)
    except torch.OutOfMemoryError:
        return {"oom": True, "build_s": t_build, "params": sum(p.numel() for p in model.parameters())}
    return {
        "oom": False,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_dtype": str(next(model.parameters()).dtype),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "losses": losses,
        "build_s": t_build,
    }


def environment() -> dict:
    import torch

    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="", help="SIZE:SEQ:METHOD,... (METHOD of %s)" % (METHODS,))
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the first")
    ap.add_argument("--cell-timeout", type=float, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cell", nargs=3, metavar=("SIZE", "SEQ", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell[2], args.cell[0], int(args.cell[1]), args.steps)))
        return 0
    if not args.cells:
        ap.error("--cells is required")
    rows = []
    for spec in args.cells.split(","):
        size, seq, method = spec.split(":")
        if method not in METHODS:
            raise SystemExit(f"method {method!r} is not one of {METHODS}")
        cmd = [sys.executable, __file__, "--cell", size, seq, method, "--steps", str(args.steps)]
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            res = {"timeout_s": args.cell_timeout}
        except (IndexError, json.JSONDecodeError):
            res = {"error": (proc.stderr or proc.stdout)[-2000:]}
        rows.append({"size": size, "seq": int(seq), "method": method, **res})
        r = rows[-1]
        shown = ("OOM" if r.get("oom") else "TIMEOUT" if "timeout_s" in r else "ERROR" if "error" in r else
                 f"{r['peak_allocated_gib']:7.2f} GiB  {r['step_s_median']:8.2f} s  ({r['params'] / 1e9:.2f}B)")
        print(f"{size:>5} {seq:>7} {method:>16} {shown}", flush=True)
        if "error" in r:
            print(r["error"], file=sys.stderr)
        if args.out:  # after every cell: a later cell running past the command's limit loses nothing
            with open(args.out, "w") as f:
                json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
