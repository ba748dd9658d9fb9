"""``run`` for ``revnet train --backend numba``: the torch trainer's loop on numpy, with the same files.

One optimizer step = ``grad_accum`` micro-batches, the loss the token mean over the step; AdamW (numpy,
``optim.AdamW``) with weight decay on matrices only, linear warmup then cosine decay (``revnet_core.schedule``),
gradient clipping by global norm. With an output folder every record goes to ``log.jsonl``
(``revnet_core.runlog``), the plot to ``train.png``, the summary to ``run.json``, and the weights and optimizer
state to ``checkpoint.npz``. Not built yet: ``--resume``, ``--scheduler``, the passkey task, precisions
other than fp32; each is refused by name before the first step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from revnet_core import runlog
from revnet_core.data import IGNORE_INDEX, TrainingData, bits
from revnet_core.errors import ConfigError, RevNetError
from revnet_core.schedule import cosine_schedule, warmup_steps

from .model import ReversibleTransformerNumba
from .optim import AdamW

CHECKPOINT_NAME = "checkpoint.npz"


class TrainingError(RevNetError):
    """Training cannot go on (a non-finite loss or gradient); the message says what to change."""


def _refuse_unbuilt(settings, data: TrainingData) -> None:
    for what, unbuilt in (("--resume", settings.resume), ("--scheduler", settings.scheduler),
                          (f"--task {data.task}", data.task != "lm"),
                          (f"--precision {settings.precision}", settings.precision not in ("auto", "fp32")),
                          (f"--device {settings.device}", settings.device not in ("auto", "cpu"))):
        if unbuilt:
            raise ConfigError(f"{what} is not built in the numba trainer yet (it trains fp32 language models on "
                              "the CPU from scratch); use --backend torch for it")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment() -> dict[str, Any]:
    """Versions and device, recorded with every result."""
    import numba

    return {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "device": f"cpu ({numba.get_num_threads()} threads)", "platform": platform.platform(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


def targets_of(ids: np.ndarray, labels: np.ndarray | None) -> int:
    """How many next-token targets a batch has (what its mean loss is over)."""
    lab = ids if labels is None else labels
    return int(np.sum(lab[:, 1:] != IGNORE_INDEX))


def evaluate(model: ReversibleTransformerNumba, data: TrainingData) -> dict[str, float]:
    """Held-out loss (nats, the token mean over every batch) and bits per byte (or per token)."""
    nats, count = 0.0, 0
    for ids, labels in data.eval_batches:
        n = targets_of(ids, labels)
        nats += model.loss(ids, labels) * n
        count += n
    loss = nats / max(count, 1)
    return {"eval_loss": loss, f"eval_bits_per_{'byte' if data.units == 'bytes' else 'token'}": bits(loss)}


def train_step(model, opt: AdamW, data: TrainingData, accum: int, max_norm: float) -> dict[str, Any]:
    """One optimizer step over ``accum`` micro-batches; returns loss, grad_norm and tokens."""
    total: dict[str, np.ndarray] = {}
    nats, targets, tokens = 0.0, 0, 0
    for _ in range(accum):
        ids, labels = data.sampler.next_batch()
        n = targets_of(ids, labels)
        loss, grads = model.value_and_grad(ids, labels)
        for k, g in grads.items():  # summed nats, scaled after: the step's loss is the mean over its targets
            total[k] = total[k] + g * n if k in total else g * n
        nats, targets, tokens = nats + loss * n, targets + n, tokens + ids.size
    scale = 1.0 / max(targets, 1)
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in total.values())) * scale
    if max_norm and norm > max_norm:
        scale *= max_norm / norm
    loss = nats / max(targets, 1)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingError(f"non-finite loss ({loss}) or gradient norm ({norm}); lower the learning rate")
    opt.step({k: g * scale for k, g in total.items()})
    return {"loss": loss, "grad_norm": norm, "tokens": tokens}


def save_checkpoint(path: Path, model, opt: AdamW, step: int, data: TrainingData) -> Path:
    """Weights, AdamW moments, the step and the sampler's state in one .npz, written atomically."""
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    arrays.update({f"m/{k}": v for k, v in opt.m.items()})
    arrays.update({f"v/{k}": v for k, v in opt.v.items()})
    meta = {"step": step, "adam_t": opt.t, "config": model.config.to_dict(),
            "sampler": data.sampler.state_dict()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8), **arrays)
    os.replace(tmp, path)
    return path


