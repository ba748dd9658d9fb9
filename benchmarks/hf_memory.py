"""Fine-tuning memory of a converted Hugging Face model beside the original, with and without HF gradient
checkpointing: peak memory and step time at a fixed context, and the longest context that fits (doubling
until out of memory), for a GPT-2-large-sized and a Llama-1B-sized random config (the real models' d, heads,
layers, vocab), fp32 weights, bf16 autocast, AdamW, batch 1.

All variants use the same loss head (``revnet_torch.loss.chunked_lm_loss`` over the base model's last
hidden state) so the full-length logits of HF's head (vocab x T in fp32: 33 GB at 64k tokens for Llama's
128k vocab) do not decide the longest context; what is compared is the layer stack. For the converted
model it also records the drift of the rebuilt stack input (0: bit-exact reconstruction on this device).

    python benchmarks/hf_memory.py                  # H200: both models, < 8 min, JSON under $OUT

``projected_longest``: where the line through the last two peaks (peak is affine in T with SDPA's fused
kernels) meets the device's memory; the doubling itself stops at 131072 tokens or its time budget.
    python benchmarks/hf_memory.py --tiny           # CPU smoke test at tiny size (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

FULL = {
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257)),
    "llama-1b": ("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                               tie_word_embeddings=True, rope_theta=500000.0)),
}
TINY = {
    "gpt2-tiny": ("gpt2", dict(n_layer=4, n_embd=64, n_head=4, vocab_size=101)),
    "llama-tiny": ("llama", dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True)),
}
VARIANTS = ("original", "reversible", "hf_checkpointing")


def build(kind: str, fields: dict, max_len: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with device:
        if kind == "gpt2":
            cfg = GPT2Config(**fields, n_positions=max_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             use_cache=False, attn_implementation="sdpa")
            model = GPT2LMHeadModel(cfg)
            return model, "transformer"
        cfg = LlamaConfig(**fields, max_position_embeddings=max_len, use_cache=False, attn_implementation="sdpa")
        return LlamaForCausalLM(cfg), "model"


class Drift:
    def __init__(self):
        self.seen = []

    def record(self, layers, drift):
        self.seen.append(drift)


def make_step(model, base_name: str, variant: str):
    """step(ids) -> loss: one fine-tuning step (forward, backward, AdamW) of the variant."""
    from revnet_torch.hf import convert_to_reversible
    from revnet_torch.loss import chunked_lm_loss

    if variant == "hf_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    runner = convert_to_reversible(model) if variant == "reversible" else model
    base = getattr(runner, base_name)
    runner.train()
    weight = model.lm_head.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    dev = weight.device.type

    def step(ids):
        with torch.autocast(dev, dtype=torch.bfloat16):
            hidden = base(ids, use_cache=False).last_hidden_state
            loss = chunked_lm_loss(hidden[:, :-1], weight, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device):
    """Peak allocated GiB since the last reset (None on CPU, which keeps no such count)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(model, base_name, variant, vocab, device, t_time, t_start, t_cap, budget_s):
    """One variant: peak and step time at t_time, drift (reversible), then the longest context by doubling."""
    out = {"variant": variant}
    oom = torch.OutOfMemoryError
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        step, opt = make_step(model, base_name, variant)
        ids = torch.randint(0, vocab, (1, t_time), generator=g).to(device)
        step(ids)  # warm-up; allocates the optimizer state
        sync(device)
        reset_peak(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss = step(ids)
            sync(device)
            times.append(time.perf_counter() - t0)
        out.update(context=t_time, peak_gib=peak_gib(device), step_s=min(times), loss=float(loss))
        if variant == "reversible":
            from revnet_torch import engine

            drift = Drift()
            with engine.watching(drift):
                step(ids)
            out["rebuilt_input_drift"] = drift.seen
    except oom:
        out.update(context=t_time, peak_gib=None, step_s=None, error="out of memory")
    del ids
    cleanup(device)
    started, last, T = time.perf_counter(), 0.0, t_start
    fits, stop, points = None, "cap", []
    while T <= t_cap:
        if time.perf_counter() - started + 3 * last > budget_s:
            stop = "time budget"
            break
        try:
            ids = torch.randint(0, vocab, (1, T), generator=g).to(device)
            reset_peak(device)
            t0 = time.perf_counter()
            step(ids)
            sync(device)
            last = time.perf_counter() - t0
            fits = {"context": T, "peak_gib": peak_gib(device), "step_s": last}
            points.append((T, fits["peak_gib"]))
            del ids
        except oom:
            stop = "out of memory"
            opt.zero_grad(set_to_none=True)
            break
        finally:
            cleanup(device)
        T *= 2
    out.update(longest=fits, stopped_by=stop)
    if len(points) >= 2 and device.type == "cuda":
        # peak is affine in T here (no T x T buffers): the context where the line meets the device's memory
        (t1, p1), (t2, p2) = points[-2:]
        slope = (p2 - p1) / (t2 - t1)
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        out["gib_per_1k_tokens"] = slope * 1024
        out["projected_longest"] = int(t2 + (total - p2) / slope) if slope > 0 else None
    del step, opt
    model.zero_grad(set_to_none=True)
    cleanup(device)
    return out


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results, t_time: int) -> str:
    """The printed summary: one row per (model, variant)."""
    head = ["model", "variant", f"peak GiB @{t_time}", "step s", "longest", "peak GiB", "GiB/1k tok",
            "projected", "stopped by", "drift"]
    rows = [head]
    for r in results:
        lo = r["longest"] or {}
        rows.append([r["model"], r["variant"], _fmt(r.get("peak_gib")) if "error" not in r else r["error"],
                     _fmt(r.get("step_s"), 3), _fmt(lo.get("context")), _fmt(lo.get("peak_gib")),
                     _fmt(r.get("gib_per_1k_tokens"), 3), _fmt(r.get("projected_longest")), r["stopped_by"],
                     _fmt(r.get("rebuilt_input_drift"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (a smoke test)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="total seconds for all doubling searches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    configs = TINY if args.tiny else FULL
    t_time, t_start, t_cap = (64, 64, 512) if args.tiny else (4096, 8192, 131072)
    per_variant = args.budget_s / (len(configs) * len(VARIANTS))
    t_all = time.perf_counter()
    results = []
    for name, (kind, fields) in configs.items():
        model, base_name = build(kind, fields, t_cap, device)
        params = sum(p.numel() for p in model.parameters())
        for variant in VARIANTS:
            row = measure(model, base_name, variant, fields["vocab_size"], device, t_time, t_start, t_cap,
                          per_variant)
            row.update(model=name, params=params)
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
        cleanup(device)
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": "fp32 weights, bf16 autocast, AdamW, batch 1",
           "results": results, "seconds": time.perf_counter() - t_all}
    try:
        import transformers

        doc["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    path = args.out or os.path.join(os.environ.get("OUT") or "runs", "hf_memory.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(results, t_time))
    print(f"{doc['seconds']:.0f} s; JSON: {path}")


if __name__ == "__main__":
    sys.exit(main())
