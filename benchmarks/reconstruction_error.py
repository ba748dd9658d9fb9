"""How well the reverse pass rebuilds the streams, per depth: run N layers forward, invert them all, compare.

fp32 streams, blocks under bf16 autocast (the training setting) or plain fp32, through ``layer.inverse``
(float streams: not the engine's exact streams). Init-scale weights scaled by ``--trained-scale`` in the
projections only; the error grows with depth, fast with trained-like weights:
``benchmarks/reconstruction_drift.py`` measures that, and the gradients, per depth (docs/numerics.md).

    python benchmarks/reconstruction_error.py --depths 24,96 --seq 4096 --out recon.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def measure(depth: int, seq: int, d_model: int, heads: int, autocast: bool, device: str, trained_scale: float):
    import torch

    import revnet_core

    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=depth, d_model=d_model, num_heads=heads, vocab_size=256,
                              max_seq_len=seq).to(device)
    with torch.no_grad():  # random init makes F, G tiny; scale the projections into the streams up to trained-like sizes
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                p.mul_(trained_scale)
    x = model.embed(torch.randint(0, 256, (1, seq), device=device)).float() * 10
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
        y1, y2 = x, x
        for layer in model.layers:
            y1, y2 = layer(y1, y2)
        out_scale = max(y1.abs().max().item(), y2.abs().max().item())
        for layer in reversed(model.layers):
            y1, y2 = layer.inverse(y1, y2)
        err = max((y1 - x).abs().max().item(), (y2 - x).abs().max().item())
    return {"depth": depth, "max_abs_error": err, "input_max": x.abs().max().item(), "output_max": out_scale,
            "relative_error": err / x.abs().max().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="24,96")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--trained-scale", type=float, default=4.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for autocast in (True, False):
        for depth in [int(d) for d in args.depths.split(",")]:
            r = measure(depth, args.seq, args.d_model, args.heads, autocast, args.device, args.trained_scale)
            r["autocast_bf16"] = autocast
            rows.append(r)
            print(f"depth {r['depth']:>4} bf16-autocast={autocast!s:>5}  max|x - x_rebuilt| = "
                  f"{r['max_abs_error']:.3e}  (|x|max {r['input_max']:.2f}, rel {r['relative_error']:.2e})")
    if args.out:
        import torch

        env = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
               "torch": torch.__version__, "command": " ".join(["python"] + sys.argv)}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "seq": args.seq, "d_model": args.d_model, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
