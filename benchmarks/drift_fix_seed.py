"""The seed model's training step with exact streams off, on, and on with the drift monitor checking every
step: peak memory and step time, one subprocess per cell (as benchmarks/seed_step.py), JSON to $OUT.

Peak = torch.cuda.max_memory_allocated over steps 2-4 including AdamW's step; time = their median. Also the
drift the monitor measured (0 with exact streams) and the loss of each step.

    python benchmarks/drift_fix_seed.py --seq 262144 --out $OUT/drift_fix_seed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import seed_step  # noqa: E402  (the seed config and the environment record)

MODES = ("off", "on", "on+monitor")


def run_cell(mode: str, seq: int, layers: int, steps: int, fields: dict) -> dict:
    import torch

    from revnet_torch import engine
    from revnet_torch.drift import DriftMonitor

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = seed_step.build("reversible", seq, layers, fields).to(dev)
    monitor = DriftMonitor(model, every=1) if mode.endswith("+monitor") else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, seed_step.SEED["vocab_size"], (1, seq), device=dev)
    try:
        with engine.exact_streams(mode.startswith("on")):
            times, losses = seed_step.timed_steps(model, ids, opt, steps)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"oom": False, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "step_s_median": statistics.median(times), "step_s_all": times, "losses": losses,
            "monitor_checks": monitor.checks if monitor else None,
            "monitor_events": monitor.events if monitor else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seq", type=int, default=262144)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "drift_fix_seed.json"))
    ap.add_argument("--fields", default="{}", help='model fields as JSON, e.g. \'{"stream_merge": "sum"}\'')
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.seq, args.layers, args.steps, json.loads(args.fields))))
        return 0
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--cell", mode, "--seq", str(args.seq), "--layers", str(args.layers),
               "--steps", str(args.steps), "--fields", args.fields]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            res = {"error": (proc.stderr or proc.stdout)[-2000:]}
        rows.append({"exact_streams": mode, "seq": args.seq, "layers": args.layers, "fields": json.loads(args.fields),
                     **res})
        r = rows[-1]
        shown = "OOM" if r.get("oom") else ("ERROR " + r["error"][-300:] if "error" in r else
                                            f"{r['peak_allocated_gib']:6.2f} GiB  {r['step_s_median']:7.3f} s")
        print(f"{mode:>11} {args.seq:>8} {shown}", flush=True)
    base = next((r for r in rows if r["exact_streams"] == "off" and "step_s_median" in r), None)
    for r in rows:
        if base and "step_s_median" in r:
            r["time_vs_off"] = r["step_s_median"] / base["step_s_median"]
            r["peak_vs_off_gib"] = r["peak_allocated_gib"] - base["peak_allocated_gib"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": seed_step.environment(), "config": {**seed_step.SEED, "num_layers": args.layers},
                   "rows": rows}, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
