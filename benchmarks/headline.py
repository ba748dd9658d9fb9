"""The README's headline table, rendered from the committed result files under docs/benchmarks/.

    python benchmarks/headline.py            # print the table
    python benchmarks/headline.py --write    # replace it in README.md (between the headline markers)
    python benchmarks/headline.py --check    # exit 1 if README.md's table is not what the files say
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
COLUMNS = (("plain", "plain PyTorch"), ("checkpoint", "checkpoint per layer"),
           ("offload", "checkpoint + CPU offload"), ("reversible", "reversible (ours)"))
GiB = 2**30
SEED_LAYERS = 24  # the pinned seed model's depth (MEASURING.md)


def _load(rel: str) -> dict:
    return json.loads((DOCS / rel).read_text())


def _cell(gib: float | None, seconds: float | None, oom: bool = False, note: str = "") -> str:
    if oom:
        return "out of memory" + note
    if gib is None:
        return "not run"
    return f"{gib:.2f} GiB, {seconds:.2f} s{note}"


def _tokens(n: int) -> str:
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n / 2**20:.2f}M ({n:,})" if n > 2**20 else f"{n // 1024}k"


def render() -> str:
    """The markdown table (and its footnotes) from the result files."""
    cells: dict[int, dict[str, str]] = {}
    bench = _load("bench/seed_h100.json")
    for r in bench["rows"]:
        cells.setdefault(r["seq"], {})[r["model"]] = _cell(
            None if r.get("oom") else r["peak_allocated_bytes"] / GiB, r.get("step_s_median"), r.get("oom", False))
    for rel, note in (("long_context/seed_256k_fused_loss_h100.json", ""),
                      ("long_context/seed_256k_offload_h100.json", " ¹"),
                      ("engine/seed_256k_reversible_plain_h100.json", " ¹")):
        for r in _load(rel)["rows"]:
            if r["method"] in ("reversible", "checkpoint") and "fused_loss" not in rel:
                continue  # superseded by the fused-loss-head run
            cells.setdefault(r["seq"], {})[r["method"]] = _cell(
                r.get("peak_allocated_gib"), r.get("step_s_median"), r.get("oom", False), note)
    one_m = _load("long_context/reversible_1m_2layers_head_chunks_h100.json")
    (r1,) = one_m["rows"]
    from revnet_core import ModelConfig
    from revnet_torch.cost import CostModel

    # one layer's parameters, gradients and AdamW state, fp32: 16 bytes a parameter
    per_layer_state = CostModel(ModelConfig(**one_m["config"])).layer_parameter_count() * 16
    proj = r1["peak_allocated_gib"] + (SEED_LAYERS - r1["layers"]) * per_layer_state / GiB
    cells[r1["seq"]] = {"reversible": f"{proj:.1f} GiB projected ² ({r1['peak_allocated_gib']:.2f} measured "
                                      f"with {r1['layers']} layers, {r1['step_s_median']:.1f} s)"}
    mc = _load("long_context/max_context_h100.json")["row"]
    cells[mc["seq"]] = {"reversible": f"{mc['projected_full_depth_gib']:.1f} GiB projected ² "
                                      f"({mc['peak_allocated_gib']:.2f} measured with {mc['layers_run']} layer, "
                                      f"{mc['step_s']:.0f} s): the longest that fits ³"}
    rev = {k: next(r for r in _load(f"loss_head/seed_64k_loss_{k}_h100.json")["rows"] if r["method"] == "reversible")
           for k in ("chunked", "fused")}  # the same 64k step with either loss head
    lines = ["| tokens | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for seq in sorted(cells):
        row = cells[seq]
        shown = [row.get(key, "—" if seq > 2**18 else "not run") for key, _ in COLUMNS]
        shown[-1] = f"**{shown[-1]}**"
        lines.append(f"| {_tokens(seq)} | " + " | ".join(shown) + " |")
    lines += [
        "",
        "¹ a separate device command on the same kind of GPU, not the run of its row's other columns. "
        "² activations are flat in depth under `reverse`, so the missing layers add their parameters, "
        f"gradients and AdamW state (16 bytes x {per_layer_state // 16:,} parameters each, norms included); the "
        "cost model predicts the same. "
        f"³ the cost model's longest length under 85% of the GPU's {mc['device_total_gib']:.1f} GiB, confirmed by "
        "one real step. "
        "Loss head: the 256k checkpoint and reversible cells ran the fused Triton linear cross-entropy, CUDA's "
        "default now (`loss_kernel=\"auto\"`); every other cell the chunked PyTorch head it replaced. At 64k "
        f"the fused head took the reversible step from {rev['chunked']['step_s_median']:.2f} to "
        f"{rev['fused']['step_s_median']:.2f} s at the same peak ({rev['fused']['peak_allocated_gib']:.2f} GiB).",
    ]
    return "\n".join(lines)


def replace_in(text: str, table: str) -> str:
    head, sep, rest = text.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    table = render()
    readme = ROOT / "README.md"
    if args.write:
        readme.write_text(replace_in(readme.read_text(), table))
    elif args.check:
        text = readme.read_text()
        if replace_in(text, table) != text:
            print("README.md's headline table differs from docs/benchmarks: run benchmarks/headline.py --write")
            return 1
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
