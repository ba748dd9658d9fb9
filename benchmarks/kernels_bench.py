"""Kernel benchmarks on one GPU: correctness of the Triton kernels against the references, attention
forward+backward throughput against torch's SDPA (FlashAttention-2 and cuDNN backends), fused linear
cross-entropy peak memory and time against the chunked PyTorch loss and plain full logits, and the small
fused ops against torch eager.

    python benchmarks/kernels_bench.py --out DIR            # everything; JSON files under DIR
    python benchmarks/kernels_bench.py --render DIR         # DIR/*.json -> docs/benchmarks/kernels.md
    TRITON_INTERPRET=1 python benchmarks/kernels_bench.py --smoke --out /tmp/x   # tiny sizes on CPU

Timings: median over repetitions queued back to back, each between CUDA events, one synchronisation at the
end (the GPU never waits on Python's launches), after warm-up (first calls compile). Attention
FLOPs count causal work only: forward 2 B H T^2 D (two matmuls over half the score matrix), backward
2.5 x forward. Each cross-entropy cell runs in its own process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


# ------------------------------------------------------------------------------------------------ common


def environment(args) -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / GIB, 1),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        env |= {"device": "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"}
    try:
        from revnet_kernels import registry

        env["registry_cuda_bf16"] = {r["op"]: r["impl"] for r in registry.describe("cuda", "bfloat16")}
    except Exception as exc:  # the registry needs the installed entry points; the kernels do not
        env["registry_cuda_bf16"] = f"unavailable: {type(exc).__name__}: {exc}"
    return env


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 50, warmup: int = 2) -> dict:
    """Median (and spread) of fn's time in ms over repetitions sized to about budget_s.

    On CUDA the repetitions are queued back to back, each between its own pair of events, and synchronised
    once at the end: the GPU does not sit idle while Python launches the next repetition (as in training),
    so short calls time the kernels rather than the launch latency."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    estimate = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(budget_s / estimate, min_reps), max_reps))
    if torch.cuda.is_available():
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -------------------------------------------------------------------------------------------- attention


def attn_inputs(B, H, Hk, T, D, dtype, seed=0):
    g = torch.Generator(device=dev()).manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, device=dev(), dtype=dtype, generator=g)  # noqa: E731
    return mk(H), mk(Hk), mk(Hk), mk(H)


def blocks_from(spec: dict):
    from revnet_kernels.attn_triton import AttentionBlocks

    return AttentionBlocks(**spec)


def warm_attention(spec: dict) -> str:
    """Compile one kernel configuration (in a worker process, so compiles run in parallel and fill the cache)."""
    from revnet_kernels.attn_triton import attention_backward, attention_forward

    dtype = getattr(torch, spec["dtype"])
    T = spec.get("T", 256)
    q, k, v, do = attn_inputs(1, spec["H"], spec["Hk"], T, spec["D"], dtype)
    blocks = blocks_from(spec["blocks"]) if spec.get("blocks") else None
    o, lse = attention_forward(q, k, v, True, spec.get("window"), None, blocks)
    attention_backward(q, k, v, o, lse, do, True, spec.get("window"), None, blocks)
    sync()
    return "ok"


