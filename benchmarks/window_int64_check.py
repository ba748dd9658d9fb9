"""GPU checks of the sliding-window path: the model's windowed attention (Triton kernel) under the reversible
backward, and the Triton kernel's 64-bit offsets at a size where q alone passes 2^31 elements.

1. A 2-layer d1024 model with ``attention_window=256`` at 4096 tokens, bf16 autocast: gradients of
   ``reverse`` against ``store`` (cosine), and that the Triton kernel ran.
2. q, k, v of (1, 16, 2^21 + 8192, 64) bf16 (2.2e9 elements each) with a window of 1024: the last 2048
   queries' output, and the gradients reaching them, against the fp32 reference on the slice of keys they see.

    python benchmarks/window_int64_check.py --out window_int64.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import revnet_core
from head_chunk_check import grads as flat_grads  # this folder is on sys.path when a script here runs


def model_check() -> dict:
    from revnet_kernels import registry

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = revnet_core.build("torch", num_layers=2, d_model=1024, num_heads=16, vocab_size=50257,
                              max_seq_len=4096, attention_window=256).to(dev)
    ids = torch.randint(0, 50257, (1, 4096), device=dev)
    grads = {policy: flat_grads(model, ids, policy, autocast=True)[1] for policy in ("store", "reverse")}
    cos = torch.nn.functional.cosine_similarity(grads["reverse"], grads["store"], dim=0).item()
    chosen = registry.select("attention", device=dev, dtype=torch.bfloat16,
                             meta={"window": 256, "return_lse": False, "head_dim": 64, "causal": True}).impl
    return {"check": "model, window 256, reverse vs store", "cosine": cos, "kernel": chosen,
            "ok": cos > 0.999 and chosen == "triton" and bool(torch.isfinite(grads["reverse"]).all())}


def int64_check() -> dict:
    from revnet_kernels.attn import reference_attention
    from revnet_kernels.attn_triton import flash_attention

    torch.manual_seed(0)
    H, D, W, tail = 16, 64, 1024, 2048
    T = 2**21 + 8192
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o, _ = flash_attention(q, k, v, True, W)
    do = torch.zeros_like(o)
    do[:, :, -tail:] = torch.randn(1, H, tail, D, device="cuda", dtype=torch.bfloat16)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    lo = T - tail - W  # the keys the last ``tail`` queries see, and one window more of queries before them
    qs, ks, vs = (t.detach()[:, :, lo:].float().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qs, ks, vs, causal=True, window=W)
    g = torch.zeros_like(ref)
    g[:, :, -tail:] = do[:, :, -tail:].float()
    rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), g)
    def rel(a, b):  # max error relative to the reference's largest entry (bf16 against fp32)
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    err = {"o": rel(o[:, :, -tail:], ref[:, :, -tail:]), "dq": rel(dq[:, :, -tail:], rq[:, :, -tail:]),
           "dk": rel(dk[:, :, lo + W:], rk[:, :, W:]), "dv": rel(dv[:, :, lo + W:], rv[:, :, W:])}
    untouched = dq[:, :, : T - tail - W].abs().max().item()  # queries with zero cotangent get zero dq
    ok = all(e < 2e-2 for e in err.values()) and untouched == 0.0
    return {"check": "int64 offsets, window 1024", "q_elements": q.numel(), "max_rel_err": err,
            "dq_outside_the_tail": untouched, "ok": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [model_check()]
    print(json.dumps(rows[-1]), flush=True)
    torch.cuda.empty_cache()
    rows.append(int64_check())
    print(json.dumps(rows[-1]), flush=True)
    result = {"environment": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "command": " ".join(["python3"] + sys.argv)}, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
