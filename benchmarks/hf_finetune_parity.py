"""Fine-tuning a converted Hugging Face model against fine-tuning the original: same data, steps, lr, seeds.

Per family (tiny GPT-2 and Llama configs) and seed: "pretrain" the original on task A (a random bigram
language), then fine-tune copies on task B (another bigram language) -- the original (plain autograd), the
converted model (BDIA, reverse policy) at gamma 0.5 and 0.125 -- with the same batches and AdamW settings,
and compare held-out loss on task B (evaluated in eval mode, where the converted model is the original
function). Writes JSON (``$OUT/hf_finetune_parity.json``, else ``--out``) and prints a table. CPU, ~1 min.

    python benchmarks/hf_finetune_parity.py [--steps 80] [--out runs/hf_finetune_parity.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch


def bigram_language(vocab: int, seed: int, concentration: float = 0.3) -> torch.Tensor:
    """A random bigram transition matrix (vocab, vocab), peaked so it is learnable."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) / concentration
    return torch.softmax(logits, -1)


def sample(trans: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """(batch, seq) int64 token sequences from the bigram chain."""
    x = torch.empty(batch, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, trans.shape[0], (batch,), generator=g)
    for t in range(1, seq):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def build(family: str, seed: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(model, batches, lr: float):
    """AdamW over the batches; returns the training losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for x in batches:
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def held_out(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return statistics.fmean(model(x, labels=x).loss.item() for x in batches)


def run(steps: int, pretrain_steps: int, seeds, batch: int = 16, seq: int = 32, vocab: int = 64, lr: float = 1e-3):
    from revnet_torch.hf import convert_to_reversible

    task_a, task_b = bigram_language(vocab, 100), bigram_language(vocab, 200)
    rows = []
    for family in ("gpt2", "llama"):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            pre = [sample(task_a, batch, seq, g) for _ in range(pretrain_steps)]
            fine = [sample(task_b, batch, seq, g) for _ in range(steps)]
            test = [sample(task_b, batch, seq, g) for _ in range(8)]
            base = build(family, seed, vocab)
            train(base, pre, 3e-3)
            start = held_out(base, test)
            row = {"family": family, "seed": seed, "held_out_before": start, "runs": {}}
            for name, gamma in (("original", None), ("bdia_0.5", 0.5), ("bdia_0.125", 0.125)):
                model = copy.deepcopy(base)
                runner = model if gamma is None else convert_to_reversible(model, gamma=gamma)
                torch.manual_seed(seed)  # the gamma draws of the converted runs
                t0 = time.perf_counter()
                curve = train(runner, fine, lr)
                row["runs"][name] = {"train_loss": curve, "held_out": held_out(model, test),
                                     "seconds": time.perf_counter() - t0}
            rows.append(row)
    return rows


def summarise(rows):
    out = {}
    for family in sorted({r["family"] for r in rows}):
        fam = [r for r in rows if r["family"] == family]
        for name in ("bdia_0.5", "bdia_0.125"):
            gaps = [r["runs"][name]["held_out"] - r["runs"]["original"]["held_out"] for r in fam]
            out[f"{family}/{name}"] = {
                "held_out_gap_mean": statistics.fmean(gaps), "held_out_gap_per_seed": gaps,
                "original_held_out_mean": statistics.fmean(r["runs"]["original"]["held_out"] for r in fam),
                "converted_held_out_mean": statistics.fmean(r["runs"][name]["held_out"] for r in fam),
                "before_fine_tuning_mean": statistics.fmean(r["held_out_before"] for r in fam)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/hf_finetune_parity.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = run(args.steps, args.pretrain_steps, args.seeds)
    summary = summarise(rows)
    result = {"steps": args.steps, "pretrain_steps": args.pretrain_steps, "seeds": args.seeds, "lr": 1e-3,
              "summary": summary, "rows": rows, "seconds": time.perf_counter() - t0,
              "torch": torch.__version__}
    path = os.path.join(os.environ["OUT"], "hf_finetune_parity.json") if os.environ.get("OUT") else args.out
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'run':<18} {'before':>8} {'original':>9} {'converted':>10} {'gap (mean)':>11}  per seed")
    for key, s in summary.items():
        print(f"{key:<18} {s['before_fine_tuning_mean']:8.4f} {s['original_held_out_mean']:9.4f} "
              f"{s['converted_held_out_mean']:10.4f} {s['held_out_gap_mean']:+11.4f}  "
              + " ".join(f"{g:+.4f}" for g in s["held_out_gap_per_seed"]))
    print(f"{result['seconds']:.0f} s; JSON: {path}")


if __name__ == "__main__":
    sys.exit(main())