def check_attention(B, H, Hk, T, D, dtype, window=None, with_sdpa=False, blocks=None) -> dict:
    """Relative errors of the Triton kernel (and optionally SDPA) against the fp64 reference."""
    from revnet_kernels.attn import reference_attention
    from revnet_kernels.attn_triton import flash_attention

    q, k, v, do = attn_inputs(B, H, Hk, T, D, dtype, seed=T)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = flash_attention(*leaves, True, window, None, blocks)
    got = [o, lse, *torch.autograd.grad(o, leaves, do)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rlse = reference_attention(*ref_leaves, True, window)
    want = [ro, rlse, *torch.autograd.grad(ro, ref_leaves, do.double())]
    out = {"shape": dict(B=B, H=H, Hkv=Hk, T=T, D=D, window=window), "dtype": str(dtype).removeprefix("torch."),
           "atomic_dq": bool(blocks and blocks.atomic_dq),
           "triton": {n: rel_err(a, b) for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want)}}
    out["triton_max_abs"] = {n: (a.double() - b).abs().max().item() for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want)}
    if with_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            sl = [t.clone().requires_grad_() for t in (q, k, v)]
            so = F.scaled_dot_product_attention(*sl, is_causal=True)
            sg = [so, *torch.autograd.grad(so, sl, do)]
        out["sdpa_flash"] = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), sg, [want[0], *want[2:]])}
    del ref_leaves, want
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def attn_step(impl: str, q, k, v, do, blocks=None, backward=True):
    """A closure running one forward (+ backward) of ``impl`` on fixed inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from revnet_kernels.attn_triton import attention_backward, attention_forward

    if impl == "triton":
        if not backward:
            return lambda: attention_forward(q, k, v, True, None, None, blocks)

        def run():
            o, lse = attention_forward(q, k, v, True, None, None, blocks)
            attention_backward(q, k, v, o, lse, do, True, None, None, blocks)
        return run
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[impl]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def run():
        with sdpa_kernel([backend]):
            if not backward:
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o = F.scaled_dot_product_attention(*leaves, is_causal=True)
            torch.autograd.grad(o, leaves, do)
    return run


def attn_flops(B, H, T, D, backward=True) -> float:
    fwd = 2.0 * B * H * T * T * D  # 4 B H T^2 D for full attention, halved by the causal mask
    return fwd * (3.5 if backward else 1.0)


SWEEP = {  # (block_m, block_n, num_warps, num_stages) candidates; the first of each list is the default
    64: {"fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
         "dq": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
         "kv": [(32, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 8, 3)]},
    128: {"fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3)],
          "dq": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 32, 8, 3), (128, 32, 8, 3)],
          "kv": [(64, 64, 8, 3), (32, 64, 8, 4), (64, 64, 8, 2), (32, 64, 8, 3)]},
}
# dK/dV kernel tiles with dQ added atomically (AttentionBlocks.atomic_dq): no dQ kernel at all
ATOMIC_SWEEP = {
    64: [(64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3)],
    128: [(64, 128, 8, 3), (64, 128, 8, 4), (64, 128, 8, 2), (64, 128, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3),
          (64, 64, 8, 3)],  # (128, 128, *, 2 or 3) needs 257-322 KiB of shared memory: over sm_90's 227
}
PREFIX = {"fwd": ("block_m", "block_n", "num_warps", "num_stages"),
          "dq": ("dq_block_m", "dq_block_n", "dq_num_warps", "dq_num_stages"),
          "kv": ("kv_block_m", "kv_block_n", "kv_num_warps", "kv_num_stages")}
PREFIX["atomic"] = PREFIX["kv"]  # the atomic-dQ backward is the dK/dV kernel alone


def sweep_specs(D: int) -> list[dict]:
    """Block settings to time: each kernel's candidates with the other kernels at their defaults."""
    from dataclasses import asdict

    from revnet_kernels.attn_triton import AttentionBlocks

    base = asdict(AttentionBlocks.get_default(D, torch.bfloat16, torch.device("cuda")))
    # the two-kernel rows pair with the first (two-kernel default) dK/dV tiles, whatever the shipped default is
    base |= dict(zip(PREFIX["kv"], SWEEP[D]["kv"][0])) | {"atomic_dq": False}
    specs = []
    for kernel, cands in SWEEP[D].items():
        for cand in cands:
            specs.append({"kernel": kernel, "blocks": base | dict(zip(PREFIX[kernel], cand))})
    for cand in ATOMIC_SWEEP[D]:
        specs.append({"kernel": "atomic", "blocks": base | dict(zip(PREFIX["kv"], cand)) | {"atomic_dq": True}})
    return specs


def best_blocks(rows: list[dict]) -> dict:
    """The fastest forward tiles, and the faster backward: the best dQ and dK/dV tiles of the two-kernel
    backward (each timed with the other at its default), or the best atomic-dQ tiles."""
    def fastest(kernel):
        ok = (r for r in rows if r["kernel"] == kernel and "median_ms" in r)
        return min(ok, key=lambda r: r["median_ms"], default=None)

    best = {p: fastest("fwd")["blocks"][p] for p in PREFIX["fwd"]}
    dq, kv, atomic = fastest("dq"), fastest("kv"), fastest("atomic")
    # atomics cost an fp32 dQ buffer and run-to-run bit differences: worth it only beyond timing noise
    if atomic is not None and atomic["median_ms"] < 0.97 * min(dq["median_ms"], kv["median_ms"]):
        return best | {p: atomic["blocks"][p] for p in (*PREFIX["kv"], *PREFIX["dq"])} | {"atomic_dq": True}
    return best | {p: dq["blocks"][p] for p in PREFIX["dq"]} | {p: kv["blocks"][p] for p in PREFIX["kv"]} | {
        "atomic_dq": False}


def heads_for(D: int) -> int:
    return 1024 // D  # d_model 1024, as the seed model


