"""Hierarchical attention vs plain causal SDPA attention: forward + backward time and memory vs length.

Each row is one attention block (pre-norm, qkv, RoPE, attention, output projection; batch ``--batch``,
``--d-model``, ``--heads``) run forward and backward on random input: ``hierarchical`` is
``revnet_torch.hierarchical.HierarchicalAttentionBlock`` (local window, ratios and level blocks from the
flags), ``sdpa`` is ``revnet_torch.blocks.AttentionBlock`` (torch's fused causal SDPA). Reported per length:
the best forward + backward seconds of ``--repeats`` (after one warm-up; the best, since
other processes only ever add time), the bytes the forward saves
for the backward (``saved_tensors_hooks``, parameters excluded: device-independent), the peak allocated
above the start of the step (CUDA: the allocator's peak; CPU: ``DetailedMemoryProfiler``'s records, in a
separate untimed run, where ``--cpu-peak``), and for scale the bytes of fp32 (T, T) scores of all heads
(what one dense layer would form).

    python benchmarks/hierarchical_attention.py --device cpu --out docs/benchmarks/hierarchical/cpu.json
    python benchmarks/hierarchical_attention.py --device cuda --lengths 4096 65536 262144 1048576 \\
        --out docs/benchmarks/hierarchical/h200.json

Lengths whose SDPA run would exceed ``--sdpa-max-length`` are run for the hierarchical block only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path


def build(kind: str, args, device, dtype):
    import torch

    from revnet_torch.blocks import AttentionBlock, Rotary
    from revnet_torch.hierarchical import HierarchicalAttentionBlock, Hierarchy

    torch.manual_seed(0)
    rotary = Rotary(args.d_model // args.heads, 10000.0)
    if kind == "sdpa":
        block = AttentionBlock(args.d_model, args.heads, args.d_model, rotary)
    else:
        h = Hierarchy(args.local_window, tuple(args.ratios), args.level_blocks)
        block = HierarchicalAttentionBlock(args.d_model, args.heads, args.d_model, rotary, h,
                                           chunk_size=args.chunk_size)
    return block.to(device=device, dtype=dtype)


def step(block, x):
    """One forward and backward of ``block`` at x."""
    import torch

    out = block(x)
    out.backward(torch.ones_like(out))


def measure(kind: str, T: int, args, device, dtype) -> dict:
    import torch

    from revnet_torch.memory import saved_tensor_bytes

    block = build(kind, args, device, dtype)
    params = list(block.parameters())
    x = torch.randn(args.batch, T, args.d_model, device=device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(block, x)  # warm-up: kernels chosen, RoPE table built
    times = []
    for _ in range(args.repeats):
        x.grad = None
        block.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        step(block, x)
        sync()
        times.append(time.perf_counter() - t0)
    with saved_tensor_bytes(exclude=params) as saved:
        out = block(x)
    out.backward(torch.ones_like(out))
    del out
    peak = None
    if device.type == "cuda":
        x.grad = None
        block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(block, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    elif args.cpu_peak:
        from revnet_torch.profiler import DetailedMemoryProfiler

        x.grad = None
        block.zero_grad(set_to_none=True)
        with DetailedMemoryProfiler() as prof:
            step(block, x)
        peak = prof.generate_report().peak("cpu")[1]
    return {"impl": kind, "seq_len": T, "fwd_bwd_s": min(times), "times_s": times,
            "saved_bytes": saved["bytes"], "peak_bytes": peak,
            "dense_scores_bytes": args.batch * args.heads * T * T * 4}


def table(result: dict) -> str:
    """The markdown table docs/hierarchical_attention.md shows for a result file: one row per length."""
    by = {}
    for row in result["rows"]:
        by.setdefault(row["seq_len"], {})[row["impl"]] = row

    def mib(b):
        return "-" if b is None else f"{b / 2**20:.1f}"

    lines = ["| T | keys/query (max) | hierarchical s | SDPA s | saved MiB (hier / SDPA) | peak MiB (hier / SDPA) "
             "| fp32 (T, T) scores, all heads, MiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for T, r in sorted(by.items()):
        h, s = r["hierarchical"], r.get("sdpa")
        lines.append(f"| {T} | {h['keys_per_query_max']} | {h['fwd_bwd_s']:.3f} | "
                     f"{'-' if s is None else format(s['fwd_bwd_s'], '.3f')} | "
                     f"{mib(h['saved_bytes'])} / {mib(None if s is None else s['saved_bytes'])} | "
                     f"{mib(h['peak_bytes'])} / {mib(None if s is None else s['peak_bytes'])} | "
                     f"{h['dense_scores_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--local-window", type=int, default=128)
    p.add_argument("--ratios", type=int, nargs="*", default=[4, 16, 64])
    p.add_argument("--level-blocks", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--sdpa-max-length", type=int, default=1 << 20)
    p.add_argument("--cpu-peak", action="store_true", help="also profile the CPU peak (an extra untimed run)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import torch

    from revnet_torch.hierarchical import Hierarchy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    h = Hierarchy(args.local_window, tuple(args.ratios), args.level_blocks)
    rows = []
    for T in args.lengths:
        kinds = ["hierarchical"] + (["sdpa"] if T <= args.sdpa_max_length else [])
        for kind in kinds:
            row = measure(kind, T, args, device, dtype)
            if kind == "hierarchical":
                row["keys_per_query_max"] = h.keys_per_query(T)
            rows.append(row)
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f} MiB"
            print(f"T={T:>8} {kind:>12}: {row['fwd_bwd_s'] * 1e3:9.1f} ms  saved {row['saved_bytes'] / 2**20:8.2f} MiB"
                  f"  peak {peak}  (fp32 (T, T) scores of all heads: {row['dense_scores_bytes'] / 2**20:.0f} MiB)",
                  flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None
                                                                                  else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "config": {"batch": args.batch, "d_model": args.d_model, "heads": args.heads,
                   "local_window": args.local_window, "compression_ratios": args.ratios,
                   "level_blocks": args.level_blocks, "chunk_size": args.chunk_size, "repeats": args.repeats},
        "rows": rows,
    }
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
