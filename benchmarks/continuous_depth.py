"""Continuous-depth (ODE) model against the discrete ReversibleTransformer of the same width, on CPU.

Every model trains the same number of AdamW steps on the same training windows of the embedded corpus
(revnet_core.data.stdlib_corpus, bytes) and is evaluated on the same held-out windows: bits per byte
(mean next-byte nats / ln 2), the median step time (forward + backward + optimizer), and for the ODE models
the function evaluations (NFE: one evaluation of F and G) per forward and per backward. The ODE models: an
adaptive solver (dopri5, adjoint gradients), fixed-grid rk4 (adjoint) and the reversible integrator, both
with ``--fixed-steps`` steps. The discrete models are 1 layer (about the ODE models' parameters: one attention
and one FFN block) and ``--deep`` layers (the reversible integrator's compute at ``--fixed-steps`` = 4).

    python benchmarks/continuous_depth.py --out docs/benchmarks/continuous_depth/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path


def make_models(args) -> dict:
    import torch

    from revnet_torch import ReversibleTransformer
    from revnet_torch.ode import ContinuousDepthRevNet

    arch = dict(d_model=args.d_model, num_heads=args.heads, vocab_size=256, max_seq_len=args.seq)
    models = {}
    for name, make in [
        (f"ode-adaptive-{args.solver}", lambda: ContinuousDepthRevNet(
            depth_function="adaptive", ode_solver=args.solver, tolerance=args.tolerance, max_depth=args.max_depth,
            **arch)),
        (f"ode-fixed-rk4-{args.fixed_steps}", lambda: ContinuousDepthRevNet(
            depth_function="fixed", ode_solver="rk4", max_depth=args.fixed_steps, **arch)),
        (f"ode-fixed-reversible-{args.fixed_steps}", lambda: ContinuousDepthRevNet(
            depth_function="fixed", ode_solver="reversible", max_depth=args.fixed_steps, **arch)),
        ("discrete-1-layer", lambda: ReversibleTransformer(num_layers=1, **arch)),
        (f"discrete-{args.deep}-layers", lambda: ReversibleTransformer(num_layers=args.deep, **arch)),
    ]:
        torch.manual_seed(args.seed)  # the same initial draw for every model's shared shapes
        models[name] = make()
    return models


def lm_kwargs(model) -> dict:
    """Loss only: the ODE model returns logits by default, the discrete one only when asked."""
    from revnet_torch.ode import ContinuousDepthRevNet

    return {"return_logits": False} if isinstance(model, ContinuousDepthRevNet) else {}


def heldout_bits_per_byte(model, batches) -> float:
    """Mean nats over every held-out target (each window has seq - 1), in bits."""
    import torch

    nats, count = 0.0, 0
    with torch.no_grad():
        for ids, _ in batches:
            ids = torch.from_numpy(ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            nats += model(ids, **lm_kwargs(model)).loss.item() * n
            count += n
    return nats / count / math.log(2)


def train(name, model, args, data) -> dict:
    import numpy as np
    import torch

    from revnet_core.data import WindowSampler

    ode = name.startswith("ode")
    sampler = WindowSampler(data.sampler.tokens, args.seq, args.batch, seed=args.seed)  # same windows for all
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    times, losses, nfe_f, nfe_b = [], [], [], []
    for _ in range(args.steps):
        ids = torch.from_numpy(sampler.next_batch()[0])
        start = time.perf_counter()
        loss = model(ids, **lm_kwargs(model)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if ode:
            nfe_f.append(model.last_solve.nfe_forward)
            nfe_b.append(model.last_solve.nfe_backward)
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{name}: non-finite training loss")
    eval_start = time.perf_counter()
    bpb = heldout_bits_per_byte(model, data.eval_batches)
    row = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_bits_per_byte": round(bpb, 4),
        "train_loss_last_10": round(float(np.mean(losses[-10:])), 4),
        "step_time_ms_median": round(1e3 * statistics.median(times[1:]), 2),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
    }
    if ode:
        row.update(nfe_forward_mean=round(statistics.mean(nfe_f), 1), nfe_backward_mean=round(statistics.mean(nfe_b), 1),
                   nfe_forward_last=nfe_f[-1], nfe_backward_last=nfe_b[-1],
                   nfe_eval=model.last_solve.nfe_forward)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--solver", default="dopri5")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--max-depth", type=int, default=100)
    ap.add_argument("--fixed-steps", type=int, default=4)
    ap.add_argument("--deep", type=int, default=4, help="layers of the compute-matched discrete model")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    import torchdiffeq

    from revnet_core.data import lm_data, stdlib_corpus

    torch.set_num_threads(args.threads)
    corpus = stdlib_corpus()
    data = lm_data(corpus, args.seq, args.batch, seed=args.seed, eval_windows_max=args.eval_windows,
                   eval_batch_size=16)
    results = {}
    wall = time.perf_counter()
    for name, model in make_models(args).items():
        results[name] = train(name, model, args, data)
        print(name, json.dumps(results[name]), flush=True)
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torchdiffeq": torchdiffeq.__version__, "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "threads": args.threads,
                        "device": "cpu"},
        "data": {**corpus.identity(), "eval_windows": sum(len(b[0]) for b in data.eval_batches),
                 "eval_window_len": args.seq},
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