def run_sweep(args) -> dict:
    T = 64 if args.smoke else 16384
    results = {}
    for D in (64, 128):
        H = heads_for(D)
        q, k, v, do = attn_inputs(1, H, H, T, D, torch.bfloat16)
        rows = []
        for spec in sweep_specs(D):
            blocks = blocks_from(spec["blocks"])
            fn = attn_step("triton", q, k, v, do, blocks, backward=spec["kernel"] != "fwd")
            try:
                rows.append(spec | median_ms(fn, budget_s=0.3))
            except Exception as exc:  # e.g. a tile that needs more shared memory than the device has
                rows.append(spec | {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"sweep D={D} {spec['kernel']} {[spec['blocks'][p] for p in PREFIX[spec['kernel']]]} "
                  + (f"{rows[-1]['median_ms']:.3f} ms" if "median_ms" in rows[-1] else rows[-1]["error"]), flush=True)
        results[D] = {"T": T, "H": H, "rows": rows, "best": best_blocks(rows)}
    return results


def run_attention(args, best: dict) -> list[dict]:
    """The table; Triton runs its shipped defaults (AttentionBlocks.get_default) unless --tiles sweep."""
    lens = [64, 100] if args.smoke else [4096, 8192, 16384, 32768, 65536, 131072]
    impls = ["triton"] if args.smoke else ["triton", "sdpa_flash", "sdpa_cudnn"]
    rows = []
    for D in (64, 128):
        H = heads_for(D)
        blocks = blocks_from(best[D]["best"]) if args.tiles == "sweep" and best.get(D) else None
        for T in lens:
            q, k, v, do = attn_inputs(1, H, H, T, D, torch.bfloat16)
            for impl in impls:
                row = {"impl": impl, "B": 1, "H": H, "T": T, "D": D}
                try:
                    t_fb = median_ms(attn_step(impl, q, k, v, do, blocks), budget_s=args.budget)
                    t_f = median_ms(attn_step(impl, q, k, v, do, blocks, backward=False), budget_s=args.budget / 2)
                    row |= {"fwd_bwd_ms": t_fb["median_ms"], "fwd_ms": t_f["median_ms"], "reps": t_fb["reps"],
                            "fwd_bwd_tflops": attn_flops(1, H, T, D) / t_fb["median_ms"] / 1e9,
                            "fwd_tflops": attn_flops(1, H, T, D, False) / t_f["median_ms"] / 1e9}
                except Exception as exc:  # an unavailable backend is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(f"attention D={D} T={T} {impl}: "
                      + (f"{row['fwd_bwd_tflops']:.0f} TFLOP/s fwd+bwd, {row['fwd_tflops']:.0f} fwd"
                         if "error" not in row else row["error"]), flush=True)
            del q, k, v, do
    return rows


# -------------------------------------------------------------------------------------- cross-entropy


def backend_loss():
    """backends/torch/loss.py as installed (revnet_torch.loss), or straight from the source tree."""
    try:
        import revnet_torch.loss as loss
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("backend_loss", REPO / "backends" / "torch" / "loss.py")
        loss = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loss)
    return loss


