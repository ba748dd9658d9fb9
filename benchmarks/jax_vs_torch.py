"""Training-step memory and time of the seed model in JAX beside the torch backend, and the Pallas flash
attention beside cuDNN's, all in one command.

Each cell (a method at a length) runs in its own subprocess: the two frameworks' allocators never share a
process, an out-of-memory is a result, not a crash, and no allocator state leaks from one cell into the next.
JAX cells run with XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX would otherwise take 75% of the GPU up front).
One step = value_and_grad of the chunked LM loss + AdamW (optax if installed, else the hand-written AdamW
below), jitted with parameters and optimizer state donated; torch: the model's loss under bf16 autocast,
backward, fused AdamW. Time = median of the steps after one warm-up step; memory = the device's
peak_bytes_in_use (JAX; the whole process, compile included) or max_memory_allocated over the timed steps
(torch), plus XLA's compiled plan of the JAX step.

Attention cells (``attn-pallas``, ``attn-cudnn``): causal attention of the seed model's shape (1 x 16 heads x
head dim 64, bf16), forward+backward and forward alone, median of repetitions, in TFLOP/s counting causal
work only (forward 2 B H T^2 D, backward 2.5x forward: benchmarks/kernels_bench.py's convention). The Pallas
cell first checks the kernel against the reference on this device (fp32, T=333, forward and gradients),
since CI checks it only in the interpreter. On CPU (--smoke) the Pallas kernel runs in its interpreter and
"cudnn" means XLA's kernel.

    python benchmarks/jax_vs_torch.py --out docs/benchmarks/jax_h200.json      # 64k, 256k + attention 16k-64k
    python benchmarks/jax_vs_torch.py --smoke --out /tmp/smoke.json           # CPU, toy sizes, seconds
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
TINY = dict(num_layers=2, d_model=64, num_heads=4, d_ff=128, vocab_size=256, activation="gelu",
            loss_chunk_size=32, ffn_chunk_size=32)
JAX_METHODS = {  # method -> (per-layer policy, host offload of checkpointed inputs)
    "jax-reverse": ("reverse", False),
    "jax-checkpoint": ("checkpoint", False),
    "jax-offload": ("checkpoint", True),
    "jax-plain": ("store", False),
}
TORCH_METHODS = {"torch-reverse": "reverse", "torch-checkpoint": "checkpoint"}
ATTN_METHODS = ("attn-pallas", "attn-cudnn")
METHODS = (*JAX_METHODS, *TORCH_METHODS)
DEFAULT_METHODS = "jax-reverse,torch-reverse"  # the comparison; the other baselines on request
ATTN = dict(heads=16, head_dim=64)  # the seed model's attention shape, batch 1
GiB = 2**30


def adamw(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1):
    """(init, update) of AdamW over a pytree; state and math in float32 like torch's fused AdamW."""
    import jax
    import jax.numpy as jnp

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "t": jnp.zeros((), jnp.int32)}

    def update(grads, state, params):
        t = state["t"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        c1, c2 = 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** t.astype(jnp.float32)
        new = jax.tree.map(lambda p, m, v: p - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + weight_decay * p),
                           params, m, v)
        return new, {"m": m, "v": v, "t": t}

    return init, update


def optimizer():
    """optax.adamw when installed (name reported), else ``adamw`` above."""
    try:
        import optax
    except ImportError:
        init, update = adamw()
        return "hand-written AdamW (jax.numpy)", init, update
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)

    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return f"optax {optax.__version__} adamw", tx.init, update


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory"))


def jax_cell(method: str, seq: int, cfg: dict, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from revnet_jax import ReversibleTransformerJAX
    from revnet_jax.blocks import attention_implementation
    from revnet_jax.memory import host_memory_available

    policy, offload = JAX_METHODS[method]
    if offload and not host_memory_available():
        return {"skipped": f"{jax.devices()[0].platform} has no pinned host memory space to offload to"}
    model = ReversibleTransformerJAX(**cfg, max_seq_len=seq, policy=policy, compute_dtype="bfloat16")
    model = model.replace(offload=offload)
    opt_name, opt_init, opt_update = optimizer()
    dev = jax.devices()[0]
    result: dict = {"optimizer": opt_name,
                    "attention": attention_implementation(model.static.block, jnp.bfloat16, False)}
    try:
        params = model.params
        state = opt_init(params)
        ids = jax.random.randint(jax.random.key(0), (1, seq), 0, cfg["vocab_size"], dtype=jnp.int32)

        def step(params, state, ids):
            loss, grads = jax.value_and_grad(model.loss)(params, ids)
            params, state = opt_update(grads, state, params)
            return params, state, loss

        t0 = time.perf_counter()
        jstep = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, ids).compile()
        result["compile_s"] = time.perf_counter() - t0
        plan = jstep.memory_analysis()
        result["compiled_gib"] = {k: getattr(plan, f"{k}_size_in_bytes") / GiB
                                  for k in ("temp", "argument", "output", "alias", "host_temp")}
        times, losses = [], []
        for i in range(1 + steps):
            t0 = time.perf_counter()
            params, state, loss = jstep(params, state, ids)
            loss = float(loss)  # blocks until the step is done
            if i >= 1:
                times.append(time.perf_counter() - t0)
            losses.append(loss)
    except Exception as exc:  # an out-of-memory is a result; anything else is reported as an error
        if _is_oom(exc):
            return {**result, "oom": True, "message": str(exc).splitlines()[0][:300]}
        raise
    stats = dev.memory_stats() or {}
    result.update({
        "oom": False,
        "peak_gib": stats["peak_bytes_in_use"] / GiB if "peak_bytes_in_use" in stats else None,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "losses": losses,
        "params": model.num_params(),
    })
    return result


