"""LongContextTrainer: the training loop for reversible LMs, and ``run`` for ``revnet train``.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; the loss is the token mean over the whole
step. AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay, gradient clipping
on by default (deep reversible stacks diverge more readily without it), bf16 autocast on GPU, fp32 on CPU.
Held-out evaluation reports bits per byte (mean nats / ln 2) for byte-level data. With an ``out_dir`` every
step goes to ``log.jsonl``, checkpoints to ``checkpoint.pt`` (see ``checkpoint.py``) and a plot of loss and
memory to ``train.png``. Ctrl-C stops at the end of the current step and saves a checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from revnet_core.data import IGNORE_INDEX, Batch, TrainingData, bits, new_generator
from revnet_core.errors import ConfigError, InputError, RevNetError

from . import checkpoint as ckpt

PRECISIONS = ("auto", "fp32", "bf16")
LOG_NAME = "log.jsonl"
PLOT_NAME = "train.png"
RESULT_NAME = "run.json"
# Config fields that change memory or speed but not the function the model computes: a run may resume with
# a different value (e.g. a smaller GPU needing another policy).
_RESUMABLE_CONFIG_FIELDS = ("policy", "loss_chunk_size")


class TrainingError(RevNetError):
    """Training cannot go on (a non-finite loss, out of memory); the message says what to change."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the GPU when present, else the CPU."""
    if device is not None and str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} was asked for but CUDA is not available here")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier for the optimizer step about to run (0-based): linear warmup, then cosine to min_ratio."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _cpu_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- datasets a user passes to ``train`` --------------------------------------------------------------