def ce_cell(method: str, tokens: int, vocab: int, d: int) -> dict:
    """One method at one size in this process: peak bytes above inputs and gradients, time, loss."""
    device = dev()
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(tokens, d, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, d, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    t[-1] = -100  # the last position has no next token

    if method.startswith("triton"):  # "triton", or with options: "triton:pad=1:chunk=512"
        from revnet_kernels.cross_entropy import linear_ce_function
        from revnet_kernels.cross_entropy_triton import linear_cross_entropy_forward

        opts = dict(o.split("=") for o in method.split(":")[1:])
        pad = {"pad_vocab": opts["pad"] == "1"} if "pad" in opts else {}
        chunk = int(opts["chunk"]) if "chunk" in opts else None

        def forward_fn(*a):
            return linear_cross_entropy_forward(*a, **pad)

        fn = lambda: linear_ce_function().apply(h, w, t, -100, chunk, forward_fn)  # noqa: E731
    elif method == "kernels_chunked":
        from revnet_kernels.cross_entropy import chunked_impl
        fn = lambda: chunked_impl(h, w, t, chunk_size=1024)  # noqa: E731
    elif method == "torch_chunked":  # the backend's loss head today (backends/torch/loss.py)
        chunked_lm_loss = backend_loss().chunked_lm_loss
        fn = lambda: chunked_lm_loss(h[None], w, t[None], chunk_size=1024)  # noqa: E731
    elif method == "full_logits":
        fn = lambda: F.cross_entropy((h @ w.T).float(), t)  # noqa: E731
    else:
        raise ValueError(f"{method=}")

    def step():
        h.grad = w.grad = None
        fn().backward()

    step()  # compile, allocate cuBLAS workspaces
    sync()
    loss = fn().item()
    h.grad = w.grad = None
    out = {"method": method, "tokens": tokens, "vocab": vocab, "d": d, "loss": loss}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
        out["peak_above_inputs_gib"] = (torch.cuda.max_memory_allocated() - base - grads) / GIB
        out["full_bf16_logits_gib"] = tokens * vocab * 2 / GIB
    out |= median_ms(step, budget_s=1.0)
    return out


def run_cross_entropy(args, methods=("triton", "torch_chunked", "kernels_chunked", "full_logits"), long=True
                      ) -> list[dict]:
    vocab, d = (1000, 64) if args.smoke else (50257, 1024)
    cells = [(m, 300 if args.smoke else 32768) for m in methods]
    if long and not args.smoke:
        cells += [("triton", 262144), ("torch_chunked", 262144)]
    rows = []
    for method, tokens in cells:
        cmd = [sys.executable, __file__, "--ce-cell", method, str(tokens), str(vocab), str(d)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            row = {"method": method, "tokens": tokens, "error": tail[0][:300]}  # e.g. out of memory
        rows.append(row)
        print(f"cross-entropy {method} {tokens}: {row}", flush=True)
    return rows


def run_ce_profile(args) -> dict:
    """Where one chunk's time goes (1024 rows, vocab 50257, d 1024): the three matmuls with the odd vocabulary
    as it is, with an aligned row stride only, and with a zero-padded weight; the Triton pass; the fp32 add."""
    from revnet_kernels.cross_entropy_triton import _ce_rows

    n, V, d = (64, 1000, 64) if args.smoke else (1024, 50257, 1024)
    Vp = -(-V // 64) * 64
    bf = torch.bfloat16
    hc = torch.randn(n, d, device=dev(), dtype=bf)
    w = (torch.randn(V, d, device=dev()) * 0.02).to(bf)
    wp = torch.zeros(Vp, d, device=dev(), dtype=bf)
    wp[:V] = w
    buf = torch.empty(n, Vp, device=dev(), dtype=bf)
    z_str, z_pad = buf[:, :V], buf
    dh = torch.empty(n, d, device=dev(), dtype=bf)
    part, part_p = torch.empty(V, d, device=dev(), dtype=bf), torch.empty(Vp, d, device=dev(), dtype=bf)
    dw32 = torch.zeros(V, d, device=dev())
    t = torch.randint(0, V, (n,), device=dev())
    loss = torch.empty(n, device=dev())
    inv = torch.ones(1, device=dev())
    flop = 2.0 * n * V * d
    cases = {
        "logits: contiguous out, ld 50257": lambda: hc @ w.T,
        "logits: strided out, ld 50304": lambda: torch.mm(hc, w.T, out=z_str),
        "logits: padded weight, N 50304": lambda: torch.mm(hc, wp.T, out=z_pad),
        "dh: K 50257 (strided z)": lambda: torch.mm(z_str, w, out=dh),
        "dh: K 50304 (padded)": lambda: torch.mm(z_pad, wp, out=dh),
        "dW: M 50257 (strided z)": lambda: torch.mm(z_str.T, hc, out=part),
        "dW: M 50304 (padded)": lambda: torch.mm(z_pad.T, hc, out=part_p),
        "triton row pass (lse + in-place gradient)": lambda: _ce_rows[(n,)](z_str, t, loss, inv, z_str.stride(0), V,
                                                                           -100, NEED_GRAD=True, BLOCK_V=4096,
                                                                           num_warps=8),
        "fp32 accumulate dW (add_)": lambda: dw32.add_(part),
    }
    rows = []
    for name, fn in cases.items():
        torch.mm(hc, w.T, out=z_str)  # real logits for the row pass
        r = {"case": name} | median_ms(fn, budget_s=0.3)
        if name.startswith(("logits", "dh", "dW")):
            r["tflops"] = flop / r["median_ms"] / 1e9
        rows.append(r)
        print(f"ce profile {name}: {r['median_ms']:.3f} ms {r.get('tflops', 0):.0f} TFLOP/s", flush=True)
    return {"rows_per_chunk": n, "vocab": V, "d": d, "rows": rows}


# ------------------------------------------------------------------------------------ small fused ops


def run_small_ops(args) -> dict:
    from revnet_kernels.activations import reference_activation
    from revnet_kernels.activations_triton import triton_activation
    from revnet_kernels.cross_entropy import reference_linear_cross_entropy
    from revnet_kernels.cross_entropy_triton import triton_linear_cross_entropy
    from revnet_kernels.norms import reference_layer_norm, reference_rms_norm
    from revnet_kernels.norms_triton import triton_layer_norm, triton_rms_norm

    rows, d, ff = 64 if args.smoke else 32768, 1024, 4096
    out = {"timing": [], "correctness": []}
    x = torch.randn(rows, d, device=dev(), dtype=torch.bfloat16)
    w, b = torch.randn(d, device=dev()), torch.randn(d, device=dev())
    u = torch.randn(rows, 2 * ff, device=dev(), dtype=torch.bfloat16)
    cases = {
        "layer_norm": (lambda t: triton_layer_norm(t, w, b), lambda t: F.layer_norm(t.float(), (d,), w, b).to(t.dtype), x),
        "rms_norm": (lambda t: triton_rms_norm(t, w), lambda t: F.rms_norm(t.float(), (d,), w, 1e-5).to(t.dtype), x),
        "geglu": (lambda t: triton_activation(t, "geglu"), lambda t: reference_activation(t, "geglu"), u),
        "swiglu": (lambda t: triton_activation(t, "swiglu"), lambda t: reference_activation(t, "swiglu"), u),
    }
    for name, (ours, eager, inp) in cases.items():
        for impl, fn in (("triton", ours), ("torch_eager", eager)):
            leaf = inp.detach().requires_grad_()

            def step(fn=fn, leaf=leaf):
                y = fn(leaf)
                torch.autograd.grad(y, leaf, torch.ones_like(y))
            out["timing"].append({"op": name, "impl": impl, "rows": rows} | median_ms(step, budget_s=0.3))
    # correctness on the device, fp32 (tight) and bf16, against fp64 references
    for dtype in (torch.float32, torch.bfloat16):
        m = 16 if args.smoke else 512
        xs = torch.randn(m, 1000, device=dev(), dtype=dtype)
        us = torch.randn(m, 2 * 1000, device=dev(), dtype=dtype) * 3
        checks = {
            "layer_norm": (lambda t, ww, bb: triton_layer_norm(t, ww, bb),
                           lambda t, ww, bb: reference_layer_norm(t, ww, bb), [xs, w[:1000], b[:1000]]),
            "rms_norm": (lambda t, ww: triton_rms_norm(t, ww), lambda t, ww: reference_rms_norm(t, ww), [xs, w[:1000]]),
            "gelu": (lambda t: triton_activation(t, "gelu"), lambda t: reference_activation(t, "gelu"), [us]),
            "swiglu": (lambda t: triton_activation(t, "swiglu"), lambda t: reference_activation(t, "swiglu"), [us]),
        }
        for name, (ours, ref, inputs) in checks.items():
            got_leaves = [t.detach().clone().requires_grad_() for t in inputs]
            y = ours(*got_leaves)
            dy = torch.randn_like(y)
            gg = torch.autograd.grad(y, got_leaves, dy)
            ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
            ry = ref(*ref_leaves)
            rg = torch.autograd.grad(ry, ref_leaves, dy.double())
            out["correctness"].append({"op": name, "dtype": str(dtype).removeprefix("torch."),
                                       "rel_err": [rel_err(a, e) for a, e in zip((y, *gg), (ry, *rg))]})
        n_h, n_v = (32, 3000) if args.smoke else (1024, 50257)
        h = torch.randn(n_h, 256, device=dev(), dtype=dtype)
        wv = (torch.randn(n_v, 256, device=dev()) * 0.05).to(dtype)
        tt = torch.randint(0, n_v, (n_h,), device=dev())
        hl, wl = h.clone().requires_grad_(), wv.clone().requires_grad_()
        loss = triton_linear_cross_entropy(hl, wl, tt, chunk_size=256)
        loss.backward()
        hr, wr = h.double().requires_grad_(), wv.double().requires_grad_()
        rl = reference_linear_cross_entropy(hr, wr, tt)
        rl.backward()
        out["correctness"].append({"op": "linear_cross_entropy", "dtype": str(dtype).removeprefix("torch."),
                                   "rel_err": [rel_err(loss, rl), rel_err(hl.grad, hr.grad), rel_err(wl.grad, wr.grad)]})
    # what fusing the reversible coupling into the last projection could save: one pass over the stream
    n = 256 if args.smoke else 65536
    o, wp = torch.randn(n, d, device=dev(), dtype=torch.bfloat16), torch.randn(d, d, device=dev(), dtype=torch.bfloat16)
    stream = torch.randn(n, d, device=dev())
    fx = o @ wp.T
    out["coupling"] = {"tokens": n, "projection": median_ms(lambda: o @ wp.T, budget_s=0.3),
                       "coupling_add": median_ms(lambda: stream + fx, budget_s=0.3)}
    return out


# ---------------------------------------------------------------------------------------------- driver


def warm_specs(args) -> list[dict]:
    """Every attention configuration the run launches, compiled up front in parallel processes."""
    from dataclasses import asdict

    from revnet_kernels.attn_triton import AttentionBlocks

    specs = []
    for D in (64, 128):
        H = heads_for(D)
        specs += [{"dtype": "bfloat16", "D": D, "H": H, "Hk": H, "blocks": s["blocks"]} for s in sweep_specs(D)]
    specs += [{"dtype": "float32", "D": 64, "H": 4, "Hk": 2, "window": w} for w in (None, 300)]
    specs += [{"dtype": "bfloat16", "D": 128, "H": 8, "Hk": 2, "window": 1024, "T": 1024}]
    f32 = asdict(AttentionBlocks.get_default(64, torch.float32, torch.device("cuda"))) | {"atomic_dq": True}
    specs += [{"dtype": "float32", "D": 64, "H": 4, "Hk": 2, "window": 300, "blocks": f32}]
    specs += [{"dtype": "bfloat16", "D": 128, "H": 8, "Hk": 2, "window": 1024, "T": 1024,
               "blocks": asdict(AttentionBlocks.get_default(128, torch.bfloat16, torch.device("cuda"))) | {"atomic_dq": True}}]
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the JSON results")
    p.add_argument("--parts", default="check,sweep,attention,cross_entropy,small_ops")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter smoke test of this script)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per timing")
    p.add_argument("--tiles", choices=("default", "sweep"), default="default",
                   help="Triton tiles for the attention table: the shipped defaults or the sweep's best")
    p.add_argument("--ce-cell", nargs=4, metavar=("METHOD", "TOKENS", "VOCAB", "D"), help=argparse.SUPPRESS)
    p.add_argument("--warm", help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="write docs/benchmarks/kernels.md from the JSON in this folder")
    args = p.parse_args()
    if args.ce_cell:
        method, tokens, vocab, d = args.ce_cell
        print(json.dumps(ce_cell(method, int(tokens), int(vocab), int(d))))
        return
    if args.warm:
        print(warm_attention(json.loads(args.warm)))
        return
    if args.render:
        render(args.render)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    env = environment(args)
    print(json.dumps(env), flush=True)

    def save(name, payload):
        (args.out / f"kernels_{name}.json").write_text(json.dumps({"environment": env} | payload, indent=1))

    if not args.smoke and torch.cuda.is_available() and ("sweep" in parts or "check" in parts):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 16)) as pool:
            runs = list(pool.map(lambda s: subprocess.run([sys.executable, __file__, "--warm", json.dumps(s)],
                                                          capture_output=True, text=True), warm_specs(args)))
        failed = [r.stderr.strip().splitlines()[-1:] for r in runs if r.returncode]
        print(f"compiled {len(runs)} configurations in {time.perf_counter() - t0:.0f} s; failures: {failed}", flush=True)
    if "check" in parts:
        T = 100 if args.smoke else 1000
        checks = [check_attention(1, 4, 2, T, 64, torch.float32),
                  check_attention(1, 4, 2, T, 64, torch.float32, window=300)]
        big = 64 if args.smoke else 4096
        checks += [check_attention(1, heads_for(D), heads_for(D), big, D, torch.bfloat16, with_sdpa=torch.cuda.is_available())
                   for D in (64, 128)]
        checks += [check_attention(1, 8, 2, 100 if args.smoke else 3001, 128, torch.bfloat16, window=40 if args.smoke else 1024)]
        # the atomic-dQ backward, whichever the defaults pick
        from dataclasses import replace

        from revnet_kernels.attn_triton import AttentionBlocks

        atomic = lambda D, dtype: replace(AttentionBlocks.get_default(D, dtype, torch.device(dev())), atomic_dq=True)  # noqa: E731
        checks += [check_attention(1, 4, 2, T, 64, torch.float32, window=300, blocks=atomic(64, torch.float32)),
                   check_attention(1, 8, 8, big, 128, torch.bfloat16, blocks=atomic(128, torch.bfloat16)),
                   check_attention(1, 8, 2, 100 if args.smoke else 3001, 128, torch.bfloat16,
                                   window=40 if args.smoke else 1024, blocks=atomic(128, torch.bfloat16))]
        for c in checks:
            print("check", json.dumps(c), flush=True)
        save("correctness", {"attention": checks})
    sweep = {}
    if "sweep" in parts:
        sweep = run_sweep(args)
        save("sweep", {"sweep": sweep})
    if "attention" in parts:
        from dataclasses import asdict

        from revnet_kernels.attn_triton import AttentionBlocks

        used = {D: (sweep[D]["best"] if args.tiles == "sweep" and D in sweep
                    else asdict(AttentionBlocks.get_default(D, torch.bfloat16, torch.device("cuda")))) for D in (64, 128)}
        save("attention", {"tiles": args.tiles, "blocks": used, "rows": run_attention(args, sweep)})
    if "cross_entropy" in parts:
        save("cross_entropy", {"rows": run_cross_entropy(args)})
    if "ce_variants" in parts:
        save("ce_variants", {"profile": run_ce_profile(args),
                             "rows": run_cross_entropy(args, ("triton:pad=0", "triton:pad=1", "triton:pad=1:chunk=512",
                                                              "torch_chunked"), long=False)})
    if "small_ops" in parts:
        save("small_ops", run_small_ops(args))


