"""Training-step time of the numba backend beside torch on the CPU: the same model, weights and batch.

One step = forward + backward (each reversible layer rebuilt from its outputs) + AdamW, float32, batch 1,
d_model 256, 4 layers, 4 heads, vocab 256, policy ``reverse`` in both. Threads are pinned before any
library loads (numba's prange, numpy's OpenBLAS, torch's intra-op pool). Each cell reports the median of
``--steps`` timed steps after one warm-up step (numba's compile is cached and never timed), and, for numba,
where the time goes: one more step with every kernel call of the blocks timed (attention forward and
backward, matmuls, norms, activations, RoPE; the rest is the loss head, couplings, AdamW and Python), and
attention's kernels timed alone on the step's shapes.

    python benchmarks/numba_vs_torch.py --out docs/benchmarks/numba/cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

# Before numpy, numba or torch is imported: each reads its thread count once.
_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2")
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = _THREADS

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import revnet_core  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(step, steps: int) -> tuple[float, list[float]]:
    step()  # warm-up: compiles, caches, first-touch allocations
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def torch_cell(cfg: dict, weights: str, ids: np.ndarray, steps: int) -> dict:
    model = revnet_core.build("torch", weights=weights, **cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.from_numpy(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).loss.backward()
        opt.step()

    med, times = median_time(step, steps)
    return {"backend": "torch", "step_s": med, "times_s": times}


class KernelTimes:
    """Patches the names ``revnet_numba.blocks`` calls its kernels by, timing each call (and each pullback the
    registry's norms and activations return) into a category; ``restore()`` puts them back."""

    def __init__(self):
        import revnet_numba.blocks as blocks

        self.blocks, self.seconds, self._saved = blocks, {}, []
        for name, what in (("causal_attention", "attention forward"),
                           ("causal_attention_backward", "attention backward"), ("matmul", "matmuls")):
            self._patch(blocks, name, what)
        for name in ("split_heads_rope", "merge_heads_rope_backward"):
            self._patch(blocks.K, name, "rope")
        for name, what in (("layer_norm", "norms"), ("rms_norm", "norms"), ("activation", "activations")):
            self._patch(blocks.KI, name, what, pullback=True)

    def _timed(self, fn, what, pullback=False):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t
            if pullback:
                return out[0], self._timed(out[1], what)
            return out
        return run

    def _patch(self, module, name, what, pullback=False):
        fn = getattr(module, name)
        self._saved.append((module, name, fn))
        setattr(module, name, self._timed(fn, what, pullback))

    def restore(self):
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def numba_cell(cfg: dict, weights: str, ids: np.ndarray, steps: int) -> dict:
    from revnet_numba.attention import causal_attention, causal_attention_backward
    from revnet_numba.optim import AdamW

    model = revnet_core.build("numba", weights=weights, **cfg)
    opt = AdamW(model.params, lr=1e-4)

    def step():
        opt.step(model.grads(ids))

    med, times = median_time(step, steps)
    timer = KernelTimes()
    try:
        t0 = time.perf_counter()
        step()
        profiled = time.perf_counter() - t0
    finally:
        timer.restore()
    breakdown = dict(timer.seconds)
    breakdown["rest (loss head, couplings, AdamW, Python)"] = profiled - sum(timer.seconds.values())
    B, T = ids.shape
    H, hd = cfg["num_heads"], cfg["d_model"] // cfg["num_heads"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, T, hd)).astype(np.float32) for _ in range(3))
    tile = model.layers.block.attn_block
    o, lse = causal_attention(q, k, v, tile)
    do = rng.standard_normal(o.shape).astype(np.float32)
    fwd, _ = median_time(lambda: causal_attention(q, k, v, tile), steps)
    bwd, _ = median_time(lambda: causal_attention_backward(q, k, v, o, lse, do, tile), steps)
    # A reverse layer's step runs attention forward twice (forward, recompute) and backward once.
    attention = cfg["num_layers"] * (2 * fwd + bwd)
    return {"backend": "numba", "step_s": med, "times_s": times, "attention_forward_s": fwd,
            "attention_backward_s": bwd, "attention_share_of_step": attention / med,
            "profiled_step_s": profiled, "breakdown_s": breakdown}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attn-block", type=int, default=256, help="numba attention tile rows (NumbaOptions)")
    ap.add_argument("--no-matmul-split", action="store_true",
                    help="numba: numpy's matmul, not split over numba's threads (NumbaOptions.matmul_split)")
    ap.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads of the numba cells (0: leave)")
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(int(args.threads))
    seqs = [int(s) for s in args.seqs.split(",")]
    cfg = dict(num_layers=4, d_model=256, num_heads=4, vocab_size=256, max_seq_len=max(seqs),
               backend_options={"numba": {"threads": int(args.threads), "attn_block": args.attn_block,
                                          "blas_threads": args.blas_threads,
                                          "matmul_split": not args.no_matmul_split}})
    torch_cfg = {k: v for k, v in cfg.items() if k != "backend_options"}
    os.makedirs("runs", exist_ok=True)
    weights = os.path.join("runs", "numba_vs_torch.safetensors")
    torch.manual_seed(0)
    revnet_core.build("torch", **torch_cfg).save_weights(weights)
    rows = []
    for T in seqs:
        ids = np.random.default_rng(T).integers(0, cfg["vocab_size"], (1, T)).astype(np.int64)
        t = torch_cell(torch_cfg, weights, ids, args.steps)
        n = numba_cell(cfg, weights, ids, args.steps)
        row = {"seq": T, "torch": t, "numba": n, "numba_over_torch": n["step_s"] / t["step_s"]}
        rows.append(row)
        print(f"seq {T}: torch {t['step_s']:.3f} s, numba {n['step_s']:.3f} s, ratio {row['numba_over_torch']:.2f}x, "
              f"attention {100 * n['attention_share_of_step']:.0f}% of the numba step", flush=True)
        parts = sorted(n["breakdown_s"].items(), key=lambda kv: -kv[1])
        print("    numba step (one profiled step, %.3f s): " % n["profiled_step_s"]
              + ", ".join(f"{k} {100 * v / n['profiled_step_s']:.0f}%" for k, v in parts), flush=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": int(args.threads),
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "numba": __import__("numba").__version__, "python": platform.python_version()},
        "model": {**torch_cfg, "dtype": "float32", "batch": 1, "policy": "reverse"},
        "step": "forward + backward + AdamW",
        "rows": rows,
    }
    out = args.out
    if out is None and os.environ.get("OUT"):
        out = os.path.join(os.environ["OUT"], "numba_vs_torch.json")
    if out:
        args.out = out
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