def attn_flops(B: int, H: int, T: int, D: int, backward: bool = True) -> float:
    """Causal work only, as benchmarks/kernels_bench.attn_flops (not imported: that module imports torch)."""
    return 2.0 * B * H * T * T * D * (3.5 if backward else 1.0)


def _median_s(fn, args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pallas_check(interpret: bool, T: int = 333) -> dict:
    """Max |difference| of the Pallas kernel from the reference on this device: fp32, T tokens (not a
    multiple of any block), window None and T // 3."""
    import jax
    import jax.numpy as jnp

    from revnet_kernels.attn_pallas import flash_attention, reference_attention

    out = {}
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, (1, T, 4, 64), jnp.float32) for key in ks)
    for window in (None, T // 3):
        def grads(f):
            o, pull = jax.vjp(f, q, k, v)
            return (o, *pull(do))

        got = jax.jit(lambda: grads(lambda a, b, c: flash_attention(a, b, c, window=window, interpret=interpret)))()
        ref = jax.jit(lambda: grads(lambda a, b, c: reference_attention(a, b, c, window=window)))()
        out[f"window={window}"] = {n: float(jnp.abs(a - b).max()) for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}
    return out


def attn_cell(method: str, seq: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from revnet_kernels.attn_pallas import flash_attention

    cpu = jax.devices()[0].platform == "cpu"
    H, D = ATTN["heads"], ATTN["head_dim"]
    result: dict = {"shape": [1, seq, H, D], "dtype": "bfloat16"}
    if method == "attn-pallas":
        try:
            result["check_fp32"] = pallas_check(cpu, 77 if cpu else 333)  # the interpreter is slow
        except Exception as exc:  # the kernel's first run on this device: report, then time anyway
            result["check_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"

        def attend(q, k, v):
            return flash_attention(q, k, v, interpret=cpu)
        result["implementation"] = "pallas (interpreter)" if cpu else "pallas"
    else:
        impl = "xla" if cpu else "cudnn"

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        result["implementation"] = f"jax.nn.dot_product_attention(implementation={impl!r})"
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(key, (1, seq, H, D), jnp.float32).astype(jnp.bfloat16) for key in ks)
    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    try:
        t_f = _median_s(fwd, (q, k, v), reps)
        t_fb = _median_s(fwd_bwd, (q, k, v, do), reps)
    except Exception as exc:
        if _is_oom(exc):
            return {**result, "oom": True, "message": str(exc).splitlines()[0][:300]}
        raise
    result.update({"oom": False, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                   "fwd_tflops": attn_flops(1, H, seq, D, False) / t_f / 1e12,
                   "fwd_bwd_tflops": attn_flops(1, H, seq, D) / t_fb / 1e12})
    return result


def torch_cell(method: str, seq: int, cfg: dict, steps: int) -> dict:
    import torch

    import revnet_core
    from revnet_torch.blocks import FUSED_SDPA

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = revnet_core.build("torch", **cfg, max_seq_len=seq, policy=TORCH_METHODS[method]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), device=dev)
    times, losses = [], []
    try:
        for i in range(1 + steps):
            if i == 1 and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= 1:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    except torch.OutOfMemoryError as exc:
        return {"oom": True, "message": str(exc).splitlines()[0][:300]}
    return {
        "oom": False,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": f"torch.optim.AdamW(fused={cuda})",
        "attention": "SDPA pinned to " + ", ".join(b.name for b in FUSED_SDPA),
    }


def environment() -> dict:
    """Device and versions, read in a subprocess like the cells so this process never initialises a backend."""
    code = ("import json, jax, jaxlib, torch; d = jax.devices()[0]; print(json.dumps({'device': d.device_kind, "
            "'platform': d.platform, 'jax': jax.__version__, 'jaxlib': jaxlib.__version__, "
            "'torch': torch.__version__, 'torch_cuda': torch.version.cuda, "
            "'torch_device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_cell_env())
    env = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    try:
        import optax  # noqa: F401
        env["optax"] = optax.__version__
    except ImportError:
        env["optax"] = None
    env.update(python=platform.python_version(), command=" ".join([os.path.basename(sys.executable), *sys.argv]),
               xla_flags=os.environ.get("XLA_FLAGS", ""))
    return env


def _cell_env() -> dict:
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def run_cell(method: str, seq: int, cfg: dict, steps: int) -> dict:
    if method in ATTN_METHODS:
        return attn_cell(method, seq, reps=max(2, steps) if seq < 4096 else 10)
    if method in JAX_METHODS:
        return jax_cell(method, seq, cfg, steps)
    return torch_cell(method, seq, cfg, steps)


def _show(r: dict) -> str:
    if r.get("oom"):
        return "OOM"
    if "error" in r or "skipped" in r:
        return "ERROR" if "error" in r else f"skipped ({r['skipped']})"
    if "fwd_bwd_tflops" in r:
        errs = [e for d in r.get("check_fp32", {}).values() for e in d.values()]
        check = f"  fp32 check max err {max(errs):.1e}" if errs else ""
        return (f"{r['fwd_bwd_tflops']:7.1f} TFLOP/s fwd+bwd ({r['fwd_bwd_ms']:.2f} ms), "
                f"{r['fwd_tflops']:.1f} fwd{check}")
    peak = "   n/a   " if r.get("peak_gib") is None else f"{r['peak_gib']:6.2f} GiB"
    return f"{peak}  {r['step_s_median']:8.3f} s"


def ratios(rows: list[dict]) -> list[dict]:
    """Per length: JAX reverse / torch reverse step time and peak (the issue's targets: <= 1.2x, <= 1.1x), and
    Pallas / cuDNN attention throughput."""
    by = {(r["method"], r["seq"]): r for r in rows if r.get("oom") is False}
    out = []
    for seq in sorted({r["seq"] for r in rows}):
        j, t = by.get(("jax-reverse", seq)), by.get(("torch-reverse", seq))
        if j and t:
            out.append({"seq": seq, "jax_over_torch_step": j["step_s_median"] / t["step_s_median"],
                        "jax_over_torch_peak": (j["peak_gib"] / t["peak_gib"]
                                                if j.get("peak_gib") and t.get("peak_gib") else None)})
        p, c = by.get(("attn-pallas", seq)), by.get(("attn-cudnn", seq))
        if p and c:
            out.append({"seq": seq, "pallas_over_cudnn_fwd_bwd": p["fwd_bwd_tflops"] / c["fwd_bwd_tflops"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated, of {list(METHODS)}; 'none' runs the attention cells alone")
    ap.add_argument("--seq", default=None,
                    help="comma-separated tokens per step (default 65536,262144; --smoke: 64,128)")
    ap.add_argument("--attn-seq", default=None,
                    help="attention lengths (default 16384,32768,65536; --smoke: 64; 'none' skips the attention cells)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--smoke", "--tiny", dest="tiny", action="store_true",
                    help="toy model and lengths: runs on CPU in seconds")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    ap.add_argument("--extra", default="{}", help="JSON of extra ModelConfig fields")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--cell", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = dict(TINY if args.tiny else SEED)
    if args.layers is not None:
        cfg["num_layers"] = args.layers
    cfg.update(json.loads(args.extra))
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1]), cfg, args.steps)))
        return 0
    methods = [] if args.methods == "none" else args.methods.split(",")  # none: the attention cells alone
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    seqs = [int(s) for s in (args.seq or ("64,128" if args.tiny else "65536,262144")).split(",")]
    attn = args.attn_seq or ("64" if args.tiny else "16384,32768,65536")
    attn_seqs = [] if attn == "none" else [int(s) for s in attn.split(",")]
    cells = [(m, s) for s in seqs for m in methods] + [(m, s) for s in attn_seqs for m in ATTN_METHODS]
    rows = []
    for method, seq in cells:
        cmd = [sys.executable, os.path.abspath(__file__), "--cell", method, str(seq), "--steps", str(args.steps),
               "--extra", json.dumps(cfg)] + (["--tiny"] if args.tiny else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_cell_env(), timeout=args.timeout)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout:.0f} s"}
        except (IndexError, json.JSONDecodeError):
            # a process killed for memory (host or device) leaves no JSON: say how it ended
            res = {"error": f"exit code {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
        rows.append({"method": method, "seq": seq, **res})
        print(f"{method:>16} {seq:>8} {_show(rows[-1])}", flush=True)
        if "error" in res:
            print(res["error"], file=sys.stderr)
    result = {"environment": environment(), "config": cfg, "compute": "bf16 matmuls, fp32 streams and params",
              "attention_shape": {"batch": 1, **ATTN, "dtype": "bfloat16", "causal": True},
              "rows": rows, "ratios": ratios(rows)}
    for r in result["ratios"]:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
