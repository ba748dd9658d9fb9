"""The longest context one GPU trains for the seed model: found by the cost model, confirmed by one real step.

The cost model's predicted peak (reverse policy, bf16 autocast, AdamW) is bisected for the largest length, in
steps of 64k tokens, that stays under ``--fraction`` of the device's memory (the rest is the allocator's
fragmentation headroom). Then one training step runs at that length with ``--layers`` layers (a full-depth
step passes one device command's time limit; activations are flat in depth under ``reverse``), after a short
step that creates AdamW's state, so the measured peak includes it. The full-depth peak is the measurement plus
the cost model's difference between full depth and ``--layers`` (the missing layers' parameters, gradients
and AdamW state).

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/max_context.py --out max_context.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

SEED = dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257, activation="gelu")
STEP = 65536


def predicted(seq: int, layers: int) -> int:
    from revnet_core import ModelConfig
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel

    cfg = ModelConfig(**{**SEED, "num_layers": layers, "max_seq_len": seq})
    return CostModel(cfg, Workload(seq_len=seq, autocast_dtype="bfloat16", device="cuda")).peak_bytes("reverse")


def longest(budget: float) -> int:
    """Largest multiple of STEP whose predicted full-depth peak fits ``budget`` bytes."""
    lo, hi = STEP, STEP
    while predicted(hi, SEED["num_layers"]) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        lo, hi = (mid, hi) if predicted(mid, SEED["num_layers"]) <= budget else (lo, mid)
    return lo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.85, help="share of device memory the prediction may use")
    ap.add_argument("--layers", type=int, default=1, help="layers in the confirming step")
    ap.add_argument("--seq", type=int, default=None, help="skip the search and confirm this length")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    import revnet_core

    total = torch.cuda.get_device_properties(0).total_memory
    seq = args.seq or longest(args.fraction * total)
    pred_full, pred_run = predicted(seq, SEED["num_layers"]), predicted(seq, args.layers)
    print(f"device {torch.cuda.get_device_name(0)}: {total / 2**30:.2f} GiB; longest predicted to fit "
          f"{args.fraction:.0%}: {seq} tokens ({pred_full / 2**30:.2f} GiB at {SEED['num_layers']} layers)", flush=True)

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = revnet_core.ModelConfig(**{**SEED, "num_layers": args.layers, "max_seq_len": seq})
    model = revnet_core.build("torch", config=cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(n: int) -> float:
        ids = torch.randint(0, SEED["vocab_size"], (1, n), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(1024)  # creates AdamW's state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        loss = step(seq)
        oom = False
    except torch.OutOfMemoryError as exc:
        loss, oom = None, str(exc).splitlines()[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    row = {
        "seq": seq, "layers_run": args.layers, "oom": oom, "loss": loss, "step_s": seconds,
        "peak_allocated_gib": peak / 2**30, "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "predicted_peak_gib_layers_run": pred_run / 2**30, "predicted_peak_gib_full_depth": pred_full / 2**30,
        "projected_full_depth_gib": (peak + pred_full - pred_run) / 2**30,
        "device_total_gib": total / 2**30, "fraction": args.fraction,
    }
    print(json.dumps(row), flush=True)
    result = {"environment": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "python": platform.python_version(),
                              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                              "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
              "config": {**SEED, "layers_run": args.layers}, "row": row}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if not oom else 1


if __name__ == "__main__":
    sys.exit(main())
