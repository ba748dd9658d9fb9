"""Whole-stack reconstruction drift and the gradient gap of ``reverse`` against ``store``, per depth.

For each depth, coupling, weight scale and precision: the layer-0 input rebuilt by inverting the whole
stack (max |x - x_rebuilt| / max|x|), and the relative L2 gap of all parameter gradients of ``reverse``
against ``store`` on the same batch; for reference bf16's own noise (bf16-autocast ``store`` against fp32
``store``). ``--exact`` adds the rows of ``reverse`` with the engine's fixed-point streams
(``exact_streams``) and, for comparison, anchored segments (a ``store`` layer every ``--anchor`` layers).
Small width on CPU; writes JSON and a markdown table.

    python benchmarks/reconstruction_drift.py --depths 8,24,48,96 --out docs/benchmarks/numerics/drift
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def build(depth: int, coupling: str, weights: str, d_model: int, heads: int, seq: int, seed: int = 0,
          checkpoint: str | None = None):
    """A model of ``depth`` layers; ``weights="trained"``: every matrix N(0, 1/fan_in) (trained-like sizes);
    ``weights="checkpoint"``: the layers of a ``revnet train`` checkpoint, repeated in order to fill
    ``depth`` (actually trained weights at any depth), with its embedding, final norm and head."""
    import torch

    import revnet_core

    if weights == "checkpoint":
        from revnet_torch.generate import load_for_inference

        trained = load_for_inference(checkpoint)
        model = revnet_core.build("torch", config=trained.config.replace(num_layers=depth))
        with torch.no_grad():
            for name in ("embed", "norm", "head"):
                getattr(model, name).load_state_dict(getattr(trained, name).state_dict())
            for i, layer in enumerate(model.layers):
                layer.load_state_dict(trained.layers[i % len(trained.layers)].state_dict())
        return model.train()
    torch.manual_seed(seed)
    model = revnet_core.build("torch", num_layers=depth, d_model=d_model, num_heads=heads, vocab_size=256,
                              max_seq_len=seq, coupling=coupling)
    if weights == "trained":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def grads(model, ids, policy: str, precision: str, exact, anchor: int = 0):
    """All parameter gradients of one forward + backward, concatenated (float64); ``exact``: the engine's
    exact streams (True | False | "auto")."""
    import torch

    from revnet_torch import engine

    plan = [policy] * len(model.layers)
    if anchor:
        plan = ["store" if i % anchor == 0 else policy for i in range(len(plan))]
    model.set_policy(plan)
    model.zero_grad(set_to_none=True)
    dtype = PRECISIONS[precision]
    with engine.exact_streams(exact), torch.autocast("cpu", dtype=getattr(torch, dtype or "bfloat16"),
                                                     enabled=dtype is not None):
        loss = model(ids).loss
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def rebuild_error(model, ids, precision: str) -> tuple[float, float]:
    """(max |x0 - rebuilt x0| / max|x0|, max|top stream| / max|x0|): the layer-0 input rebuilt through the
    inverse of every layer, under the precision's autocast (what the reversible backward computes)."""
    import torch

    dtype = PRECISIONS[precision]
    with torch.no_grad(), torch.autocast("cpu", dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None):
        x1, x2 = model.streams(ids)
        y1, y2 = x1, x2
        for layer in model.layers:
            y1, y2 = layer(y1, y2)
        top = max(y1.abs().max().item(), y2.abs().max().item())
        for layer in reversed(model.layers):
            y1, y2 = layer.inverse(y1, y2)
    scale = x1.abs().max().item()
    return max((y1 - x1).abs().max().item(), (y2 - x2).abs().max().item()) / scale, top / scale


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def measure(depth: int, coupling: str, weights: str, precision: str, args) -> dict:
    import torch

    model = build(depth, coupling, weights, args.d_model, args.heads, args.seq, checkpoint=args.checkpoint)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    fp32_store = grads(model, ids, "store", "fp32", exact=False)
    store = grads(model, ids, "store", precision, exact=False)
    reverse = grads(model, ids, "reverse", precision, exact=False)
    drift, growth = rebuild_error(model, ids, precision)
    row = {"depth": depth, "coupling": coupling, "weights": weights, "precision": precision,
           "drift": drift, "stream_growth": growth, "gap_reverse": rel(reverse, store),
           "own_noise": rel(store, fp32_store) if precision != "fp32" else 0.0}
    if args.exact and coupling == "additive":  # exact streams need additive couplings
        exact_store = grads(model, ids, "store", precision, exact=True)
        exact_reverse = grads(model, ids, "reverse", precision, exact=True)
        row["gap_exact"] = rel(exact_reverse, exact_store)  # reverse vs store of the same (fixed-point) model
        row["gap_exact_vs_float_store"] = rel(exact_reverse, store)  # against the plain float model
    if args.exact:
        row["gap_anchored"] = rel(grads(model, ids, "reverse", precision, exact=False, anchor=args.anchor), store)
    return row


COLUMNS = (("drift", "drift of x0"), ("gap_reverse", "gap reverse"), ("own_noise", "low precision's own gap"),
           ("gap_exact", "gap exact streams (same model)"), ("gap_exact_vs_float_store", "gap exact vs float store"),
           ("gap_anchored", "gap anchored"))


def markdown(rows, command: str) -> str:
    """The rows as a markdown table under the command that wrote them; '-' where a column does not apply."""
    cols = [(k, name) for k, name in COLUMNS if any(k in r for r in rows)]
    head = ["depth", "coupling", "weights", "precision", "stream growth", *(name for _, name in cols)]
    lines = [f"`{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["depth"], r["coupling"], r["weights"], r["precision"], f"{r['stream_growth']:.1f}x"]
        cells += [f"{r[k]:.2e}" if k in r and not (k == "own_noise" and r["precision"] == "fp32") else "-"
                  for k, _ in cols]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="8,24,48,96")
    ap.add_argument("--couplings", default="additive,affine")
    ap.add_argument("--weights", default="init,trained", help="init, trained (N(0, 1/fan_in)), checkpoint")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="also measure the fixes (exact streams, anchors)")
    ap.add_argument("--anchor", type=int, default=8, help="a store layer every this many layers")
    ap.add_argument("--checkpoint", default=None, help="a `revnet train` checkpoint (or run folder) for "
                    "--weights checkpoint: its trained layers, repeated to each depth")
    ap.add_argument("--out", default=None, help="path prefix: writes PREFIX.json and PREFIX.md")
    args = ap.parse_args(argv)
    if "checkpoint" in args.weights.split(",") and not args.checkpoint:
        ap.error("--weights checkpoint needs --checkpoint PATH")
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = " ".join(["python", *sys.argv])
    rows = []
    for coupling in args.couplings.split(","):
        for weights in args.weights.split(","):
            for precision in args.precisions.split(","):
                for depth in (int(d) for d in args.depths.split(",")):
                    t0 = time.perf_counter()
                    r = measure(depth, coupling, weights, precision, args)
                    rows.append(r)
                    extra = "".join(f" {k} {r[k]:.2e}" for k, _ in COLUMNS[3:] if k in r)
                    print(f"{coupling:>8} {weights:>7} {precision} L{depth:<4} drift {r['drift']:.2e} "
                          f"growth {r['stream_growth']:.1f} gap {r['gap_reverse']:.2e} own {r['own_noise']:.2e}{extra} "
                          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.out:
        env = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
               "command": command, "d_model": args.d_model, "heads": args.heads, "seq": args.seq,
               "batch": args.batch, "anchor": args.anchor}
        with open(args.out + ".json", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(rows, command))
    return 0 if all(math.isfinite(r["gap_reverse"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
