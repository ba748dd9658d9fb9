"""The seed model's training step with Rational-Fourier (linear) attention in every layer, at 64k and 1M tokens.

The seed model (24 x d1024 x 16 heads, vocab 50257) built by ``revnet_core.build`` with every layer's attention
half replaced by ``ReversibleAttention(use_rational_attention=True)`` (gaussian kernel, 64 features, chunk 64,
the model's RoPE), policy ``reverse``; beside it the same model with softmax attention where it runs in time.
bf16 autocast (the RF features and sums stay fp32), fused AdamW, batch 1; peak = max_memory_allocated over the
timed steps (after step 1, when AdamW's state exists); time = their median. Cells run in order in one process;
an out-of-memory is a result.

    python benchmarks/rf_seed_step.py --cells rf:65536,softmax:65536,rf:1048576 --out rf_seed.json
    python benchmarks/rf_seed_step.py --smoke    # CPU, 2 tiny layers: the build and one step, no timing claim
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_step import SEED, environment, timed_steps  # noqa: E402


def build(kind: str, seq: int, layers: int, features: int, device):
    import revnet_core
    from revnet_torch.layers import ReversibleAttention

    model = revnet_core.build("torch", **{**SEED, "num_layers": layers}, max_seq_len=seq)
    if kind == "rf":
        cfg = model.config
        for layer in model.layers:
            layer.attn = ReversibleAttention(cfg.d_model, cfg.num_heads, revnet_core.resolve_coupling(cfg),
                                             norm=cfg.norm, norm_eps=cfg.norm_eps, rotary=model.rotary,
                                             use_rational_attention=True, num_fourier_features=features)
    return model.to(device)


def run_cell(kind: str, seq: int, args) -> dict:
    import torch

    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = build(kind, seq, args.layers, args.features, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, SEED["vocab_size"], (1, seq), device=device)
    row = {"attention": kind, "seq": seq, "layers": args.layers, "params": sum(p.numel() for p in model.parameters())}
    try:
        times, losses = timed_steps(model, ids, opt, args.steps)
    except torch.OutOfMemoryError:
        row["oom"] = True
        return row
    row.update(oom=False, step_s_median=statistics.median(times), step_s_all=times, losses=losses)
    if cuda:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="rf:65536,softmax:65536,rf:1048576", help="ATTENTION:SEQ, comma-separated")
    ap.add_argument("--layers", type=int, default=SEED["num_layers"])
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.steps, args.cells = 2, 1, "rf:64,softmax:64"
    result = {"environment": environment() if not args.smoke else {"device": "cpu (smoke)"}, "rows": []}
    for cell in args.cells.split(","):
        kind, seq = cell.split(":")
        row = run_cell(kind, int(seq), args)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        import torch

        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print("attention | tokens | peak GiB | step s")
    for r in result["rows"]:
        print(f"{r['attention']} | {r['seq']} | {r.get('peak_allocated_gib', '-')} | "
              f"{'OOM' if r['oom'] else round(r['step_s_median'], 3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