# --------------------------------------------------------------------------------------------- render


def render(folder: Path) -> None:
    def load(name):
        path = folder / f"kernels_{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    names = ("attention", "cross_entropy", "correctness", "small_ops", "sweep", "ce_variants")
    att, ce, cor, small, sweep, cev = (load(n) for n in names)
    env = (att or ce or cor or {}).get("environment", {})
    lines = ["# Kernel benchmarks", "",
             f"Device: {env.get('device')} ({env.get('sms')} SMs), torch {env.get('torch')}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}.", "",
             "Each JSON beside this file (`kernels_*.json`) holds its environment and exact command; the runs:", ""]
    for name, data in zip(names, (att, ce, cor, small, sweep, cev)):
        if data:
            e = data["environment"]
            lines.append(f"- `kernels_{name}.json` ({e.get('time')}): `{e.get('command')}`")
    lines += ["", f"Registry choice on CUDA, bf16, seed-model shapes: {env.get('registry_cuda_bf16')}.", ""]
    if att:
        lines += ["## Attention, causal, bf16, batch 1, d_model 1024 (forward + backward)", "",
                  "TFLOP/s count causal work: forward 2·B·H·T²·D, backward 2.5x forward. Median of repetitions "
                  "queued back to back, each between CUDA events.", "",
                  "| D | H | tokens | Triton fwd+bwd | SDPA flash | SDPA cuDNN | Triton / flash | Triton / cuDNN "
                  "| Triton fwd | flash fwd | cuDNN fwd |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["D"], r["T"], r["impl"]): r for r in att["rows"]}
        for (D, T) in sorted({(r["D"], r["T"]) for r in att["rows"]}):
            get = lambda impl, key: by.get((D, T, impl), {}).get(key)  # noqa: E731
            cell = lambda v: f"{v:.0f}" if isinstance(v, float) else "n/a"  # noqa: E731
            tri, fl, cu = (get(i, "fwd_bwd_tflops") for i in ("triton", "sdpa_flash", "sdpa_cudnn"))
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
            lines.append(f"| {D} | {by.get((D, T, 'triton'), {}).get('H')} | {T / 1024:g}k | {cell(tri)} | {cell(fl)} | "
                         f"{cell(cu)} | {ratio(tri, fl)} | {ratio(tri, cu)} | {cell(get('triton', 'fwd_tflops'))} | "
                         f"{cell(get('sdpa_flash', 'fwd_tflops'))} | {cell(get('sdpa_cudnn', 'fwd_tflops'))} |")
        lines += ["", f"Triton tiles used ({att.get('tiles', 'sweep')}): {att.get('blocks')}", ""]
    if sweep:
        lines += ["## Tile sweep (bf16, causal, 16k tokens; each kernel varied with the others at their defaults)", "",
                  "`atomic` rows time the dK/dV kernel alone with dQ added through fp32 atomics "
                  "(`AttentionBlocks.atomic_dq`); the others the two-kernel backward. Times are forward + backward.", "",
                  "| D | kernel | block_m, block_n, warps, stages | ms |", "|---|---|---|---|"]
        for D, s in sweep["sweep"].items():
            for r in s["rows"]:
                cfg = [r["blocks"][p] for p in PREFIX[r["kernel"]]]
                ms = f"{r['median_ms']:.3f}" if "median_ms" in r else r["error"].split(":")[0]
                lines.append(f"| {D} | {r['kernel']} | {cfg} | {ms} |")
        lines.append("")
    if cor:
        lines += ["## Attention correctness on the device (relative L2 error against the fp64 reference)", "",
                  "| dtype | shape | o | lse | dq | dk | dv | SDPA flash o, dq, dk, dv |", "|---|---|---|---|---|---|---|---|"]
        for c in cor["attention"]:
            e = c["triton"]
            sd = ", ".join(f"{v:.1e}" for v in c.get("sdpa_flash", {}).values()) or "-"
            kind = " (atomic dQ)" if c.get("atomic_dq") else ""
            lines.append(f"| {c['dtype']}{kind} | {c['shape']} | " + " | ".join(f"{e[k]:.1e}" for k in ("o", "lse", "dq", "dk", "dv"))
                         + f" | {sd} |")
        lines.append("")
    if ce:
        lines += ["## Linear + cross-entropy, vocab 50257, d 1024, bf16 (forward + backward)", "",
                  "Peak = `max_memory_allocated` during one step minus the inputs, weights and their gradients; "
                  "each cell in its own process. `full_logits` is `F.cross_entropy((h @ W.T).float(), t)`; "
                  "`torch_chunked` is `backends/torch/loss.py`; `kernels_chunked` the PyTorch `chunked` "
                  "implementation of `revnet_kernels`.", "",
                  "These `triton` rows ran before the padded weight existed (`pad=0` below); the shipped default "
                  "(padded weight, 512-row chunks at this vocabulary) is `triton:pad=1:chunk=512` in the next "
                  "section." if cev else "", "",
                  "| method | tokens | peak above inputs (GiB) | / full bf16 logits | ms | loss |", "|---|---|---|---|---|---|"]
        for r in ce["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['tokens']} | {r['error']} | | | |")
                continue
            peak = r.get("peak_above_inputs_gib")
            mem = f"{peak:.3f} | {peak / r['full_bf16_logits_gib']:.3f}" if peak is not None else "n/a | n/a"
            lines.append(f"| {r['method']} | {r['tokens'] / 1024:g}k | {mem} | {r['median_ms']:.1f} | {r['loss']:.4f} |")
        lines.append("")
    if cev:
        lines += ["## Linear + cross-entropy: where the time goes, and the padded weight", "",
                  f"One chunk of {cev['profile']['rows_per_chunk']} rows, vocab {cev['profile']['vocab']}, "
                  f"d {cev['profile']['d']}, bf16:", "", "| step | ms | TFLOP/s |", "|---|---|---|"]
        for r in cev["profile"]["rows"]:
            tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
            lines.append(f"| {r['case']} | {r['median_ms']:.3f} | {tf} |")
        lines += ["", "Whole loss, forward + backward, 32k tokens (`pad=1` multiplies by the zero-padded weight; "
                  "`chunk` rows per chunk, default 1024):", "",
                  "| method | peak above inputs (GiB) | / full bf16 logits | ms |", "|---|---|---|---|"]
        for r in cev["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['error']} | | |")
                continue
            peak = r["peak_above_inputs_gib"]
            lines.append(f"| {r['method']} | {peak:.3f} | {peak / r['full_bf16_logits_gib']:.4f} | {r['median_ms']:.1f} |")
        lines.append("")
    if small:
        lines += ["## Fused small ops (forward + backward, 32k rows, bf16 input)", "", "| op | impl | ms |", "|---|---|---|"]
        lines += [f"| {r['op']} | {r['impl']} | {r['median_ms']:.3f} |" for r in small["timing"]]
        lines += ["", "Correctness on the device, relative L2 error against fp64 (output, then gradients):", ""]
        lines += [f"- {r['op']} {r['dtype']}: " + ", ".join(f"{v:.1e}" for v in r["rel_err"]) for r in small["correctness"]]
        cp = small["coupling"]
        lines += ["", f"Coupling epilogue estimate at {cp['tokens']} tokens: the attention output projection takes "
                  f"{cp['projection']['median_ms']:.3f} ms, the separate coupling add (fp32 stream + bf16 F) "
                  f"{cp['coupling_add']['median_ms']:.3f} ms.", ""]
    out = REPO / "docs" / "benchmarks" / "kernels.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
