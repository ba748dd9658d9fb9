"""Causal linear attention (the RF attention's core) on one GPU: the Triton kernel against the PyTorch chunked
reference and against softmax attention (torch SDPA: cuDNN / flash), forward + backward, over the length.

    python benchmarks/rf_kernel_bench.py --out rf_kernel.json            # one CUDA GPU, T = 4k .. 1M
    python benchmarks/rf_kernel_bench.py --smoke --out /tmp/rf_smoke.json  # CPU, tiny sizes (reference only,
                                                                           # plus the interpreted kernel)

Cells: B=1, H=16, hd=64, feature width M in ``--features`` (64 and 128), ``--dtype`` (bf16 by default), T in
``--lengths``. Linear attention gets features fq, fk (B, H, T, M) (positive, like gaussian RF features), values
v and, with ``--floor``, a floor; SDPA gets q, k, v (B, H, T, hd) with is_causal (it has no M). Each cell times
one forward and its backward (``torch.autograd.grad`` of the output against a fixed cotangent): the median of
``--reps`` repetitions after ``--warmup``, each between its own CUDA events. ``peak_mib``: the peak allocation
of one forward + backward above what was allocated before it. ``rel_err``: relative L2 error of the output
and the gradients (fq, fk, v) of the Triton kernel against the reference in the same dtype (where both ran);
``rel_err_fp32``: of each against the reference run on the same inputs in fp32. An implementation whose last
time exceeded ``--budget-s`` (or that failed, e.g. out of memory) is not run at longer lengths.
``crossover``: per M, the first T at which the Triton kernel is faster than SDPA (and than the reference).
``check`` (first, unless ``--no-check``): the kernel's output, state and gradients against the fp64 reference
at odd and several-segment sizes, fp32 and bf16 (on a GPU this is the compiled kernel's first test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms, peak_bytes  # noqa: E402

MIB = 1 << 20
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
IMPLS = ("triton", "reference", "sdpa")


def make_inputs(T: int, M: int, B: int, H: int, D: int, device: str, dtype: torch.dtype, floor: bool, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    fq = torch.rand(B, H, T, M, device=device, dtype=dtype, generator=gen)
    fk = torch.rand(B, H, T, M, device=device, dtype=dtype, generator=gen)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    dy = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    fl = (0.3 * M * torch.arange(1, T + 1, device=device, dtype=torch.float32)).expand(B, T).contiguous() \
        if floor else None
    return fq, fk, q, k, v, dy, fl


def step_fn(impl: str, fq, fk, q, k, v, dy, fl, chunk: int):
    """A callable running one forward + backward of ``impl``, and the list of its differentiable inputs."""
    from revnet_kernels.attn import sdpa_impl
    from revnet_kernels.linear_attn import linear_attention

    if impl == "sdpa":
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]

        def fwd():
            return sdpa_impl(*inputs, causal=True)
    else:
        inputs = [t.detach().requires_grad_() for t in (fq, fk, v)]

        def fwd():
            return linear_attention(*inputs, floor=fl, chunk_size=chunk, impl=impl)[0]

    def step():
        out = fwd()
        return (out.detach(), *torch.autograd.grad(out, inputs, dy))

    return step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32  # fp32: 1M-token tensors
    a, b = a.to(wide), b.to(wide)
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def crossover(rows: list[dict], M: int, other: str) -> int | None:
    """The first T (for feature width M) where the Triton kernel ran faster than ``other`` (None: never)."""
    by_t: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("M") in (M, None) and "ms" in r:
            by_t.setdefault(r["T"], {})[r["impl"]] = r["ms"]
    for T in sorted(by_t):
        cell = by_t[T]
        if "triton" in cell and other in cell and cell["triton"] < cell[other]:
            return T
    return None


def check(device: str, long_T: int = 5000) -> list[dict]:
    """Correctness before timing (on a GPU: the compiled kernel): the Triton kernel's output, state and
    gradients (features, values, incoming state) against the fp64 reference on odd sizes, with a mixed floor
    and an incoming state; fp32 and bf16; short and several-segment lengths."""
    from revnet_kernels.linear_attn import reference_linear_attention
    from revnet_kernels.linear_attn_triton import triton_linear_attention

    rows = []
    for dtype, T, M, D in ((torch.float32, 37, 12, 10), (torch.float32, long_T, 64, 64),
                           (torch.bfloat16, 37, 12, 10), (torch.bfloat16, long_T, 128, 64)):
        gen = torch.Generator(device=device).manual_seed(1)
        B, H = 2, 3
        ins = [torch.rand(B, H, T, M, device=device, dtype=torch.float64, generator=gen),
               torch.rand(B, H, T, M, device=device, dtype=torch.float64, generator=gen),
               torch.randn(B, H, T, D, device=device, dtype=torch.float64, generator=gen),
               torch.randn(B, H, M, D, device=device, dtype=torch.float64, generator=gen),
               3 * torch.rand(B, H, M, device=device, dtype=torch.float64, generator=gen)]
        typical = 0.25 * M * torch.arange(1, T + 1, device=device, dtype=torch.float64)
        floor = typical * (0.7 + 0.6 * torch.rand(B, T, device=device, dtype=torch.float64, generator=gen))
        grads = [torch.randn(B, H, T, D, device=device, dtype=torch.float64, generator=gen),
                 torch.randn(B, H, M, D, device=device, dtype=torch.float64, generator=gen),
                 torch.randn(B, H, M, device=device, dtype=torch.float64, generator=gen)]

        def run_one(fn, dt):
            leaves = [t.to(dt).requires_grad_() for t in ins]
            outs = fn(*leaves, floor.to(dt))
            loss = sum((o * g.to(dt)).sum() for o, g in zip(outs, grads))
            return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

        got = run_one(lambda fq, fk, v, kv0, z0, f: triton_linear_attention(fq, fk, v, f, kv0, z0, 64), dtype)
        want = run_one(lambda fq, fk, v, kv0, z0, f: reference_linear_attention(fq, fk, v, 64, kv0, z0, f),
                       torch.float64)
        names = ("out", "kv", "z", "dfq", "dfk", "dv", "dkv0", "dz0")
        row = {"dtype": str(dtype).removeprefix("torch."), "T": T, "M": M, "hd": D,
               "rel_err": {n: rel_err(g, w) for n, g, w in zip(names, got, want)}}
        rows.append(row)
        print("check", json.dumps(row), flush=True)
    return rows


def run(args) -> dict:
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    B, H, D = args.batch, args.heads, args.head_dim
    lengths = args.lengths or ((37, 100) if args.smoke else LENGTHS)
    widths = args.features or ((12,) if args.smoke else (64, 128))
    reps, warmup = (2, 1) if args.smoke else (args.reps, args.warmup)
    checked = check(device, 150 if args.smoke else 5000) if not args.no_check else []
    rows: list[dict] = []
    stopped: set[tuple] = set()  # (impl, M) that failed or passed the budget
    for T in lengths:
        for M in widths:
            fq, fk, q, k, v, dy, fl = make_inputs(T, M, B, H, D, device, dtype, args.floor)
            results = {}
            for impl in IMPLS:
                key = (impl, None if impl == "sdpa" else M)
                if key in stopped or (impl == "sdpa" and M != widths[0]):  # SDPA has no M: once per T
                    continue
                row = dict(impl=impl, T=T, M=None if impl == "sdpa" else M, B=B, H=H, hd=D, dtype=args.dtype,
                           floor=args.floor, chunk=args.chunk)
                try:
                    step = step_fn(impl, fq, fk, q, k, v, dy, fl, args.chunk)
                    results[impl] = step()
                    row["ms"] = median_ms(step, cuda, reps, warmup)
                    row["peak_mib"] = peak_bytes(step) / MIB if cuda else None
                except Exception as exc:  # out of memory or a kernel that fails is a result, not the end
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    stopped.add(key)
                    if cuda:
                        torch.cuda.empty_cache()
                else:
                    if row["ms"] > args.budget_s * 1e3:
                        stopped.add(key)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if "triton" in results and "reference" in results:
                errs = [rel_err(a, b) for a, b in zip(results["triton"], results["reference"])]
                next(r for r in rows if r["impl"] == "triton" and r["T"] == T and r["M"] == M)["rel_err"] = errs
            if dtype != torch.float32 and results:  # both against the truth: the same inputs in fp32
                try:
                    f32 = [t.float() if t is not None else None for t in (fq, fk, q, k, v, dy, fl)]
                    truth = step_fn("reference", *f32, args.chunk)()
                    del f32
                    for impl in ("triton", "reference"):
                        if impl in results:
                            row = next(r for r in rows if r["impl"] == impl and r["T"] == T and r["M"] == M)
                            row["rel_err_fp32"] = [rel_err(a.float(), b) for a, b in zip(results[impl], truth)]
                            print(json.dumps({"impl": impl, "T": T, "M": M, "rel_err_fp32": row["rel_err_fp32"]}))
                    del truth
                except torch.cuda.OutOfMemoryError:
                    pass
            del results, fq, fk, q, k, v, dy, fl
            if cuda:
                torch.cuda.empty_cache()
    cross = {str(M): {"vs_sdpa": crossover(rows, M, "sdpa"), "vs_reference": crossover(rows, M, "reference")}
             for M in widths}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke; Triton interpreted)",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "reps": reps, "warmup": warmup,
            "check": checked, "results": rows, "crossover": cross}


def table(result: dict) -> str:
    lines = ["T | M | triton ms | reference ms | sdpa ms | triton MiB | reference MiB | sdpa MiB",
             "---|---|---|---|---|---|---|---"]
    cells: dict[tuple, dict] = {}
    sdpa: dict[int, dict] = {}
    for r in result["results"]:
        if r["impl"] == "sdpa":
            sdpa[r["T"]] = r
        else:
            cells.setdefault((r["T"], r["M"]), {})[r["impl"]] = r

    def fmt(r, key, spec):
        v = (r or {}).get(key)
        return format(v, spec) if isinstance(v, (int, float)) else ("err" if r and "error" in r else "-")

    for (T, M), by in sorted(cells.items()):
        rs = [by.get("triton"), by.get("reference"), sdpa.get(T)]
        lines.append(" | ".join([str(T), str(M), *(fmt(r, "ms", ".3f") for r in rs),
                                 *(fmt(r, "peak_mib", ".0f") for r in rs)]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, the kernel interpreted (no CUDA)")
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--features", type=int, nargs="*", default=None, help="feature widths M (default 64 128)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--floor", action="store_true", help="pass a floor (the Fourier kernels' normaliser)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check before timing")
    p.add_argument("--budget-s", type=float, default=3.0, help="stop an implementation after a cell this slow")
    args = p.parse_args(argv)
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
        args.heads, args.head_dim = min(args.heads, 2), min(args.head_dim, 10)
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke)")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}: forward + backward, {args.dtype}")
    print(table(result))
    print("crossover (first T where triton is faster):", json.dumps(result["crossover"]))
    return result


if __name__ == "__main__":
    main()
