"""``run`` for ``revnet train --backend numba``: the torch trainer's loop on numpy, with the same files.

One optimizer step = ``grad_accum`` micro-batches, the loss the token mean over the step; AdamW (numpy,
``optim.AdamW``) with weight decay on matrices only, linear warmup then cosine decay (``revnet_core.schedule``),
gradient clipping by global norm. With an output folder every record goes to ``log.jsonl``
(``revnet_core.runlog``), the plot to ``train.png``, the summary to ``run.json``, and the weights and optimizer
state to ``checkpoint.npz`` (written to a temporary file, fsynced, then renamed over the old one).
``--resume`` continues from such a checkpoint bit for bit: the weights, AdamW's moments and step, the
sampler's state and the step are restored, and every step after is the one an uninterrupted run takes
(tested on losses and weights). Not built yet: ``--scheduler``, the passkey task, precisions other than
fp32; each is refused by name before the first step.
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

from revnet_core import atomic, runlog
from revnet_core.data import IGNORE_INDEX, TrainingData, eval_record
from revnet_core.errors import (CheckpointCorruptError, CheckpointError, CheckpointIncompatibleError, ConfigError,
                                 TrainingError)
from revnet_core.resume import check_resumable, comparable_config, plain
from revnet_core.memory import host_rss_bytes
from revnet_core.schedule import cosine_schedule, warmup_steps

from .model import ReversibleTransformerNumba
from .optim import AdamW

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = "revnet-numba-checkpoint-v1"


def _refuse_unbuilt(settings, data: TrainingData) -> None:
    for what, unbuilt in (("--scheduler", settings.scheduler),
                          (f"--task {data.task}", data.task != "lm"),
                          (f"--precision {settings.precision}", settings.precision not in ("auto", "fp32")),
                          (f"--device {settings.device}", settings.device not in ("auto", "cpu"))):
        if unbuilt:
            raise ConfigError(f"{what} is not built in the numba trainer yet (it trains fp32 language models on "
                              "the CPU from scratch); use --backend torch for it")


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
    return eval_record(nats, count, data.units)


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


# Besides the core's resumable fields (revnet_core.resume): the backend_options sections are kernel choices.
RESUMABLE_TOO = ("backend_options",)


def run_identity(settings, data: TrainingData) -> dict[str, Any]:
    """What must match for a resume to continue the same run (the total number of steps may change)."""
    return plain({"data": data.identity, "seq_len": data.seq_len, "batch_size": data.batch_size,
                      "grad_accum": settings.grad_accum, "lr": settings.lr, "warmup": settings.warmup,
                      "min_lr_ratio": settings.min_lr_ratio, "max_grad_norm": settings.max_grad_norm,
                      "weight_decay": settings.weight_decay, "seed": settings.seed})


def _comparable_config(config) -> dict[str, Any]:
    return comparable_config(config.to_dict(), *RESUMABLE_TOO)


def save_checkpoint(path: Path, model, opt: AdamW, step: int, data: TrainingData,
                    run: dict[str, Any] | None = None) -> Path:
    """Weights, AdamW moments and step, the sampler's state, the step and the run's identity in one .npz,
    written atomically: a temporary file beside it, fsynced, renamed over ``path``, the folder fsynced."""
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    arrays.update({f"m/{k}": v for k, v in opt.m.items()})
    arrays.update({f"v/{k}": v for k, v in opt.v.items()})
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "adam_t": opt.t, "config": model.config.to_dict(),
            "sampler": data.sampler.state_dict(), "run": run or {}}
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8), **arrays)
    return path


def resolve_checkpoint(path) -> Path:
    """The checkpoint file of a file path or a run folder (``DIR/checkpoint.npz``); CheckpointError if none."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no numba checkpoint at {os.fspath(p)!r}")
    return p


