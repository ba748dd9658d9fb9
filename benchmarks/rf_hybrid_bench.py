"""Windowed Rational-Fourier attention (exact softmax inside the window, RF beyond) against pure RF attention and
softmax attention: forward + backward time and peak memory of one attention block vs sequence length.

Each cell builds the block (d_model, heads, features), runs ``--warmup`` untimed and ``--steps`` timed
forward+backward passes of a (1, T, d_model) input under bf16 autocast on CUDA (fp32 on the CPU), and records the
median time and, on CUDA, ``max_memory_allocated`` above the input's. Softmax is the seed model's
``AttentionBlock`` (SDPA's fused kernels; ``--window`` cells add its windowed Triton kernel). An out-of-memory
cell is recorded as such. The band of the windowed RF part is plain PyTorch (T x (chunk + W) logits per head),
so expect it to cost memory where a fused kernel would not: this measures by how much.

    python benchmarks/rf_hybrid_bench.py --out docs/benchmarks/rf/hybrid_h200.json          # on the GPU
    python benchmarks/rf_hybrid_bench.py --device cpu --lengths 256,512 --windows 32 --out /tmp/rf_hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time


def _block(kind: str, window: int | None, args, device):
    import torch

    from revnet_torch.blocks import AttentionBlock, Rotary
    from revnet_torch.rf_attention import RFAttentionBlock

    torch.manual_seed(0)
    rotary = Rotary(args.d_model // args.heads, 10000.0)
    if kind == "softmax":
        block = AttentionBlock(args.d_model, args.heads, args.d_model, rotary, window=window)
    else:
        block = RFAttentionBlock(args.d_model, args.heads, args.d_model, rotary, num_fourier_features=args.features,
                                 chunk_size=args.chunk, window=window)
    return block.to(device)


def cell(kind: str, window: int | None, T: int, args, device) -> dict:
    import torch

    block = _block(kind, window, args, device)
    x = torch.randn(1, T, args.d_model, device=device, requires_grad=True)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times = []
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with autocast:
                y = block(x)
            y.float().square().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            x.grad = None
            block.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as exc:
        return {"oom": True, "message": str(exc).splitlines()[0][:200]}
    row = {"oom": False, "time_s_median": statistics.median(times)}
    if cuda:
        row["peak_bytes_above_input"] = torch.cuda.max_memory_allocated() - base
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384,65536,262144")
    ap.add_argument("--windows", default="256,1024", help="windows of the hybrid (and of windowed softmax)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--out", required=True, help="JSON path")
    args = ap.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = [int(n) for n in args.lengths.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    kinds = [("softmax", None), ("rf", None), *[(k, w) for w in windows for k in ("softmax", "rf")]]
    rows = []
    print(f"{'attention':>22} {'T':>8} {'time s':>9} {'peak MiB':>10}")
    for T in lengths:
        for kind, window in kinds:
            name = kind if window is None else f"{kind} window {window}"
            if kind == "rf" and window is not None:
                name = f"rf hybrid window {window}"
            r = {"attention": name, "kind": kind, "window": window, "seq": T, **cell(kind, window, T, args, device)}
            rows.append(r)
            mem = f"{r['peak_bytes_above_input'] / 2**20:10.1f}" if "peak_bytes_above_input" in r else f"{'-':>10}"
            shown = "OOM" if r["oom"] else f"{r['time_s_median']:9.4f} {mem}"
            print(f"{name:>22} {T:>8} {shown}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version()}
    result = {"command": "python " + shlex.join(sys.argv), "environment": env, "settings": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
