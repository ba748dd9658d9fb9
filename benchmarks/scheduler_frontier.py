"""The memory scheduler on the seed model: predicted against measured peaks, and the memory/time frontier.

Part 1 (``--lengths``): the seed model at each length under uniform policies (reverse, checkpoint, store):
the cost model's predicted peak against ``torch.cuda.max_memory_allocated`` over steps 2-4 (AdamW state
exists only after step 1), including the optimizer step.

Part 2 (``--frontier``): at each frontier length, plain PyTorch (``PlainGPT``, every layer stored) sets the
reference; the adaptive scheduler runs with a budget of half of plain's measured peak and on a sweep of
budgets; checkpointing every k-th layer (ours and plain PyTorch's) gives the baseline frontier. Each point is
(measured peak, median step time of steps 2-4).

Each (method, length) cell runs in its own subprocess: an out-of-memory is a result, not a crash, and cannot
fragment the allocator for the next cell. Output: JSON (device, versions, command, attention kernels that
ran, every cell) and a PNG (frontier per length, and predicted vs measured peaks).

    python benchmarks/scheduler_frontier.py             # GPU: docs/benchmarks/scheduler_frontier.{json,png}
    python benchmarks/scheduler_frontier.py --tiny      # CPU, ~2 minutes: runs/scheduler_frontier_tiny.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SEED = dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257, activation="gelu")
TINY = dict(num_layers=6, d_model=64, num_heads=4, d_ff=256, vocab_size=256, activation="gelu", loss_chunk_size=128,
            ffn_chunk_size=256)
GiB = 2**30


# --- one cell, in its own process ----------------------------------------------------------------------------
def _policies_every(k: int, layers: int) -> list[str]:
    """Checkpoint every k-th layer (0, k, 2k, ...) and store the others; k = 0 stores all."""
    return ["checkpoint" if k and i % k == 0 else "store" for i in range(layers)]


def _plain_loss(model, ids, k: int):
    """PlainGPT's forward with torch.utils.checkpoint on every k-th layer (what users do today)."""
    from torch.utils.checkpoint import checkpoint

    from revnet_torch.loss import chunked_lm_loss, shift_targets

    x = model.embed(ids).float()
    for i, layer in enumerate(model.layers):
        x = checkpoint(layer, x, use_reentrant=False) if k and i % k == 0 else layer(x)
    h = model.norm(x)
    return chunked_lm_loss(h, model.head.weight, shift_targets(ids), model.config.loss_chunk_size)


def run_cell(spec: dict) -> dict:
    """spec: method (plain | plain_every | rev | every | adaptive), seq, device, config, and the method's
    parameter (policy, k, budget, granularity)."""
    import torch

    import revnet_core
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel
    from revnet_torch.baselines import PlainGPT
    from revnet_torch.profiler import DetailedMemoryProfiler
    from revnet_torch.scheduler import AdaptiveScheduler

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # small CPU cells: one thread is faster and its kernel buffers smallest
    seq, method = spec["seq"], spec["method"]
    cfg = revnet_core.ModelConfig(**{**spec["config"], "max_seq_len": seq})
    autocast = torch.bfloat16 if cuda else None
    workload = Workload(batch=1, seq_len=seq, autocast_dtype="bfloat16" if cuda else None,
                        device="cuda" if cuda else "cpu")
    cm = CostModel(cfg, workload)
    sched = None
    predicted = None
    if method in ("plain", "plain_every"):
        model = PlainGPT(cfg, memory="store").to(dev)
        k = spec.get("k", 0) if method == "plain_every" else 0
        loss_fn = lambda ids: _plain_loss(model, ids, k)  # noqa: E731
    else:
        model = revnet_core.build("torch", config=cfg).to(dev)
        if method == "rev":
            model.set_policy(spec["policy"])
        elif method == "every":
            model.set_policy(_policies_every(spec["k"], cfg.num_layers))
        if method in ("rev", "every"):
            predicted = cm.peak_bytes(model.policies)
            loss_fn = lambda ids: model(ids).loss  # noqa: E731
        else:
            sched = AdaptiveScheduler(model=model, memory_budget=int(spec["budget"]),
                                      recompute_granularity=spec.get("granularity", "layer"))

            def loss_fn(ids):
                with sched:
                    return model(ids).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=dev)
    times, plans = [], []
    peak_cpu = None
    prof = None

    def step():
        with torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        # Steps 2-4 measure the peak (and on CUDA the time); on CPU the allocation records slow the steps
        # down, so steps 5-7 are timed without them.
        for i in range(4 if cuda else 7):
            if i == 1:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    prof = DetailedMemoryProfiler().__enter__()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if (cuda and i >= 1) or (not cuda and i >= 4):
                times.append(time.perf_counter() - t0)
            if i == 3 and prof is not None:
                prof.__exit__(None, None, None)
                peak_cpu = prof.generate_report().peak("cpu")[1]
            if sched is not None and sched.plan is not None:
                plans.append(list(sched.plan.policies))
    except torch.OutOfMemoryError:
        return {"oom": True}
    if sched is not None:
        predicted = sched.plan.peak_bytes
    start = cm.parameter_bytes() + cm.optimizer_bytes() + cm.rope_table_bytes() + seq * 8
    row = {
        "oom": False,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if cuda:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        if predicted is not None:
            row["predicted_peak_gib"] = predicted / GiB
    else:  # CPU: the profiler sees allocations from the start of step 2; compare peaks above that start
        row["peak_above_start_mib"] = peak_cpu / 2**20
        if predicted is not None:
            row["predicted_above_start_mib"] = (predicted - start) / 2**20
    if sched is not None:
        row["plans"] = plans
        row["adjustments"] = sched.adjustments
        row["policy"] = sched.plan.summary()
    return row


# --- the driver ------------------------------------------------------------------------------------------------
def _run(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr or proc.stdout)[-3000:]}