def load_checkpoint(path, model, opt: AdamW, data: TrainingData, run: dict[str, Any]) -> int:
    """Restore a ``save_checkpoint`` file into ``model``, ``opt`` and ``data``'s sampler after checking it
    belongs to this run (same architecture, data and hyperparameters); returns its step. CheckpointError naming
    what differs, or why the file cannot be read."""
    where = resolve_checkpoint(path)
    try:
        with np.load(where, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"cannot read the checkpoint {os.fspath(where)!r} ({type(exc).__name__}: "
                                     f"{exc}); it is not a numba run's checkpoint.npz, or it was cut short") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointIncompatibleError(f"{os.fspath(where)!r} is not a numba checkpoint of format "
                                          f"{CHECKPOINT_FORMAT!r}")
    check_resumable(comparable_config(meta["config"], *RESUMABLE_TOO), _comparable_config(model.config),
                    meta.get("run", {}), run, where)
    for group, target in (("param", model.params), ("m", opt.m), ("v", opt.v)):
        for k, dest in target.items():
            src = arrays.get(f"{group}/{k}")
            if src is None or src.shape != dest.shape:
                raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} lacks {group}/{k} of shape {dest.shape}")
            dest[...] = src  # in place: the layers' blocks and the optimizer hold these very arrays
    opt.t = int(meta["adam_t"])
    data.sampler.load_state_dict(meta["sampler"])
    return int(meta["step"])


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
    run_id = run_identity(settings, data)
    start = 0
    if settings.resume:
        start = load_checkpoint(settings.resume, model, opt, data, run_id)
        if start >= steps:
            raise ConfigError(f"the checkpoint is at step {start} of {steps}; ask for more --steps to go on")
    elif out is not None and (out / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{os.fspath(out)!r} already holds a checkpoint; resume it (--resume) or choose another "
                          "output folder")
    hyper = {"lr": settings.lr, "warmup": warm, "min_lr_ratio": settings.min_lr_ratio, "grad_accum": settings.grad_accum,
             "weight_decay": settings.weight_decay, "max_grad_norm": settings.max_grad_norm, "optimizer": "AdamW (numpy)"}
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if start and (out / runlog.LOG_NAME).exists():
            runlog.truncate_log(out / runlog.LOG_NAME, start)  # steps past the checkpoint are redone
        log = open(out / runlog.LOG_NAME, "a" if start else "w")

    def emit(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    emit({"kind": "resume" if start else "run", "step": start, "steps": steps, "config": model.config.to_dict(),
          "trainer": hyper,
          "warmup": warm, "data": data.identity, "environment": environment(), "mem_kind": "process RSS"})
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, disable=not settings.progress, file=sys.stderr, unit="step")
    last, last_eval, peak = None, {}, 0
    try:
        for step in range(start + 1, steps + 1):
            opt.lr = settings.lr * factor(step - 1)
            t0 = time.perf_counter()
            rec = train_step(model, opt, data, settings.grad_accum, settings.max_grad_norm)
            elapsed = time.perf_counter() - t0
            mem = host_rss_bytes()
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
                save_checkpoint(out / CHECKPOINT_NAME, model, opt, step, data, run_id)
    finally:
        bar.close()
        if log is not None:
            log.close()
    paths: dict[str, str] = {}
    summary = {"step": steps, "steps": steps, "stopped": False, "resumed_from": start or None,
               "loss": last["loss"] if last else None, "eval": {k: v for k, v in last_eval.items() if k != "kind"},
               "peak_mem_bytes": peak, "mem_kind": "process RSS", "paths": paths,
               "device": environment()["device"], "precision": "fp32", "data": data.identity,
               "policies": list(model.policies), "params": model.num_params()}
    if out is not None:
        paths["checkpoint"] = os.fspath(save_checkpoint(out / CHECKPOINT_NAME, model, opt, steps, data, run_id))
        paths["log"] = os.fspath(out / runlog.LOG_NAME)
        if settings.plot:
            paths["plot"] = os.fspath(runlog.plot_log(out / runlog.LOG_NAME, out / runlog.PLOT_NAME))
        paths["result"] = os.fspath(out / runlog.RESULT_NAME)
        runlog.write_json(out / runlog.RESULT_NAME, {**summary, "environment": environment(),
                                                      "config": model.config.to_dict(), "trainer": hyper})
    return summary
