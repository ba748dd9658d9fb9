"""Rational-Fourier attention's estimator error against exact attention vs the number of random features.

For each kernel (gaussian: against exact softmax attention; laplacian, cauchy: against exact attention with
that kernel's weights) and each ``--scales`` entry, heads q, k, v ~ N(0, scale^2) (scale 1: what a
LayerNorm'd input through N(0, 1/fan_in) weights gives), causal, and for each feature count m the relative error
|out - exact| / |exact| over the whole (B, H, T, hd) output, averaged over ``--trials`` feature draws
(fixed seeds). Also the slope of log(error) vs log(m) over the upper half of the sweep (Monte Carlo theory:
-0.5 once the ratio estimator is in its asymptotic regime). The positive features' variance grows like
exp(|q + k|^2 / sqrt(hd)), which is why the scale matters so much for gaussian. CPU, float64; a few minutes
at the defaults.

    python benchmarks/rf_error_curve.py                        # writes docs/benchmarks/rf/error_curve.{json,png}
    python benchmarks/rf_error_curve.py --out /tmp/rf --trials 2 --features 8,32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path


def curve(kernel: str, features: list[int], trials: int, T: int, hd: int, heads: int, batch: int, scale: float,
          chunk: int) -> list[dict]:
    import torch

    from revnet_torch.rf_attention import RationalFourierAttention, causal_linear_attention, exact_causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (scale * torch.randn(batch, heads, T, hd, generator=g, dtype=torch.float64) for _ in range(3))
    exact = exact_causal_attention(kernel, q, k, v)
    rows = []
    for m in features:
        att = RationalFourierAttention(hd * heads, heads, m, kernel, use_rope=False).double()
        errors = []
        for s in range(trials):
            att.redraw_features(torch.Generator().manual_seed(1000 + s))
            fq, fk = att.feature_map(q, True), att.feature_map(k, False)
            floor = None
            if kernel != "gaussian":
                floor = att.eps * torch.arange(1, T + 1, dtype=torch.float64).expand(batch, T)
            out, _, _ = causal_linear_attention(fq, fk, v, chunk, floor=floor)
            errors.append(((out - exact).norm() / exact.norm()).item())
        mean = sum(errors) / len(errors)
        sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / max(1, len(errors) - 1))
        rows.append({"kernel": kernel, "num_fourier_features": m, "feature_width": att.feature_width,
                     "rel_error_mean": mean, "rel_error_sd": sd, "trials": trials})
    return rows


def slope(rows: list[dict]) -> float | None:
    """Least-squares slope of log(error) on log(m) over the upper half of the sweep."""
    upper = rows[len(rows) // 2:]
    if len(upper) < 2:
        return None
    xs = [math.log(r["num_fourier_features"]) for r in upper]
    ys = [math.log(r["rel_error_mean"]) for r in upper]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(result["curves"])
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.6 * len(kernels), 4.2), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        for scale, rows in result["curves"][kernel].items():
            ms = [r["num_fourier_features"] for r in rows]
            ax.errorbar(ms, [r["rel_error_mean"] for r in rows], yerr=[r["rel_error_sd"] for r in rows],
                        marker="o", capsize=3, label=f"scale {scale} (slope {result['slopes'][kernel][scale]:+.2f})")
        rows = list(result["curves"][kernel].values())[0]
        ms = [r["num_fourier_features"] for r in rows]
        mid = len(ms) // 2
        ax.plot(ms, [rows[mid]["rel_error_mean"] * (m / ms[mid]) ** -0.5 for m in ms], "k:", label="m^-1/2")
        ref = result["setup"]["reference"][kernel]
        ax.set(xscale="log", yscale="log", xlabel="num_fourier_features (m)", title=f"{kernel} vs {ref}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"relative error (T={result['setup']['T']}, head_dim={result['setup']['head_dim']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default="gaussian,laplacian,cauchy")
    p.add_argument("--features", default="4,8,16,32,64,128,256,512,1024,2048")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scales", default="0.25,0.5,1.0", help="stds of q, k, v entries, comma-separated")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", default=None, help="folder (default: $OUT if set, else docs/benchmarks/rf)")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "docs/benchmarks/rf")
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    features = [int(m) for m in args.features.split(",")]
    kernels = args.kernels.split(",")
    t0 = time.perf_counter()
    scales = args.scales.split(",")
    curves = {kern: {sc: curve(kern, features, args.trials, args.seq, args.head_dim, args.heads, args.batch,
                               float(sc), args.chunk) for sc in scales} for kern in kernels}
    result = {
        "command": "python benchmarks/rf_error_curve.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "setup": {"T": args.seq, "head_dim": args.head_dim, "heads": args.heads, "batch": args.batch,
                  "scales": [float(sc) for sc in scales], "chunk": args.chunk, "trials": args.trials,
                  "dtype": "float64", "device": "cpu",
                  "reference": {"gaussian": "exact softmax attention", "laplacian": "exact laplacian-kernel attention",
                                "cauchy": "exact cauchy-kernel attention"}},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine()},
        "seconds": round(time.perf_counter() - t0, 1),
        "slopes": {kern: {sc: slope(rows) for sc, rows in by_scale.items()} for kern, by_scale in curves.items()},
        "curves": curves,
    }
    (out / "error_curve.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "error_curve.png")
    print(f"{'kernel':>10} {'scale':>5} " + " ".join(f"{m:>7}" for m in features) + "   slope")
    for kern, by_scale in curves.items():
        for sc, rows in by_scale.items():
            s = result["slopes"][kern][sc]
            print(f"{kern:>10} {sc:>5} " + " ".join(f"{r['rel_error_mean']:7.4f}" for r in rows)
                  + (f"   {s:+.2f}" if s is not None else ""))
    print(f"json: {out / 'error_curve.json'}\nplot: {out / 'error_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
