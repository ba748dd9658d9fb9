"""Norms and activations on one GPU: the registry's "torch" implementation (the eager ops the torch blocks call)
against "triton", forward + backward in bf16 at the seed model's shapes, to decide their ranking in
kernels/plugin.py ("torch" ranks first until this has run on an H200).

    python benchmarks/norm_act_bench.py                  # one CUDA GPU; writes $OUT/norm_act.json (OUT: default .)
    python benchmarks/norm_act_bench.py --smoke          # CPU, tiny shapes, "reference" against "torch"

Cases: layer_norm and rms_norm over hidden 1024 (weight and bias in the input's dtype), gelu over width 4096,
geglu and swiglu over width 8192 (output 4096), for 65536 and 262144 rows. Each cell times one forward and
its backward (``torch.autograd.grad`` of the output against a fixed cotangent, so no gradient accumulates):
the median of ``--reps`` repetitions after ``--warmup``, queued back to back, each between its own CUDA
events, one synchronisation at the end. ``peak_mib``: ``torch.cuda.max_memory_allocated`` during one
forward + backward minus what was allocated before it (the inputs and the cotangent). ``rel_err``: relative
L2 error of the output and of each input gradient against the first implementation's.
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
HIDDEN = 1024
WIDTHS = {"gelu": 4096, "geglu": 8192, "swiglu": 8192}
ROWS = (65536, 262144)


def cases(smoke: bool) -> list[dict]:
    """(op, kind, rows, width) of every cell: width is the input's last dimension."""
    rows = (64,) if smoke else ROWS
    hidden = 32 if smoke else HIDDEN
    widths = {k: (w // 64 if smoke else w) for k, w in WIDTHS.items()}
    out = []
    for n in rows:
        out += [dict(op=op, kind=None, rows=n, width=hidden) for op in ("layer_norm", "rms_norm")]
        out += [dict(op="activation", kind=k, rows=n, width=w) for k, w in widths.items()]
    return out


def make_inputs(case: dict, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(inputs, output cotangent) of one cell, on ``device`` in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, w = case["rows"], case["width"]
    x = torch.randn(n, w, device=device, dtype=dtype, generator=gen)
    if case["op"] == "layer_norm":
        inputs = [x, 1 + 0.1 * torch.randn(w, device=device, dtype=dtype, generator=gen),
                  0.1 * torch.randn(w, device=device, dtype=dtype, generator=gen)]
    elif case["op"] == "rms_norm":
        inputs = [x, 1 + 0.1 * torch.randn(w, device=device, dtype=dtype, generator=gen)]
    else:
        inputs = [x]
    out_width = w // 2 if case["kind"] in ("geglu", "swiglu") else w
    dy = torch.randn(n, out_width, device=device, dtype=dtype, generator=gen)
    return [t.requires_grad_() for t in inputs], dy


def forward(case: dict, impl: str):
    """The cell's op through the registry with ``impl`` forced: inputs -> output."""
    from revnet_kernels.activations import activation
    from revnet_kernels.norms import layer_norm, rms_norm

    if case["op"] == "layer_norm":
        return lambda x, w, b: layer_norm(x, w, b, impl=impl)
    if case["op"] == "rms_norm":
        return lambda x, w: rms_norm(x, w, impl=impl)
    return lambda u: activation(u, case["kind"], impl=impl)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def run_cell(case: dict, impls: tuple[str, ...], device: str, dtype: torch.dtype, reps: int, warmup: int) -> list[dict]:
    inputs, dy = make_inputs(case, device, dtype)
    cuda = device == "cuda"
    rows, first = [], None
    for impl in impls:
        row = dict(case, impl=impl, dtype=str(dtype).removeprefix("torch."))
        fwd = forward(case, impl)

        def step():
            return torch.autograd.grad(fwd(*inputs), inputs, dy)

        try:
            y = fwd(*inputs)
            results = (y.detach(), *torch.autograd.grad(y, inputs, dy))
            del y
            row["ms"] = median_ms(step, cuda, reps, warmup)
            row["peak_mib"] = peak_bytes(step) / MIB if cuda else None
        except Exception as exc:  # a kernel that fails to compile or launch is a result, not the end of the run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            continue
        if first is None:
            first = results
        row["rel_err"] = [rel_err(a, b) for a, b in zip(results, first)]
        rows.append(row)
        del results
    return rows


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def table(rows: list[dict], impls: tuple[str, ...]) -> str:
    head = ["op", "rows", "width"] + [f"{i} ms" for i in impls] + [f"{impls[1]}/{impls[0]}"] + \
        [f"{i} MiB" for i in impls]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["kind"] or r["op"], r["rows"], r["width"]), {})[r["impl"]] = r

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for (name, n, w), by in cells.items():
        ms = [by.get(i, {}).get("ms") for i in impls]
        ratio = ms[1] / ms[0] if all(isinstance(m, float) for m in ms) else None
        mib = [by.get(i, {}).get("peak_mib") for i in impls]
        lines.append(" | ".join([name, str(n), str(w), *(fmt(m, ".3f") for m in ms), fmt(ratio, ".2f"),
                                 *(fmt(m, ".1f") for m in mib)]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference against torch (no CUDA)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if args.smoke:
        device, impls, reps, warmup = "cpu", ("reference", "torch"), 3, 1
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --smoke)")
        device, impls, reps, warmup = "cuda", ("torch", "triton"), args.reps, args.warmup
    dtype = torch.bfloat16
    rows = []
    for case in cases(args.smoke):
        rows += run_cell(case, impls, device, dtype, reps, warmup)
    command = " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])])
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", **versions(),
              "command": command, "reps": reps, "warmup": warmup, "impls": list(impls), "results": rows}
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_act.json").write_text(json.dumps(result, indent=1))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}: forward + backward, bf16")
    print(table(rows, impls))
    for r in rows:
        if "error" in r:
            print(f"{r['op']} {r['kind'] or ''} {r['impl']}: {r['error']}")
    return result


if __name__ == "__main__":
    main()