def _as_ids(item: Any, where: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One dataset item -> (ids (T,) int64, labels (T,) or None, units)."""
    labels = None
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise InputError(f"{where} is a dict without 'input_ids' (keys: {sorted(item)})")
        labels = item.get("labels")
        item = item["input_ids"]
    if isinstance(item, str):
        if vocab_size < 256:
            raise InputError(f"{where} is text, which is byte-tokenised (ids 0..255), but the model's "
                             f"vocab_size is {vocab_size}")
        return np.frombuffer(item.encode("utf-8"), dtype=np.uint8).astype(np.int64), None, "bytes"
    if isinstance(item, (bytes, bytearray)):
        return np.frombuffer(bytes(item), dtype=np.uint8).astype(np.int64), None, "bytes"
    arr = _int_array(item, where)
    lab = None if labels is None else _int_array(labels, f"{where} labels")
    if lab is not None and lab.shape != arr.shape:
        raise InputError(f"{where}: labels shape {lab.shape} must match input_ids shape {arr.shape}")
    return arr, lab, "tokens"


def _int_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise InputError(f"{where} must hold integer token ids, got dtype {value.dtype}")
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise InputError(f"{where} must be token ids (an integer tensor, array or list) or a text, "
                             f"got {type(value).__name__} of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InputError(f"{where} must be one sequence of shape (T,), got shape {arr.shape}")
    return arr.astype(np.int64)


def dataset_sequences(dataset: Any, max_length: int, vocab_size: int, what: str):
    """Sequences of at most ``max_length`` tokens from a torch Dataset (or any sequence) of token-id tensors
    or dicts with ``input_ids``/``labels``, or a list of texts (UTF-8 bytes). Longer items are cut into
    consecutive pieces; pieces of one token (no next-token target) are dropped. -> (pieces, units, sha256)."""
    try:
        n = len(dataset)
    except TypeError:
        raise InputError(f"{what} must support len() and indexing (a torch Dataset or a list), got "
                         f"{type(dataset).__name__}") from None
    if isinstance(dataset, (str, bytes)):
        raise InputError(f"{what} must be a list of texts or a dataset of token-id tensors, not one {type(dataset).__name__}")
    pieces: list[tuple[np.ndarray, np.ndarray | None]] = []
    units_seen = set()
    digest = hashlib.sha256()
    for i in range(n):
        ids, labels, units = _as_ids(dataset[i], f"{what}[{i}]", vocab_size)
        units_seen.add(units)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"{what}[{i}] holds ids in [{ids.min()}, {ids.max()}], outside the model's "
                             f"vocabulary [0, {vocab_size})")
        for start in range(0, ids.size, max_length):
            piece = ids[start:start + max_length]
            if piece.size < 2:
                continue
            lab = None if labels is None else labels[start:start + max_length]
            pieces.append((piece, lab))
            digest.update(piece.tobytes())
            digest.update(b"\0" if lab is None else lab.tobytes())
    if not pieces:
        raise InputError(f"{what} is empty: no item holds two or more tokens")
    units = "bytes" if units_seen == {"bytes"} else "tokens"
    return pieces, units, digest.hexdigest()


def collate(pieces: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> Batch:
    """Right-pad to the longest piece: ids with 0, labels with IGNORE_INDEX (padding gets no loss, and causal
    attention keeps real tokens from seeing it). -> ids (B, T), labels (B, T) or None when nothing is padded."""
    T = max(p[0].size for p in pieces)
    if all(p[0].size == T and p[1] is None for p in pieces):
        return np.stack([p[0] for p in pieces]), None
    ids = np.zeros((len(pieces), T), dtype=np.int64)
    labels = np.full((len(pieces), T), IGNORE_INDEX, dtype=np.int64)
    for row, (x, lab) in enumerate(pieces):
        ids[row, :x.size] = x
        labels[row, :x.size] = x if lab is None else lab
    return ids, labels


class EpochSampler:
    """Batches from a list of pieces in a fresh seeded shuffle each epoch; the state holds the order, the
    position and the Generator, so a resumed run draws the same batches."""

    def __init__(self, pieces, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be a positive integer")
        self.pieces = pieces
        self.batch_size = batch_size
        self.rng = new_generator(seed)
        self.order = self.rng.permutation(len(pieces)).tolist()
        self.pos = 0
        self.epoch = 0

    def next_batch(self) -> Batch:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.pos == len(self.order):  # next epoch, newly shuffled
                self.order = self.rng.permutation(len(self.pieces)).tolist()
                self.pos, self.epoch = 0, self.epoch + 1
            chosen.append(self.pieces[self.order[self.pos]])
            self.pos += 1
        return collate(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "epochs", "rng": self.rng.bit_generator.state, "order": list(self.order),
                "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "epochs" or len(state["order"]) != len(self.pieces):
            raise InputError("the saved sampler state does not fit this dataset")
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos, self.epoch = list(state["order"]), int(state["pos"]), int(state["epoch"])


# --- the trainer ----------------------------------------------------------------------------------------
class LongContextTrainer:
    """Trains a reversible LM (or any model with ``forward(ids, labels) -> .loss`` and a ``.config``).

    ``max_length``: the longest sequence trained on (default and upper bound: the model's max_seq_len).
    ``max_grad_norm``: gradient clipping, on by default; None turns it off (the norm is still logged).
    ``precision``: auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16. ``eval_every``: steps between
    held-out evaluations (also at the end). ``out_dir``: where the log, checkpoints and plot go; None
    keeps everything in memory (``trainer.history``). ``checkpoint_every``: steps between checkpoints (one
    is always written at the end when there is an ``out_dir``).
    ``attention_window_size``: sliding-window attention over the last N tokens in every layer (the model's
    ``set_attention_window``; None keeps the model's own). ``use_linear_attention_approximation`` is a seed
    README keyword for a system not built: setting it raises instead of being ignored.
    """

    def __init__(self, model: torch.nn.Module, max_length: int | None = None, gradient_accumulation_steps: int = 1,
                 lr: float = 3e-4, warmup_steps: int | None = None, min_lr_ratio: float = 0.1,
                 max_grad_norm: float | None = 1.0, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 precision: str = "auto", eval_every: int | None = None, out_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, device: str | torch.device | None = None, seed: int = 0,
                 progress: bool = True, plot: bool = True, callbacks: Iterable[Callable] = (),
                 attention_window_size: int | None = None, use_linear_attention_approximation: bool = False):
        if use_linear_attention_approximation:
            raise ConfigError("use_linear_attention_approximation=True: linear attention is not implemented in "
                              "the torch backend yet (attention is exact); leave it False")
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError("the model has no .config: pass a model built by revnet_core.build or revnet_torch")
        if attention_window_size is not None:
            if not hasattr(model, "set_attention_window"):
                raise ConfigError(f"attention_window_size={attention_window_size}: {type(model).__name__} has no "
                                  "set_attention_window; pass a revnet_torch ReversibleTransformer")
            model.set_attention_window(attention_window_size)
            config = model.config
        self.model = model
        self.config = config
        self.max_length = config.max_seq_len if max_length is None else max_length
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length={max_length!r} must be an integer >= 2")
        if self.max_length > config.max_seq_len:
            raise ConfigError(f"max_length={self.max_length} exceeds the model's max_seq_len={config.max_seq_len}; "
                              "build the model with a larger max_seq_len")
        for name, value in (("gradient_accumulation_steps", gradient_accumulation_steps),):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not lr > 0:
            raise ConfigError(f"lr={lr!r} must be > 0")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ConfigError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={max_grad_norm!r} must be > 0 (or None to turn clipping off)")
        if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
            raise ConfigError(f"eval_every={eval_every!r} must be a positive integer (or None: only at the end)")
        self.accum = gradient_accumulation_steps
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.max_grad_norm = max_grad_norm
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.device = pick_device(device)
        self.precision = precision
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.eval_every = eval_every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.progress = progress
        self.plot = plot
        self.callbacks = list(callbacks)
        self.memory_efficient_optimizer = False
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._stop = False
        self._log = None
        self.model.to(self.device)

    # --- public API ------------------------------------------------------------------------------------
    def train(self, train_dataset: Any, eval_dataset: Any = None, num_epochs: int = 1, batch_size: int = 1,
              memory_efficient_optimizer: bool = False, resume: str | os.PathLike | None = None) -> dict[str, Any]:
        """Train for ``num_epochs`` passes over ``train_dataset`` (a torch Dataset of token-id tensors, dicts
        with ``input_ids``/``labels``, or a list of texts, byte-tokenised); evaluate on ``eval_dataset``.

        Items longer than ``max_length`` are cut into consecutive pieces; batches are right-padded with no
        loss on the padding. ``memory_efficient_optimizer=True`` updates one parameter at a time
        (``foreach=False``): the optimizer step then needs no temporaries the size of all parameters, at
        some speed cost. Returns the summary of ``fit``.
        """
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
            raise ConfigError(f"num_epochs={num_epochs!r} must be a positive integer")
        vocab = self.config.vocab_size
        pieces, units, sha = dataset_sequences(train_dataset, self.max_length, vocab, "train_dataset")
        sampler = EpochSampler(pieces, batch_size, self.seed)
        evals: list[Batch] = []
        if eval_dataset is not None:
            eval_pieces, _, _ = dataset_sequences(eval_dataset, self.max_length, vocab, "eval_dataset")
            evals = [collate(eval_pieces[i:i + batch_size]) for i in range(0, len(eval_pieces), batch_size)]
        seq_len = max(p[0].size for p in pieces)
        identity = {"task": "dataset", "source": "user-dataset", "sha256": sha, "pieces": len(pieces)}
        data = TrainingData(sampler, evals, identity, units, "dataset", seq_len, batch_size)
        steps = math.ceil(num_epochs * len(pieces) / (batch_size * self.accum))
        self.memory_efficient_optimizer = bool(memory_efficient_optimizer)
        return self.fit(data, steps=steps, resume=resume)

    def request_stop(self) -> None:
        """Stop at the end of the current step (a checkpoint is saved there when there is an ``out_dir``)."""
        self._stop = True

    def fit(self, data: TrainingData, steps: int, resume: str | os.PathLike | None = None) -> dict[str, Any]:
        """Run optimizer steps up to ``steps`` in all on ``data`` (see ``revnet_core.data.lm_data`` and
        ``revnet_core.tasks.passkey_data``); ``resume``: a checkpoint file or run folder to continue from.
        Returns a summary: steps done, last loss, the last evaluation, paths written, whether it stopped early."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be a positive integer")
        if data.seq_len > self.max_length:
            raise InputError(f"seq_len={data.seq_len} exceeds max_length={self.max_length} (the model's "
                             f"max_seq_len is {self.config.max_seq_len})")
        self._stop = False
        self.step = 0  # a new fit starts a new schedule from the model's current weights
        self.history = []
        self._setup_optimizer(steps)
        run_settings = self._run_settings(data)
        if resume is not None:
            self._resume(resume, data, run_settings)
        elif self.out_dir is not None and (self.out_dir / ckpt.FILENAME).exists():
            raise ConfigError(f"{os.fspath(self.out_dir)!r} already holds a checkpoint; resume it (--resume) or "
                              "choose another output folder")
        start = self.step
        if start >= steps:
            raise ConfigError(f"the checkpoint is at step {start}, already at or past steps={steps}; "
                              "ask for more steps to continue")
        self._open_log(data, steps, start)
        last_eval: dict[str, Any] = {}
        bar = self._progress_bar(steps, start)
        peak = 0
        try:
            with self._sigint_stops():
                for step in range(start + 1, steps + 1):
                    record = self._train_step(data, step)
                    peak = max(peak, record["mem_bytes"])
                    if self.eval_every and step % self.eval_every == 0 or step == steps:
                        if data.eval_batches:
                            last_eval = {"kind": "eval", "step": step, **self.evaluate(data)}
                            self._emit(last_eval)
                            if self.progress:
                                bar.write(_eval_line(last_eval), file=sys.stderr)
                    self.step = step
                    bar.update(1)
                    bar.set_postfix_str(f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
                                        f"peak {peak / 2**20:,.0f} MiB", refresh=False)
                    for callback in self.callbacks:
                        callback(self, record)
                    if self.checkpoint_every and step % self.checkpoint_every == 0 and step != steps:
                        self.save(data, run_settings)
                    if self._stop:
                        break
        finally:
            bar.close()
            self._close_log()
        stopped = self.step < steps
        paths: dict[str, str] = {}
        if self.out_dir is not None:
            paths["checkpoint"] = os.fspath(self.save(data, run_settings))
            paths["log"] = os.fspath(self.out_dir / LOG_NAME)
            if self.plot:
                paths["plot"] = os.fspath(plot_log(self.out_dir / LOG_NAME, self.out_dir / PLOT_NAME))
        train_records = [r for r in self.history if r.get("kind") == "train"]
        summary = {
            "step": self.step, "steps": steps, "stopped": stopped,
            "loss": train_records[-1]["loss"] if train_records else None,
            "eval": {k: v for k, v in last_eval.items() if k not in ("kind",)},
            "peak_mem_bytes": peak, "mem_kind": self._mem_kind(), "paths": paths,
            "device": _device_name(self.device), "precision": "bf16" if self.amp_dtype else "fp32",
            "data": data.identity,
            "policies": _last_policies(self.model),
        }
        if self.out_dir is not None:
            result = {**summary, "environment": environment(self.device), "config": self.config.to_dict(),
                      "trainer": self.hyperparameters()}
            _write_json(self.out_dir / RESULT_NAME, result)
            paths["result"] = os.fspath(self.out_dir / RESULT_NAME)
        return summary

    @torch.no_grad()
    def evaluate(self, data: TrainingData) -> dict[str, float]:
        """Held-out loss (nats), bits per byte (or per token), and for labelled data the share of sequences
        whose every target is predicted right (``accuracy``) and of target tokens (``token_accuracy``)."""
        was_training = self.model.training
        self.model.eval()
        nats, count, exact, rows, right = 0.0, 0, 0, 0, 0
        try:
            for ids_np, labels_np in data.eval_batches:
                ids, labels = self._to_device(ids_np, labels_np)
                extra = self._hidden_kwargs() if labels is not None else {}
                with self._autocast():
                    out = self.model(ids, labels=labels, **extra)
                n = _target_count(ids, labels)
                nats += float(out.loss) * n
                count += n
                if labels is not None:
                    e, r, _ = self._answer_scores(ids, out, labels)
                    exact, right, rows = exact + e, right + r, rows + ids.shape[0]
        finally:
            self.model.train(was_training)
        loss = nats / max(1, count)
        result = {"eval_loss": loss, f"eval_bits_per_{'byte' if data.units == 'bytes' else 'token'}": bits(loss)}
        if rows:
            result["eval_accuracy"] = exact / rows
            result["eval_token_accuracy"] = right / max(1, count)
        return result

    def save(self, data: TrainingData, run_settings: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/checkpoint.pt`` atomically with everything ``fit(resume=...)`` needs."""
        if self.out_dir is None:
            raise ConfigError("no out_dir: the trainer has nowhere to write a checkpoint")
        state = {
            "model_class": type(self.model).__name__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "data": data.sampler.state_dict(),
            "step": self.step,
            "config": self._comparable_config(),
            "model_config": self.config.to_dict(),
            "run": run_settings or self._run_settings(data),
            "trainer": self.hyperparameters(),
        }
        return ckpt.save_checkpoint(self.out_dir / ckpt.FILENAME, state)

    def hyperparameters(self) -> dict[str, Any]:
        """The trainer's settings, as recorded in logs and checkpoints."""
        return {"max_length": self.max_length, "gradient_accumulation_steps": self.accum, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "max_grad_norm": self.max_grad_norm, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "precision": self.precision, "seed": self.seed,
                "memory_efficient_optimizer": self.memory_efficient_optimizer}

    # --- internals -------------------------------------------------------------------------------------
    def _setup_optimizer(self, steps: int) -> None:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        options: dict[str, Any] = {}
        if self.memory_efficient_optimizer:
            options["foreach"] = False
        elif self.device.type == "cuda":
            options["fused"] = True
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, **options)
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, steps // 10)
        self._warmup = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(warmup, steps, self.min_lr_ratio))

    def _run_settings(self, data: TrainingData) -> dict[str, Any]:
        # What must match for a resume to continue the same run (the total number of steps may change).
        return {"data": data.identity, "seq_len": data.seq_len, "batch_size": data.batch_size,
                "gradient_accumulation_steps": self.accum, "lr": self.lr, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "max_grad_norm": self.max_grad_norm,
                "weight_decay": self.weight_decay, "betas": list(self.betas)}

    def _comparable_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.to_dict().items() if k not in _RESUMABLE_CONFIG_FIELDS}

    def _resume(self, path, data: TrainingData, run_settings: dict[str, Any]) -> None:
        state = ckpt.load_checkpoint(path, map_location=self.device)
        where = ckpt.resolve(path)
        ckpt.check_compatible(state, backend=ckpt.BACKEND, model_class=type(self.model).__name__,
                              config=self._comparable_config(), run=run_settings, path=where)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            data.sampler.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {os.fspath(where)!r} does not fit this run: {exc}") from None
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.out_dir is None:
            self.out_dir = where.parent

    def _train_step(self, data: TrainingData, step: int) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self.model.train()
        total_nats = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = tokens = 0
        for _ in range(self.accum):
            ids, labels = self._to_device(*data.sampler.next_batch())
            n = _target_count(ids, labels)
            with self._autocast():
                loss = self.model(ids, labels=labels).loss
            # Summed nats, scaled after accumulation: the step's loss is the mean over all its target tokens.
            (loss * n).backward()
            total_nats += loss.detach().double() * n
            targets += n
            tokens += ids.numel()
        scale = 1.0 / max(1, targets)
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            p.grad.mul_(scale)
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_value = float(total_nats) * scale
        if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
            raise TrainingError(f"non-finite loss ({loss_value}) or gradient norm ({float(grad_norm)}) at step "
                                f"{step}; lower the learning rate (lr={self.lr}) or use fp32 precision")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens, "tokens_per_s": tokens / elapsed, "step_s": elapsed,
                  "mem_bytes": self._memory_bytes()}
        self._emit(record)
        return record

    def _hidden_kwargs(self) -> dict[str, Any]:
        # Scoring answers needs the final hidden states; models that keep them only on request say so.
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return {"return_hidden": True} if "return_hidden" in params else {}

    def _answer_scores(self, ids: torch.Tensor, out, labels: torch.Tensor) -> tuple[int, int, int]:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]  # position t predicts label t+1, as in the loss
        mask = targets != IGNORE_INDEX
        head = getattr(self.model, "head", None)
        with self._autocast():
            if head is not None and out.last_hidden_state is not None:
                # Only the answer positions go through the LM head: no (B, T, V) logits at long context.
                predicted = head(out.last_hidden_state[mask]).argmax(-1)
            else:
                logits = out.logits if out.logits is not None else self.model(ids, return_logits=True).logits
                predicted = logits[mask].argmax(-1)
        correct = torch.zeros_like(mask)
        correct[mask] = predicted == targets[mask]
        whole = ((correct | ~mask).all(dim=1) & mask.any(dim=1)).sum()
        return int(whole), int(correct.sum()), int(mask.sum())

    def _to_device(self, ids: np.ndarray, labels: np.ndarray | None):
        ids_t = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device, non_blocking=True)
        labels_t = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels)).to(self.device)
        return ids_t, labels_t

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _cpu_rss_bytes()

    def _mem_kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss"

    def _progress_bar(self, steps: int, start: int):
        from tqdm.auto import tqdm

        return tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    disable=not self.progress, dynamic_ncols=True, mininterval=0.5)

    @contextlib.contextmanager
    def _sigint_stops(self):
        """First Ctrl-C: finish the step, checkpoint, return. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # --- log ------------------------------------------------------------------------------------------
    def _open_log(self, data: TrainingData, steps: int, start: int) -> None:
        header = {"kind": "run" if start == 0 else "resume", "step": start, "steps": steps,
                  "config": self.config.to_dict(), "trainer": self.hyperparameters(), "warmup": self._warmup,
                  "data": data.identity, "environment": environment(self.device), "mem_kind": self._mem_kind()}
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / LOG_NAME
            if start > 0 and path.exists():
                _truncate_log(path, start)
            self._log = open(path, "a" if start > 0 else "w")
        self._emit(header)

    def _emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _target_count(ids: torch.Tensor, labels: torch.Tensor | None) -> int:
    if labels is None:
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _eval_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}: eval loss {record['eval_loss']:.4f}"]
    for key in ("eval_bits_per_byte", "eval_bits_per_token"):
        if key in record:
            parts.append(f"{key[5:].replace('_', ' ')} {record[key]:.4f}")
    if "eval_accuracy" in record:
        parts.append(f"accuracy {record['eval_accuracy']:.3f}")
    return ", ".join(parts)


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step``: a run that died after its last checkpoint logged steps it will redo."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """A PNG of training loss (and held-out loss) and memory over steps from a ``log.jsonl``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    headers = [r for r in records if r.get("kind") in ("run", "resume")]
    mem_kind = headers[-1].get("mem_kind", "") if headers else ""
    fig = Figure(figsize=(9, 6.5), layout="constrained")  # no pyplot: leaves the user's backend alone
    FigureCanvasAgg(fig)
    ax_loss, ax_mem = fig.subplots(2, 1, sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_mem.plot([r["step"] for r in train], [r["mem_bytes"] / 2**20 for r in train], lw=1)
    ax_mem.set_ylabel("peak allocated, MiB" if mem_kind.startswith("cuda") else "process RSS, MiB")
    ax_mem.set_xlabel("step")
    ax_mem.grid(alpha=0.3)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    return png_path


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and device, recorded with every result."""
    device = device or pick_device()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": _device_name(device), "platform": platform.platform(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


def _last_policies(model) -> list[str]:
    """The per-layer policies of the last forward: an attached scheduler's plan (it restores the model's
    defaults after each forward), else the model's own."""
    scheduler = getattr(model, "scheduler", None)  # set by model.set_scheduler (revnet_torch.scheduler)
    plan = scheduler.plan if scheduler is not None else None
    return list(plan.policies) if plan is not None else list(getattr(model, "policies", []))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# --- the CLI's entry point ----------------------------------------------------------------------------