def _label(spec: dict) -> str:
    m = spec["method"]
    if m == "rev":
        return f"ours {spec['policy']}"
    if m == "every":
        return f"ours ckpt every {spec['k']}"
    if m == "plain_every":
        return f"plain ckpt every {spec['k']}"
    if m == "adaptive":
        from revnet_core.memory import format_bytes

        return f"adaptive {spec.get('granularity', 'layer')} {format_bytes(spec['budget'])}"
    return "plain"


def _peak(row: dict, cuda: bool) -> float | None:
    return row.get("peak_allocated_gib") if cuda else row.get("peak_above_start_mib")


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": device,
           "inputs": "random token ids (torch.manual_seed(0)); no corpus"}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    else:
        env.update(threads=torch.get_num_threads())
    return env


def attention_kernels(device: str) -> list[str]:
    """The kernels one bf16 causal attention launches through our block's SDPA pinning (CUDA only)."""
    if device != "cuda":
        return ["cpu: scaled_dot_product_attention (flash attention for CPU)"]
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from revnet_torch.blocks import FUSED_SDPA

    q = torch.randn(1, 16, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with sdpa_kernel(FUSED_SDPA, set_priority=True):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    keys = ("flash", "fmha", "cudnn", "attn", "sdpa")
    return sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in keys)})


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = result["environment"]["device"] == "cuda"
    unit = "GiB" if cuda else "MiB above step start"
    frontier = result["frontier"]
    with_lengths = any("predicted_peak_gib" in r or "predicted_above_start_mib" in r for r in result["lengths"])
    n = len(frontier) + with_lengths
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.8), dpi=110)
    axes = axes if n > 1 else [axes]
    for ax, (seq, rows) in zip(axes, sorted(frontier.items(), key=lambda kv: int(kv[0]))):
        groups: dict[str, list] = {}
        for r in rows:
            if r.get("oom") or "error" in r:
                continue
            key = {"adaptive": f"adaptive, {r.get('granularity', 'layer')} granularity (ours)",
                   "every": "ours: checkpoint every k-th", "plain_every": "plain: checkpoint every k-th",
                   "plain": "plain PyTorch", "rev": "ours: every layer reversed"}[r["method"]]
            groups.setdefault(key, []).append((_peak(r, cuda), r["step_s_median"], r["label"]))
        for key, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key,
                    linestyle="-" if len(pts) > 1 else "none")
        half = result.get("half_plain", {}).get(str(seq))
        if half and half > 0:
            ax.axvline(half / GiB if cuda else half, color="grey", linestyle=":", label="budget: half of plain")
        ax.set_title(f"{int(seq) // 1024}k tokens" if int(seq) >= 1024 else f"{seq} tokens")
        ax.set_xlabel(f"measured peak ({unit})")
        ax.set_ylabel("median step time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not with_lengths:  # a frontier-only run: no predicted-vs-measured panel
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    ax = axes[-1]
    by_policy: dict[str, list] = {}
    for r in result["lengths"]:
        if r.get("oom") or "error" in r or "predicted_peak_gib" not in r and "predicted_above_start_mib" not in r:
            continue
        pred = r.get("predicted_peak_gib", r.get("predicted_above_start_mib"))
        by_policy.setdefault(r["policy_name"], []).append((r["seq"], pred, _peak(r, cuda)))
    for pol, pts in by_policy.items():
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{pol} measured")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", color=line.get_color(),
                label=f"{pol} predicted")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"peak ({unit})")
    ax.set_title("predicted vs measured peak")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small model on CPU (seconds): proves the script works")
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072,262144")
    ap.add_argument("--policies", default="reverse,checkpoint,store")
    ap.add_argument("--frontier", default="32768,65536", help="lengths of the memory/time frontier")
    ap.add_argument("--every", default="1,2,3,4,6,12", help="k of checkpoint-every-k-th-layer baselines")
    ap.add_argument("--fractions", default="0.3,0.4,0.5,0.7,0.9",
                    help="adaptive budgets as fractions of plain PyTorch's measured peak (0.5 always included)")
    ap.add_argument("--granularities", default="layer,block")
    ap.add_argument("--skip-predicted-over", type=float, default=1.3,
                    help="skip cells predicted above this multiple of the device's memory (GPU)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None, help="JSON path (the PNG goes beside it); default under docs/benchmarks "
                    "(GPU) or runs/ (--tiny)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0

    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --tiny for the CPU check")
    config = dict(TINY if args.tiny else SEED)
    if args.tiny:
        args.lengths, args.frontier, args.every = "256,512", "512", "1,2"
        args.fractions = "0.5,0.8"
    device_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    from revnet_core import ModelConfig
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel

    def predicted_peak(seq, policies):
        cfg = ModelConfig(**{**config, "max_seq_len": seq})
        w = Workload(seq_len=seq, autocast_dtype="bfloat16" if device == "cuda" else None, device=device)
        return CostModel(cfg, w).peak_bytes(policies)

    result = {"environment": environment(device), "config": config, "attention_kernels": attention_kernels(device),
              "lengths": [], "frontier": {}, "half_plain": {}}
    cuda = device == "cuda"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args.out or os.path.join(root, "runs/scheduler_frontier_tiny.json" if args.tiny else
                                   "docs/benchmarks/scheduler_frontier.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save():
        """Rewritten after every cell (atomically), so a run cut short by a time limit keeps what it measured."""
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(out + ".tmp", out)

    def show(spec, row):
        label = _label(spec)
        if row.get("oom"):
            txt = "OOM"
        elif "error" in row:
            txt = "ERROR"
            print(row["error"], file=sys.stderr)
        else:
            peak = _peak(row, cuda)
            pred = row.get("predicted_peak_gib", row.get("predicted_above_start_mib"))
            unit = "GiB" if cuda else "MiB"
            txt = f"peak {peak:8.3f} {unit}" + (f" (predicted {pred:8.3f}, {pred / peak:5.3f}x)" if pred else "") + \
                f"  step {row['step_s_median']:.3f} s"
        print(f"{spec['seq']:>7} {label:<34} {txt}", flush=True)
        save()

    layers = config["num_layers"]
    for seq in [int(s) for s in args.lengths.split(",") if s]:
        for pol in args.policies.split(","):
            spec = {"method": "rev", "policy": pol, "seq": seq, "device": device, "config": config}
            if cuda and predicted_peak(seq, [pol] * layers) > args.skip_predicted_over * device_bytes:
                row = {"skipped": "predicted over the device's memory"}
            else:
                row = _run(spec, args.timeout)
            row.update(seq=seq, policy_name=pol, method="rev", label=_label(spec))
            result["lengths"].append(row)
            show(spec, row)
    for seq in [int(s) for s in args.frontier.split(",") if s]:
        rows = result["frontier"].setdefault(str(seq), [])
        base = {"seq": seq, "device": device, "config": config}
        plain = _run({**base, "method": "plain"}, args.timeout)
        plain.update(method="plain", label="plain", seq=seq)
        rows.append(plain)
        show({**base, "method": "plain"}, plain)
        specs = []
        for k in [int(k) for k in args.every.split(",") if k]:
            specs.append({**base, "method": "every", "k": k})
            specs.append({**base, "method": "plain_every", "k": k})
        specs.append({**base, "method": "rev", "policy": "reverse"})
        if not plain.get("oom") and "error" not in plain:
            peak = plain["peak_allocated_gib"] * GiB if cuda else None
            if not cuda:  # the CPU budget is absolute: the start (parameters, state) plus the measured rise
                cfg = ModelConfig(**{**config, "max_seq_len": seq})
                cmp_ = CostModel(cfg, Workload(seq_len=seq, autocast_dtype=None, device="cpu"))
                peak = (cmp_.parameter_bytes() + cmp_.optimizer_bytes() + cmp_.rope_table_bytes() + seq * 8
                        + plain["peak_above_start_mib"] * 2**20)
            # In the plot's units: GiB on CUDA; on CPU MiB above the step's start, like the measured points.
            result["half_plain"][str(seq)] = peak / 2 if cuda else (peak / 2 - (peak - plain[
                "peak_above_start_mib"] * 2**20)) / 2**20
            fractions = sorted({0.5, *[float(f) for f in args.fractions.split(",") if f]})
            for g in args.granularities.split(","):
                for f in fractions:
                    specs.append({**base, "method": "adaptive", "budget": int(peak * f), "granularity": g,
                                  "fraction_of_plain": f})
        for spec in specs:
            row = _run(spec, args.timeout)
            row.update({k: v for k, v in spec.items() if k not in ("config", "device")}, label=_label(spec))
            rows.append(row)
            show(spec, row)
    save()
    png = os.path.splitext(out)[0] + ".png"
    plot(result, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
