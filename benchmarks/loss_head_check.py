"""The model's two loss heads on the GPU: the fused Triton linear cross-entropy (``loss_kernel="fused"``, the
CUDA default) against the PyTorch chunked head, same weights and tokens, bf16 autocast: loss difference and
the cosine of every parameter's gradient.

    python benchmarks/loss_head_check.py --seq 8192 --layers 2 --out loss_head_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import revnet_core
from seed_step import SEED


def loss_and_grads(kernel: str, seq: int, layers: int):
    torch.manual_seed(0)
    model = revnet_core.build("torch", **SEED, num_layers=layers, max_seq_len=seq, loss_kernel=kernel).cuda()
    ids = torch.randint(0, SEED["vocab_size"], (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    (lc, gc), (lf, gf) = (loss_and_grads(k, args.seq, args.layers) for k in ("chunked", "fused"))
    cos = {n: torch.nn.functional.cosine_similarity(gc[n].flatten(), gf[n].flatten(), dim=0).item() for n in gc}
    worst = min(cos, key=cos.get)
    out = {"environment": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "python": platform.python_version(), "command": " ".join(["python3", *sys.argv])},
           "seq": args.seq, "layers": args.layers, "loss_chunked": lc, "loss_fused": lf,
           "loss_abs_diff": abs(lc - lf), "min_grad_cosine": cos[worst], "min_grad_cosine_param": worst,
           "head_grad_cosine": cos["head.weight"] if "head.weight" in cos else None,
           "any_nan": any(not torch.isfinite(g).all() for g in gf.values())}
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
