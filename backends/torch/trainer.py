"""LongContextTrainer: the training loop for reversible LMs, and ``run`` for ``revnet train``.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; the loss is the token mean over the whole
step. AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay, gradient clipping
on by default (deep reversible stacks diverge more readily without it), bf16 autocast on GPU, fp32 on CPU.
Held-out evaluation reports bits per byte (mean nats / ln 2) for byte-level data. With an ``out_dir`` every
step goes to ``log.jsonl``, checkpoints to ``checkpoint.pt`` (see ``checkpoint.py``) and a plot of loss and
memory to ``train.png``. Ctrl-C stops at the end of the current step and saves a checkpoint to resume from;
a second one abandons the step at once and saves the last complete one; Ctrl-C during a save is held until
the file is complete. ``precision="fp16"`` trains under fp16 autocast (the streams stay fp32) with a dynamic
loss scaler whose overflow steps are skipped, counted in the log, and whose state is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from revnet_core import resume, runlog
from revnet_core.data import IGNORE_INDEX, TrainingData, dataset_data, eval_record
from revnet_core.errors import ConfigError, InputError, TrainingError
from revnet_core.memory import host_rss_bytes
from revnet_core.schedule import cosine_schedule, warmup_steps
from revnet_core.settings import PRECISIONS

from . import checkpoint as ckpt
from .optim import OptimizerInBackward
from .optim8bit import AdamW8bit

OPTIMIZERS = ("adamw", "adamw8bit")  # LongContextTrainer(optimizer=...): fp32 moments, or 8-bit block-wise ones

read_log = runlog.read_log  # still importable from here: tests/torch/test_checkpoint.py reads run logs with it
# Config fields that change memory or speed but not the function the model computes: a run may resume with
# a different value (e.g. a smaller GPU needing another policy).


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
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# Overflow steps in a row after which fp16 training is hopeless (the scale has fallen by 2**30).
MAX_CONSECUTIVE_OVERFLOWS = 30


def _to_numpy(value: Any) -> Any:
    """A dataset item's tensor as numpy, whatever its device; bfloat16 has no numpy twin, and only the dtype's
    kind (integer or not) is checked, so floats become float32."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


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
    ``set_attention_window``; None keeps the model's own). ``use_linear_attention_approximation=True``: every
    layer's attention becomes Rational-Fourier attention (the model's ``set_attention_kind("rf")``, gaussian
    kernel, its weights kept; a model already RF keeps its options); with a window too, the windowed hybrid:
    exact softmax over the last ``attention_window_size`` tokens plus the RF estimate of exp(q.k) for every
    token further back, one normalisation (``revnet_torch.rf_hybrid``).
    ``optimizer_in_backward``: each parameter is updated inside the backward as soon as its gradient is
    complete (``revnet_torch.optim.OptimizerInBackward``), so the whole model's gradients never coexist;
    clipping then uses the previous step's gradient norm (the first step is unclipped). Not with fp16.
    ``optimizer``: "adamw" (fp32 moments, 8 bytes a parameter) or "adamw8bit" (block-wise 8-bit moments,
    ``revnet_torch.optim8bit.AdamW8bit``: about 2 bytes a parameter), after the backward or inside it.
    """

    def __init__(self, model: torch.nn.Module, max_length: int | None = None, gradient_accumulation_steps: int = 1,
                 lr: float = 3e-4, warmup_steps: int | None = None, min_lr_ratio: float = 0.1,
                 max_grad_norm: float | None = 1.0, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 precision: str = "auto", eval_every: int | None = None, out_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, device: str | torch.device | None = None, seed: int = 0,
                 progress: bool = True, plot: bool = True, callbacks: Iterable[Callable] = (),
                 attention_window_size: int | None = None, use_linear_attention_approximation: bool = False,
                 drift_every: int | None = 100, optimizer_in_backward: bool = False, optimizer: str = "adamw"):
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError("the model has no .config: pass a model built by revnet_core.build or revnet_torch")
        if use_linear_attention_approximation and getattr(config, "attention_kind", "softmax") != "rf":
            if not hasattr(model, "set_attention_kind"):
                raise ConfigError(f"use_linear_attention_approximation=True: {type(model).__name__} has no "
                                  "set_attention_kind; pass a revnet_torch ReversibleTransformer")
            model.set_attention_kind("rf")
            config = model.config
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
        self.loss_scale: str | float = "dynamic"  # ReversibleAMPTrainer's keyword; a number: the initial scale
        self.scaler: torch.amp.GradScaler | None = None  # made per fit when amp_dtype is fp16
        self.overflow_steps = 0
        self._overflow_run = 0
        self.announce: Callable[[str], None] | None = None  # where eval and resume lines go without a bar
        self._snapshot: tuple[dict[str, Any], dict[str, Any]] | None = None  # RNG and sampler at step start
        self.eval_every = eval_every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.progress = progress
        self.plot = plot
        self.callbacks = list(callbacks)
        # The charter's fallback for unstable layers: every ``drift_every`` training forwards the rebuilt
        # bottom input of each reverse segment is compared with the truth; past the threshold those layers
        # switch to checkpoint by themselves, and the event goes to the log (None: no monitor).
        self.drift = None
        if drift_every and hasattr(model, "layers") and hasattr(model, "policies"):
            from .drift import DriftMonitor

            self.drift = DriftMonitor(model, every=drift_every)
        self.memory_efficient_optimizer = False
        self.optimizer_in_backward = bool(optimizer_in_backward)
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={optimizer!r} is not one of {list(OPTIMIZERS)}")
        self.optimizer_name = optimizer
        if self.optimizer_in_backward and self.amp_dtype == torch.float16:
            raise ConfigError("optimizer_in_backward=True with fp16: the loss scaler must see every gradient "
                              "before any update; use bf16 or fp32")
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._stop = False
        self._log = runlog.RunLog(self.history)
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
        data = dataset_data(train_dataset, eval_dataset, self.max_length, self.config.vocab_size, batch_size,
                            self.seed, _to_numpy)
        steps = math.ceil(num_epochs * data.identity["pieces"] / (batch_size * self.accum))
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
        data_vocab = data.identity.get("vocab_size", 0)  # a token file's header says its vocabulary
        if data_vocab > self.config.vocab_size:
            raise InputError(f"the data's vocabulary ({data_vocab}, from {data.identity.get('source')}) exceeds the "
                             f"model's vocab_size={self.config.vocab_size}; build the model with vocab_size >= "
                             f"{data_vocab}")
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
        if resume is not None:
            self._say(f"resumed from step {start} of {os.fspath(ckpt.resolve(resume))}", None)
        self._open_log(data, steps, start)
        last_eval: dict[str, Any] = {}
        bar = self._progress_bar(steps, start)
        peak = 0
        try:
            with self._sigint_stops():
                try:
                    for step in range(start + 1, steps + 1):
                        record = self._train_step(data, step)
                        peak = max(peak, record["mem_bytes"])
                        if self.eval_every and step % self.eval_every == 0 or step == steps:
                            if data.eval_batches:
                                last_eval = {"kind": "eval", "step": step, **self.evaluate(data)}
                                self._emit(last_eval)
                                self._say(runlog.eval_line(last_eval), bar)
                        bar.update(1)
                        bar.set_postfix_str(f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
                                            f"peak {peak / 2**20:,.0f} MiB", refresh=False)
                        for callback in self.callbacks:
                            callback(self, record)
                        if self.checkpoint_every and step % self.checkpoint_every == 0 and step != steps:
                            self.save(data, run_settings)
                        if self._stop:
                            break
                except KeyboardInterrupt:  # the second Ctrl-C: the step in flight is dropped, not the others
                    self.optimizer.zero_grad(set_to_none=True)
                    self._say(f"interrupted: saving step {self.step}", bar)
        finally:
            bar.close()
            self._close_log()
        stopped = self.step < steps
        paths: dict[str, str] = {}
        with runlog.sigint_noted() as noted:
            if self.out_dir is not None:
                paths["checkpoint"] = os.fspath(self.save(data, run_settings))
                log = self.out_dir / runlog.LOG_NAME
                paths["log"] = os.fspath(log)
                if self.plot:
                    paths["plot"] = os.fspath(runlog.plot_log(log, self.out_dir / runlog.PLOT_NAME))
            summary = self._summary(steps, stopped, start if resume else None, last_eval, peak, paths, data)
        summary["interrupted"] = bool(noted)  # Ctrl-C while the files were written: they were finished first
        return summary

    def _summary(self, steps: int, stopped: bool, resumed_from: int | None, last_eval: dict[str, Any], peak: int,
                 paths: dict[str, str], data: TrainingData) -> dict[str, Any]:
        train_records = [r for r in self.history if r.get("kind") == "train"]
        summary = {
            "step": self.step, "steps": steps, "stopped": stopped, "resumed_from": resumed_from,
            "loss": train_records[-1]["loss"] if train_records else None,
            "eval": {k: v for k, v in last_eval.items() if k not in ("kind",)},
            "overflow_steps": self.overflow_steps,
            "peak_mem_bytes": peak, "mem_kind": self._mem_kind(), "paths": paths,
            "device": _device_name(self.device), "precision": _precision_name(self.amp_dtype),
            "data": data.identity,
            "policies": _last_policies(self.model),
        }
        if self.out_dir is not None:
            result = {**summary, "environment": environment(self.device), "config": self.config.to_dict(),
                      "trainer": self.hyperparameters()}
            runlog.write_json(self.out_dir / runlog.RESULT_NAME, result)
            paths["result"] = os.fspath(self.out_dir / runlog.RESULT_NAME)
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
        return eval_record(nats, count, data.units, exact, right, rows)

    def save(self, data: TrainingData, run_settings: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/checkpoint.pt`` atomically with everything ``fit(resume=...)`` needs."""
        if self.out_dir is None:
            raise ConfigError("no out_dir: the trainer has nowhere to write a checkpoint")
        # Mid-step (a second Ctrl-C), the RNG and sampler have moved on: save them as the step found them.
        rng, sampler = self._snapshot or (ckpt.rng_state(), data.sampler.state_dict())
        state = {
            "model_class": self.model_class_name,
            **self._training_states(),  # "model" and "optimizer"
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": sampler,
            "step": self.step,
            "config": self._comparable_config(),
            "model_config": self.config.to_dict(),
            "run": run_settings or self._run_settings(data),
            "trainer": self.hyperparameters(),
        }
        if self.scaler is not None:
            state["amp"] = {"scaler": self.scaler.state_dict(), "overflow_steps": self.overflow_steps}
        return ckpt.save_checkpoint(self.out_dir / ckpt.FILENAME, state)

    def hyperparameters(self) -> dict[str, Any]:
        """The trainer's settings, as recorded in logs and checkpoints."""
        return {"max_length": self.max_length, "gradient_accumulation_steps": self.accum, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "max_grad_norm": self.max_grad_norm, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "precision": self.precision, "seed": self.seed,
                "memory_efficient_optimizer": self.memory_efficient_optimizer,
                "optimizer_in_backward": self.optimizer_in_backward, "optimizer": self.optimizer_name}

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
        if isinstance(self.optimizer, OptimizerInBackward):
            self.optimizer.remove_hooks()  # a new fit's optimizer replaces it; the old one must stop stepping
        inner = torch.optim.AdamW
        if self.optimizer_name == "adamw8bit":
            inner, options = AdamW8bit, {}  # one code path on every device: no foreach/fused variants
        if self.optimizer_in_backward:
            self.optimizer = OptimizerInBackward(groups, inner, max_grad_norm=self.max_grad_norm,
                                                 lr=self.lr, betas=self.betas, **options)
        else:
            self.optimizer = inner(groups, lr=self.lr, betas=self.betas, **options)
        self._warmup = warmup_steps(steps, self.warmup_steps)
        schedule = cosine_schedule(self._warmup, steps, self.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.overflow_steps = self._overflow_run = 0
        self.scaler = None
        if self.amp_dtype == torch.float16:
            init = {} if self.loss_scale == "dynamic" else {"init_scale": float(self.loss_scale)}
            self.scaler = torch.amp.GradScaler(self.device.type, **init)

    def _run_settings(self, data: TrainingData) -> dict[str, Any]:
        return resume.run_settings(data, self)

    def _comparable_config(self) -> dict[str, Any]:
        return resume.comparable_config(self.config.to_dict())

    def _resume(self, path, data: TrainingData, run_settings: dict[str, Any]) -> None:
        state = ckpt.load_checkpoint(path, map_location=self.device)
        where = ckpt.resolve(path)
        ckpt.check_compatible(state, backend=ckpt.BACKEND, model_class=self.model_class_name,
                              config=self._comparable_config(), run=run_settings, path=where)
        saved_optimizer = state.get("trainer", {}).get("optimizer", "adamw")  # files before the option: fp32
        if saved_optimizer != self.optimizer_name:
            raise ckpt.CheckpointError(f"checkpoint {os.fspath(where)!r} holds {saved_optimizer!r} optimizer state; "
                                       f"this trainer runs optimizer={self.optimizer_name!r}: resume with the same one")
        try:
            self._load_training_states(state["model"], state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            data.sampler.load_state_dict(state["data"])
            if self.scaler is not None and "amp" in state:
                self.scaler.load_state_dict(state["amp"]["scaler"])
                self.overflow_steps = int(state["amp"]["overflow_steps"])
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
        self._snapshot = (ckpt.rng_state(), data.sampler.state_dict())
        self.model.train()
        total_nats = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = tokens = 0
        unit = 0  # fp16: gradients in units of the first micro-batch's targets, so the scaled loss stays small
        fused = isinstance(self.optimizer, OptimizerInBackward)
        if fused:
            self.optimizer.reset_peak()
        for micro in range(self.accum):
            ids, labels = self._to_device(*data.sampler.next_batch())
            n = _target_count(ids, labels)
            with self._autocast():
                loss = self._micro_forward(ids, labels, last=micro == self.accum - 1)
            # Summed nats, scaled after accumulation: the step's loss is the mean over all its target tokens.
            if fused and micro == self.accum - 1:
                # The updates happen in this backward, scaled by the step's target count as below; a Ctrl-C
                # waits for its end, since a half-updated model could be neither resumed nor redone.
                self.optimizer.arm(grad_scale=1.0 / max(1, targets + n))
                with ckpt.deferred_sigint():
                    (loss * n).backward()
            elif self.scaler is None:
                (loss * n).backward()
            else:
                unit = unit or n
                self.scaler.scale(loss * (n / max(1, unit))).backward()
            total_nats += loss.detach().double() * n
            targets += n
            tokens += ids.numel()
        if fused:
            return self._finish_fused_step(step, t0, total_nats, targets, tokens)
        total_nats, targets = self._step_totals(total_nats, targets, step)
        scale = (unit or 1) / max(1, targets) if self.scaler is not None else 1.0 / max(1, targets)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # notes an overflow; scaler.step then skips the update
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            p.grad.mul_(scale)
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_value = float(total_nats) / max(1, targets)  # the mean over target tokens (not the fp16 unit)
        finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
        if not finite and (self.scaler is None or self._overflow_run >= MAX_CONSECUTIVE_OVERFLOWS):
            raise TrainingError(f"non-finite loss ({loss_value}) or gradient norm ({float(grad_norm)}) at step "
                                f"{step}; lower the learning rate (lr={self.lr}) or use fp32 precision")
        lr = self.optimizer.param_groups[0]["lr"]
        with ckpt.deferred_sigint():  # an update half applied could be neither resumed nor redone
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped if unscale_ found an inf or NaN
                self.scaler.update()
                self._overflow_run = 0 if finite else self._overflow_run + 1
                self.overflow_steps += not finite
            with warnings.catch_warnings():  # a skipped first step makes torch warn of the order; the LR follows steps
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step, self._snapshot = step, None
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens, "tokens_per_s": tokens / elapsed, "step_s": elapsed,
                  "mem_bytes": self._memory_bytes()}
        if self.scaler is not None:
            record.update(loss_scale=self.scaler.get_scale(), overflow=not finite, overflow_steps=self.overflow_steps)
        return self._emit_step(record)

    def _finish_fused_step(self, step: int, t0: float, total_nats: torch.Tensor, targets: int,
                           tokens: int) -> dict[str, Any]:
        """The end of a step whose updates ran in the backward: norm, LR schedule, the record."""
        grad_norm = self.optimizer.finish()
        loss_value = float(total_nats) / max(1, targets)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step} "
                                f"(already applied: the updates run in the backward); lower the learning rate "
                                f"(lr={self.lr}) or use fp32 precision")
        lr = self.optimizer.param_groups[0]["lr"]
        with ckpt.deferred_sigint():
            self.optimizer.step()  # checks that the backward consumed every gradient
            self.scheduler.step()
            self.step, self._snapshot = step, None
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "clip_factor": self.optimizer.clip_factor, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                  "step_s": elapsed, "mem_bytes": self._memory_bytes(),
                  "peak_grad_bytes": self.optimizer.peak_grad_bytes}
        return self._emit_step(record)

    def _emit_step(self, record: dict[str, Any]) -> dict[str, Any]:
        self._emit(record)
        for event in self.drift.pop_events() if self.drift is not None else ():
            self._emit({"kind": "drift_fallback", "step": record["step"],
                        **{k: v for k, v in event.items() if k != "step"}, "forward": event["step"]})
        return record

    # Hooks a distributed trainer (revnet_torch.distributed_trainer) overrides: the forward of one micro-batch
    # (through its wrapper, syncing gradients on the last), the step's totals (over all ranks), and the
    # model's and optimizer's states a checkpoint holds (gathered from the shards).
    def _micro_forward(self, ids: torch.Tensor, labels: torch.Tensor | None, last: bool) -> torch.Tensor:
        return self.model(ids, labels=labels).loss

    def _step_totals(self, total_nats: torch.Tensor, targets: int, step: int) -> tuple[torch.Tensor, float]:
        return total_nats, targets

    @property
    def model_class_name(self) -> str:
        """The model's class as checkpoints record it (a sharded model's is the class it was built as)."""
        return type(self.model).__name__

    def _training_states(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _load_training_states(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

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
        return host_rss_bytes()

    def _say(self, line: str, bar) -> None:
        # Evaluation and resume lines: through ``announce`` when set (the CLI), else above the progress bar.
        if self.announce is not None:
            self.announce(line)
        elif self.progress and bar is not None:
            bar.write(line, file=sys.stderr)

    def _mem_kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss"

    def _progress_bar(self, steps: int, start: int):
        from tqdm.auto import tqdm

        return tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    disable=not self.progress, dynamic_ncols=True, mininterval=0.5)

    @contextlib.contextmanager
    def _sigint_stops(self):
        """First Ctrl-C: finish the step, checkpoint, return. A second one drops the step in flight (``fit``
        saves the last complete one)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            print("\nstopping after this step (Ctrl-C again to drop it and save the last complete one)", file=sys.stderr)

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
        self._log = runlog.RunLog(self.history)  # fit() starts a new history
        self._log.open(self.out_dir, header, start)

    def _emit(self, record: dict[str, Any]) -> None:
        self._log.emit(record)

    def _close_log(self) -> None:
        self._log.close()


class ReversibleAMPTrainer(LongContextTrainer):
    """``LongContextTrainer`` in mixed precision, as the seed README calls it: ``fp16=True`` trains under fp16
    autocast (fp32 streams and weights) with a ``torch.amp.GradScaler``; ``loss_scale``: "dynamic" or a
    number, the scaler's initial scale (it still backs off on overflow). Overflow steps are skipped and
    counted (``overflow_steps`` in the log and summary). ``fp16=False`` is bf16 autocast.
    ``keep_batchnorm_fp32``: norms run in fp32 under autocast, always; False is refused, not ignored."""

    def __init__(self, model: torch.nn.Module, fp16: bool = True, loss_scale: str | float = "dynamic",
                 keep_batchnorm_fp32: bool = True, **kwargs: Any):
        if not keep_batchnorm_fp32:
            raise ConfigError("keep_batchnorm_fp32=False: autocast runs every norm in fp32; leave it True")
        if loss_scale != "dynamic" and (isinstance(loss_scale, (bool, str)) or not 0 < loss_scale < math.inf):
            raise ConfigError(f"loss_scale={loss_scale!r} must be 'dynamic' or a finite number > 0")
        if "precision" in kwargs:
            raise ConfigError("ReversibleAMPTrainer takes fp16=True (fp16) or fp16=False (bf16), not precision=")
        super().__init__(model, precision="fp16" if fp16 else "bf16", **kwargs)
        self.loss_scale = loss_scale

    def train(self, train_loader: Any = None, num_steps: int | None = None, gradient_clip: float | None = None,
              **kwargs: Any) -> dict[str, Any]:
        """The README's ``train(train_loader=..., num_steps=..., gradient_clip=...)``: ``train_loader`` is a
        dataset as ``LongContextTrainer.train`` takes (or a DataLoader over one), ``num_steps`` optimizer steps
        in all (instead of ``num_epochs``), ``gradient_clip`` the clipping norm."""
        dataset = getattr(train_loader, "dataset", train_loader)
        if getattr(train_loader, "batch_size", None):  # a DataLoader: its dataset, in its batch size
            kwargs.setdefault("batch_size", train_loader.batch_size)
        if dataset is None:
            dataset = kwargs.pop("train_dataset")
        if gradient_clip is not None:
            if not gradient_clip > 0:
                raise ConfigError(f"gradient_clip={gradient_clip!r} must be > 0")
            self.max_grad_norm = gradient_clip
        if num_steps is None:
            return super().train(dataset, **kwargs)
        data = dataset_data(dataset, kwargs.pop("eval_dataset", None), self.max_length, self.config.vocab_size,
                            kwargs.pop("batch_size", 1), self.seed, _to_numpy)
        return self.fit(data, steps=num_steps, **kwargs)


def _target_count(ids: torch.Tensor, labels: torch.Tensor | None) -> int:
    if labels is None:
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _precision_name(amp_dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")


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
    from tqdm.auto import tqdm

    trainer.announce = lambda line: tqdm.write(line, file=sys.stderr)  # shown with --no-progress too
    try:
        summary = trainer.fit(data, steps=settings.steps, resume=settings.resume)
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory on {_device_name(trainer.device)}: {str(exc).splitlines()[0]}; "
                            "lower --batch-size or --seq-len, or raise --grad-accum") from None
    summary["params"] = sum(p.numel() for p in model.parameters())
    return summary
