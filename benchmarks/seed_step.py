"""Training-step memory and time of the seed model: ours against plain PyTorch and checkpointing.

Each (method, length) cell runs in its own subprocess: an out-of-memory is a result, not a crash, and cannot
fragment the allocator for the next cell. Peak = torch.cuda.max_memory_allocated over steps 2-4 including
AdamW's step (its state exists only after step 1); time = median of those 3 steps.

    python benchmarks/seed_step.py --methods plain,checkpoint,offload,reversible --seq 65536 --out r.json
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

SEED = dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257, activation="gelu")
METHODS = ("plain", "checkpoint", "offload", "reversible")


def build(method: str, seq: int, layers: int, extra: dict):
    import revnet_core
    from revnet_torch.baselines import PlainGPT
    from revnet_torch.options import config_of

    cfg = config_of({**SEED, "num_layers": layers, "max_seq_len": seq, **extra})  # torch options allowed
    if method == "reversible":
        return revnet_core.build("torch", config=cfg)
    return PlainGPT(cfg, memory={"plain": "store", "checkpoint": "checkpoint", "offload": "offload"}[method])


def timed_steps(model, ids, opt, steps: int) -> tuple[list[float], list[float]]:
    """1 + ``steps`` bf16-autocast training steps on ids' device: (times of steps 2.., every loss); on CUDA the
    peak-memory statistics are reset after the first step (AdamW's state exists from then on). An optimizer
    with ``arm`` (``revnet_torch.optim.OptimizerInBackward``) is armed before each backward and finished
    after it."""
    import torch

    cuda = ids.device.type == "cuda"
    in_backward = hasattr(opt, "arm")
    times, losses = [], []
    for step in range(1 + steps):
        if cuda and step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = model(ids).loss
        if in_backward:
            opt.arm()
        loss.backward()
        if in_backward:
            opt.finish()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 1:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def run_cell(method: str, seq: int, layers: int, steps: int, extra: dict) -> dict:
    """One cell; a method ending in ``+compile`` runs ``torch.compile`` on every attention and FFN block."""
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    base, _, compiled = method.partition("+")
    model = build(base, seq, layers, extra).to(dev)
    if compiled:
        for layer in model.layers:
            for block in (layer.attn.block, layer.ffn.block) if base == "reversible" else (layer.attn, layer.ffn):
                block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, SEED["vocab_size"], (1, seq), device=dev)
    try:
        times, losses = timed_steps(model, ids, opt, steps)
    except torch.OutOfMemoryError:
        return {"oom": True}
    host = None
    if hasattr(torch.cuda, "host_memory_stats"):
        host = torch.cuda.host_memory_stats().get("allocated_bytes.all.peak")
    return {
        "oom": False,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "pinned_host_peak_gib": None if host is None else host / 2**30,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
    }


def attention_kernel_probe() -> list[str]:
    """Names of the GPU kernels one bf16 causal attention call launches through our block's SDPA pinning."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from revnet_torch.blocks import FUSED_SDPA

    q = torch.randn(1, 16, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with sdpa_kernel(FUSED_SDPA, set_priority=True):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(s in e.key.lower() for s in ("flash", "fmha", "cudnn", "attn", "sdpa"))}
    return sorted(names)


def environment() -> dict:
    import torch

    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {METHODS}, each optionally +compile")
    ap.add_argument("--seq", default="65536")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--extra", default="{}", help="JSON of extra ModelConfig fields")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cell", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    extra = json.loads(args.extra)
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1]), args.layers, args.steps, extra)))
        return 0
    rows = []
    for seq in [int(s) for s in args.seq.split(",")]:
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--cell", method, str(seq), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--extra", args.extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res = {"error": (proc.stderr or proc.stdout)[-2000:]}
            rows.append({"method": method, "seq": seq, "layers": args.layers, **res})
            r = rows[-1]
            shown = "OOM" if r.get("oom") else ("ERROR" if "error" in r else
                    f"{r['peak_allocated_gib']:6.2f} GiB  {r['step_s_median']:7.3f} s")
            print(f"{method:>11} {seq:>8} {shown}", flush=True)
            if "error" in r:
                print(r["error"], file=sys.stderr)
    result = {"environment": environment(), "config": {**SEED, "num_layers": args.layers, **extra},
              "attention_kernels": attention_kernel_probe(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
