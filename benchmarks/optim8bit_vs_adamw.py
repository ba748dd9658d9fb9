"""8-bit AdamW state against fp32 AdamW: 200 steps on the embedded corpus at a tiny model size (issue #21).

Four runs from the same initial weights and batches: fp32 and 8-bit AdamW
(``revnet_torch.optim8bit.AdamW8bit``), each after the backward and inside it (``optimizer_in_backward=True``,
which clips by the previous step's norm); each 8-bit run is compared with the fp32 run of the same placement. Recorded: every step's loss, the final loss (mean of the last 20 steps, less
noisy than one batch), held-out bits per byte, and the optimizer-state bytes per parameter as measured on
the tensors.

    python benchmarks/optim8bit_vs_adamw.py --out docs/benchmarks/optim8bit/optim8bit_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import revnet_core
from revnet_core.data import lm_data, stdlib_corpus
from revnet_torch.optim import OptimizerInBackward
from revnet_torch.trainer import LongContextTrainer, environment

SHAPE = dict(num_layers=4, d_model=64, num_heads=4, d_ff=256, vocab_size=256, max_seq_len=128)
RUNS = {"adamw_fp32": ("adamw", False), "adamw8bit": ("adamw8bit", False),
        "adamw_fp32_in_backward": ("adamw", True), "adamw8bit_in_backward": ("adamw8bit", True)}
# Inside the backward, clipping uses the previous step's norm (revnet_torch.optim): each 8-bit run is compared
# with the fp32 run of the same placement, so the gap is the quantisation's alone.
REFERENCE = {"adamw8bit": "adamw_fp32", "adamw_fp32_in_backward": "adamw_fp32",
             "adamw8bit_in_backward": "adamw_fp32_in_backward"}


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state (the inner optimizers' when the step is in the backward)."""
    inners = optimizer._inner.values() if isinstance(optimizer, OptimizerInBackward) else [optimizer]
    return sum(t.numel() * t.element_size() for opt in inners for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)  # step counters (0-d) are not per-parameter state


def run(name: str, steps: int, seed: int) -> dict:
    optimizer, in_backward = RUNS[name]
    torch.manual_seed(seed)
    model = revnet_core.build("torch", **SHAPE)
    data = lm_data(stdlib_corpus(), seq_len=128, batch_size=8, seed=seed, eval_windows_max=32)
    trainer = LongContextTrainer(model, optimizer=optimizer, optimizer_in_backward=in_backward, lr=3e-3,
                                 warmup_steps=20, progress=False, plot=False, drift_every=None, seed=seed)
    t0 = time.perf_counter()
    summary = trainer.fit(data, steps=steps)
    losses = [r["loss"] for r in trainer.history if r.get("kind") == "train"]
    params = sum(p.numel() for p in model.parameters())
    return {"run": name, "optimizer": optimizer, "optimizer_in_backward": in_backward, "losses": losses,
            "final_loss_last20": sum(losses[-20:]) / len(losses[-20:]), "eval": summary["eval"], "params": params,
            "state_bytes": state_bytes(trainer.optimizer), "state_bytes_per_param": state_bytes(trainer.optimizer) / params,
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(name, args.steps, args.seed) for name in RUNS]
    by_name = {row["run"]: row for row in rows}
    for row in rows[1:]:
        ref = by_name[REFERENCE[row["run"]]]
        row["reference"] = ref["run"]
        row["final_loss_gap"] = row["final_loss_last20"] - ref["final_loss_last20"]
        row["final_loss_gap_rel"] = row["final_loss_gap"] / ref["final_loss_last20"]
        row["eval_bpb_gap"] = row["eval"]["eval_bits_per_byte"] - ref["eval"]["eval_bits_per_byte"]
        row["max_step_loss_gap"] = max(abs(a - b) for a, b in zip(row["losses"], ref["losses"]))
    result = {"environment": environment(torch.device("cpu")), "shape": SHAPE, "steps": args.steps,
              "seq_len": 128, "batch_size": 8, "lr": 3e-3, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(f"{row['run']:>24}: final loss {row['final_loss_last20']:.4f}  eval {row['eval']['eval_bits_per_byte']:.4f} "
              f"bpb  state {row['state_bytes_per_param']:.3f} B/param  gap {row.get('final_loss_gap', 0):+.4f}  "
              f"{row['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