def run(settings, data: TrainingData) -> dict[str, Any]:
    """Build the model ``settings`` describe and train it on ``data`` (``revnet train --backend numba``)."""
    _refuse_unbuilt(settings, data)
    model = ReversibleTransformerNumba(settings.model_config(), seed=settings.seed)
    if settings.policies:
        model.set_policy(settings.policies)
    steps = settings.steps
    warm = warmup_steps(steps, settings.warmup)
    factor = cosine_schedule(warm, steps, settings.min_lr_ratio)
    opt = AdamW(model.params, lr=settings.lr, weight_decay=settings.weight_decay,
                decay=[k for k, v in model.params.items() if v.ndim == 2])
    out = Path(settings.out) if settings.out else None
    if out is not None and (out / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{os.fspath(out)!r} already holds a checkpoint; choose another output folder")
    hyper = {"lr": settings.lr, "warmup": warm, "min_lr_ratio": settings.min_lr_ratio, "grad_accum": settings.grad_accum,
             "weight_decay": settings.weight_decay, "max_grad_norm": settings.max_grad_norm, "optimizer": "AdamW (numpy)"}
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / runlog.LOG_NAME, "w")

    def emit(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    emit({"kind": "run", "step": 0, "steps": steps, "config": model.config.to_dict(), "trainer": hyper,
          "warmup": warm, "data": data.identity, "environment": environment(), "mem_kind": "process RSS"})
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, disable=not settings.progress, file=sys.stderr, unit="step")
    last, last_eval, peak = None, {}, 0
    try:
        for step in range(1, steps + 1):
            opt.lr = settings.lr * factor(step - 1)
            t0 = time.perf_counter()
            rec = train_step(model, opt, data, settings.grad_accum, settings.max_grad_norm)
            elapsed = time.perf_counter() - t0
            mem = _rss_bytes()
            peak = max(peak, mem)
            last = {"kind": "train", "step": step, **rec, "lr": opt.lr, "tokens_per_s": rec["tokens"] / elapsed,
                    "step_s": elapsed, "mem_bytes": mem}
            emit(last)
            if (settings.eval_every and step % settings.eval_every == 0 or step == steps) and data.eval_batches:
                last_eval = {"kind": "eval", "step": step, **evaluate(model, data)}
                emit(last_eval)
                bar.write(runlog.eval_line(last_eval), file=sys.stderr)
            bar.update(1)
            bar.set_postfix_str(f"loss {rec['loss']:.4f}  {last['tokens_per_s']:,.0f} tok/s", refresh=False)
            if out is not None and settings.checkpoint_every and step % settings.checkpoint_every == 0:
                save_checkpoint(out / CHECKPOINT_NAME, model, opt, step, data)
    finally:
        bar.close()
        if log is not None:
            log.close()
    paths: dict[str, str] = {}
    summary = {"step": steps, "steps": steps, "stopped": False, "resumed_from": None,
               "loss": last["loss"] if last else None, "eval": {k: v for k, v in last_eval.items() if k != "kind"},
               "peak_mem_bytes": peak, "mem_kind": "process RSS", "paths": paths,
               "device": environment()["device"], "precision": "fp32", "data": data.identity,
               "policies": list(model.policies), "params": model.num_params()}
    if out is not None:
        paths["checkpoint"] = os.fspath(save_checkpoint(out / CHECKPOINT_NAME, model, opt, steps, data))
        paths["log"] = os.fspath(out / runlog.LOG_NAME)
        if settings.plot:
            paths["plot"] = os.fspath(runlog.plot_log(out / runlog.LOG_NAME, out / runlog.PLOT_NAME))
        paths["result"] = os.fspath(out / runlog.RESULT_NAME)
        runlog.write_json(out / runlog.RESULT_NAME, {**summary, "environment": environment(),
                                                      "config": model.config.to_dict(), "trainer": hyper})
    return summary
