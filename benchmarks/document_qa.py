"""DocumentQA on the synthetic long-document task, on a CPU: fine-tune a small fresh model, then answer
held-out questions per document length and fact depth.

    python benchmarks/document_qa.py --out docs/benchmarks/document_qa

Training documents come from the embedded corpus's training part, evaluation documents from its held-out part
(``revnet_core.qa_task``); a fact "The secret code of <name> is <6 digits>." sits at a known depth. Writes
``results.json`` (the grid of exact-match accuracy, digit accuracy and answer loss, the training curve, the
settings, versions and the exact command) and ``heatmap.png`` (accuracy) and ``heatmap_digits.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from revnet_core import qa_task
from revnet_torch.document_qa import DocumentQA


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/benchmarks/document_qa")
    p.add_argument("--size", default="small", help="a revnet_core.presets name")
    p.add_argument("--layers", type=int, default=2, help="override the preset's layers")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    p.add_argument("--heads", type=int, default=None, help="override the preset's heads")
    p.add_argument("--train-lengths", type=int, nargs="+", default=[64, 96, 128, 192, 256])
    p.add_argument("--train-examples", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--eval-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--eval-n", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in (("num_layers", args.layers), ("d_model", args.d_model), ("num_heads", args.heads))
              if v is not None}
    if "d_model" in fields:
        fields["d_ff"] = 4 * fields["d_model"]
    qa = DocumentQA(base_model=args.size, max_document_length=max(args.eval_lengths + args.train_lengths),
                    device="cpu", seed=args.seed, progress=False, max_answer_length=8, **fields)
    train = qa_task.QATask(split="train").examples(args.train_examples, args.train_lengths, seed=args.seed)
    probe = qa_task.QATask(split="eval").examples(32, args.train_lengths, seed=args.seed + 1)
    before = qa.answer_loss(probe)
    t0 = time.perf_counter()
    summary = qa.finetune(train_data=train, num_epochs=args.epochs, learning_rate=args.lr,
                          batch_size=args.batch_size, eval_data=probe)
    train_s = time.perf_counter() - t0
    curve = [{"step": r["step"], "loss": r["loss"]} for r in qa.trainer.history if r.get("kind") == "train"]
    t0 = time.perf_counter()
    grid = qa.evaluate(lengths=args.eval_lengths, depths=args.eval_depths, n=args.eval_n,
                       heatmap=out / "heatmap.png")
    qa_task.save_heatmap(grid, out / "heatmap_digits.png", key="digit_accuracy")
    eval_s = time.perf_counter() - t0
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "what": "fresh model fine-tuned on the synthetic QA task (revnet_core.qa_task), answers generated greedily "
                "(revnet_torch.document_qa.DocumentQA)",
        "model": {"size": args.size, **fields, "params": sum(p.numel() for p in qa.model.parameters()),
                  "config": qa.model.config.to_dict()},
        "training": {"examples": args.train_examples, "lengths": args.train_lengths, "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "steps": summary["step"],
                     "seconds": round(train_s, 1), "answer_loss_before": before,
                     "answer_loss_after": summary["eval"].get("eval_loss"),
                     "teacher_forced_exact_after": summary["eval"].get("eval_accuracy"),
                     "curve": curve[:: max(1, len(curve) // 50)]},
        "evaluation": {**{k: v for k, v in grid.items() if k != "heatmap"}, "seconds": round(eval_s, 1)},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine(), "threads": args.threads},
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"answer loss {before:.3f} -> {result['training']['answer_loss_after']:.3f} nats/byte in "
          f"{summary['step']} steps ({train_s:.0f} s); exact-match {grid['overall_accuracy']:.3f}, digits "
          f"{grid['overall_digit_accuracy']:.3f} (chance 0.1) over {len(grid['lengths'])}x{len(grid['depths'])} "
          f"cells of {args.eval_n}")
    return result


if __name__ == "__main__":
    main()