def run(settings, data: TrainingData) -> dict[str, Any]:
    """Build the model ``settings`` describe (``revnet_core.cli.TrainSettings``) and train it on ``data``;
    every backend's ``trainer`` module has this function, so ``revnet train --backend X`` finds it."""
    import revnet_core

    torch.manual_seed(settings.seed)
    model = revnet_core.build(settings.backend, config=settings.model_config())
    if settings.policies:
        model.set_policy(settings.policies)
    if settings.scheduler:
        from .scheduler import MemoryScheduler

        model.set_scheduler(MemoryScheduler(model=model, strategy=settings.scheduler))
    trainer = LongContextTrainer(
        model, max_length=settings.seq_len, gradient_accumulation_steps=settings.grad_accum, lr=settings.lr,
        warmup_steps=settings.warmup, min_lr_ratio=settings.min_lr_ratio, max_grad_norm=settings.clip_norm,
        weight_decay=settings.weight_decay, precision=settings.precision, eval_every=settings.eval_every,
        out_dir=settings.out, checkpoint_every=settings.checkpoint_every, device=settings.device,
        seed=settings.seed, progress=settings.progress, plot=settings.plot,
    )
    try:
        summary = trainer.fit(data, steps=settings.steps, resume=settings.resume)
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory on {_device_name(trainer.device)}: {str(exc).splitlines()[0]}; "
                            "lower --batch-size or --seq-len, or raise --grad-accum") from None
    summary["params"] = sum(p.numel() for p in model.parameters())
    return summary
