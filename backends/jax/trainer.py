"""``JAXTrainer`` and ``run`` for ``revnet train --backend jax``: the torch trainer's loop as one jitted step.

One optimizer step = ``grad_accum`` micro-batches, scanned inside one ``jax.jit``-ed function; the step's loss
is the token mean over all of them (summed nats, scaled after). Gradients are clipped by global norm as
torch's ``clip_grad_norm_`` does (coefficient max_norm / (norm + 1e-6), at most 1), then ``optax.adamw``
(betas (0.9, 0.95), eps 1e-8, decoupled weight decay on matrices only) at unit learning rate, its update
scaled by the learning rate of the step: linear warmup then cosine (``revnet_core.schedule``, computed on the
host like every backend's). Dropout keys are ``fold_in(key(seed), micro-batch index)``, so a resumed run
draws the very masks the uninterrupted one did.

With an output folder: ``log.jsonl`` (``revnet_core.runlog``), ``train.png``, ``run.json``, and
``checkpoint.safetensors`` (``revnet_jax.checkpoint``: canonical weights plus AdamW's moments). Ctrl-C stops
at the end of the step in flight (an XLA computation is not abandoned half-way) and saves a checkpoint to
resume from; Ctrl-C while files are written is held until they are complete. Not built: fp16 (it needs a
loss scaler), ``--scheduler``; each is refused by name before the first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from revnet_core import resume, runlog
from revnet_core.data import IGNORE_INDEX, TrainingData, eval_record
from revnet_core.errors import ConfigError, InputError, TrainingError
from revnet_core.memory import host_rss_bytes
from revnet_core.schedule import cosine_schedule, warmup_steps

from . import checkpoint as ckpt
from .weights import from_canonical, to_canonical

# Besides the core's resumable fields: backend_options sections are kernel choices, and name their backend
# (a torch checkpoint has torch's).
RESUMABLE_TOO = ("backend_options",)
PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(device: str | None = None):
    """The jax device for ``device``: auto (the default backend's first), cpu, gpu / cuda, or cuda:N / gpu:N."""
    if device is None or device == "auto":
        return jax.devices()[0]
    kind, _, index = str(device).partition(":")
    platform_name = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind)
    if platform_name is None or (index and not index.isdigit()):
        raise ConfigError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N, gpu:N, tpu:N")
    try:
        devices = jax.devices(platform_name)
    except RuntimeError:
        raise ConfigError(f"device={device!r} was asked for but jax has no {platform_name} backend here") from None
    i = int(index or 0)
    if i >= len(devices):
        raise ConfigError(f"device={device!r}: jax sees {len(devices)} {platform_name} device(s)")
    return devices[i]


def compute_dtype_for(precision: str, device) -> str | None:
    """The matmul dtype for ``precision`` on ``device``: auto is bf16 on GPU and TPU, fp32 (None) on CPU."""
    if precision == "fp16":
        raise ConfigError("precision='fp16' is not built in the JAX trainer (it needs a loss scaler); use bf16 "
                          "(same memory, no scaler) or --backend torch")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if device.platform in ("gpu", "tpu") else None
    return "bfloat16" if precision == "bf16" else None


def with_compute_dtype(model, dtype: str | None):
    """A copy of ``model`` sharing its parameters whose matmuls run in ``dtype`` (None: the params' dtype)."""
    if model.compute_dtype == dtype:
        return model
    new = model.replace()
    new.compute_dtype = dtype
    new.static = dataclasses.replace(model.static, block=dataclasses.replace(model.static.block, compute_dtype=dtype))
    return new


def environment(device=None) -> dict[str, Any]:
    """Versions and device, recorded with every result."""
    import jaxlib
    import optax

    device = device or jax.devices()[0]
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "device": _device_name(device), "platform": platform.platform(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


def _device_name(device) -> str:
    if device.platform == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{device.platform}: {device.device_kind}"


def decay_mask(params):
    """True for the parameters AdamW decays: matrices (ndim >= 2 per layer, so ndim >= 3 when stacked)."""
    return {k: jax.tree.map(lambda p: p.ndim >= (3 if k == "layers" else 2), v) for k, v in params.items()}


def _targets(labels):
    """Next-token targets of a (B, T) batch, int32 (what its mean loss is over)."""
    return jnp.sum(labels[:, 1:] != IGNORE_INDEX, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the jitted step closes over besides the model (hashable: it keys the compiled step)."""

    seed: int
    max_grad_norm: float | None
    betas: tuple[float, float]
    weight_decay: float


def optimizer(hyper: StepSettings):
    """``optax.adamw`` at unit learning rate: the step scales the update by the schedule's value, so the LR
    is the host's float, as in every backend's trainer."""
    import optax

    return optax.adamw(1.0, b1=hyper.betas[0], b2=hyper.betas[1], eps=1e-8, weight_decay=hyper.weight_decay,
                       mask=decay_mask)


def train_step(model, hyper: StepSettings, params, opt_state, ids, labels, lr, first):
    """One optimizer step: ids, labels (accum, B, T) int32, lr float32 scalar, first int32 (the index of the
    step's first micro-batch: dropout keys) -> (params, opt_state, loss, grad_norm)."""
    import optax

    base = jax.random.key(hyper.seed)

    def micro(carry, xs):
        nats, grads, count = carry
        i, ids_i, labels_i = xs
        n = _targets(labels_i)
        loss, g = jax.value_and_grad(model.loss)(params, ids_i, labels_i, key=jax.random.fold_in(base, first + i))
        # Summed nats, scaled after: the step's loss is the mean over all its targets, as in torch.
        grads = jax.tree.map(lambda a, b: a + b * n.astype(b.dtype), grads, g)
        return (nats + loss.astype(jnp.float32) * n, grads, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros((), jnp.float32), zeros, jnp.zeros((), jnp.int32))
    (nats, grads, count), _ = jax.lax.scan(micro, init, (jnp.arange(ids.shape[0], dtype=jnp.int32), ids, labels))
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    norm = optax.tree.norm(grads)
    if hyper.max_grad_norm is not None:  # torch's clip_grad_norm_: max_norm / (norm + 1e-6), at most 1
        coef = jnp.minimum(hyper.max_grad_norm / (norm + 1e-6), 1.0)
        grads = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
    updates, opt_state = optimizer(hyper).update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + (lr * u).astype(p.dtype), params, updates)
    return params, opt_state, nats * scale, norm


def eval_sums(model, params, ids, labels, labelled: bool):
    """(summed nats, targets, sequences all right, targets right) of one held-out batch (B, T) int32; the
    last two only for ``labelled`` data (else 0)."""
    n = _targets(labels)
    loss = model.loss(params, ids, labels) * n
    if not labelled:
        return loss, n, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    targets = jnp.concatenate([labels[:, 1:], jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], 1)
    mask = targets != IGNORE_INDEX
    correct = (jnp.argmax(model.apply(params, ids), -1) == targets) & mask
    whole = jnp.sum(jnp.all(correct | ~mask, axis=1) & jnp.any(mask, axis=1), dtype=jnp.int32)
    return loss, n, whole, jnp.sum(correct, dtype=jnp.int32)


# --- the trainer ----------------------------------------------------------------------------------------
class JAXTrainer:
    """Trains a ``ReversibleTransformerJAX``: the torch ``LongContextTrainer``'s settings and files.

    ``max_grad_norm`` None turns clipping off (the norm is still logged); ``precision``: auto (bf16 matmuls
    on GPU/TPU, fp32 on CPU) | fp32 | bf16; ``eval_every``: steps between held-out evaluations (also at the
    end); ``out_dir``: log, checkpoints and plot (None keeps the records in ``trainer.history``);
    ``checkpoint_every``: steps between checkpoints (one is always written at the end with an ``out_dir``);
    ``attention_window_size``: sliding-window attention in every layer (the model's ``set_attention_window``);
    ``callbacks``: ``callback(trainer, record)`` after each step.
    """

    def __init__(self, model, max_length: int | None = None, gradient_accumulation_steps: int = 1,
                 lr: float = 3e-4, warmup_steps: int | None = None, min_lr_ratio: float = 0.1,
                 max_grad_norm: float | None = 1.0, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 precision: str = "auto", eval_every: int | None = None, out_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, device: str | None = None, seed: int = 0,
                 progress: bool = True, plot: bool = True, callbacks: Iterable[Callable] = (),
                 attention_window_size: int | None = None):
        if attention_window_size is not None:
            model.set_attention_window(attention_window_size)
        self.config = model.config
        self.max_length = self.config.max_seq_len if max_length is None else max_length
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length={max_length!r} must be an integer >= 2")
        if self.max_length > self.config.max_seq_len:
            raise ConfigError(f"max_length={self.max_length} exceeds the model's max_seq_len={self.config.max_seq_len}")
        value = gradient_accumulation_steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"gradient_accumulation_steps={value!r} must be a positive integer")
        if not lr > 0:
            raise ConfigError(f"lr={lr!r} must be > 0")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={max_grad_norm!r} must be > 0 (or None to turn clipping off)")
        bad_every = isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1
        if eval_every is not None and bad_every:
            raise ConfigError(f"eval_every={eval_every!r} must be a positive integer (or None: only at the end)")
        self.device = pick_device(device)
        self.precision = precision
        self._given = model  # gets the trained parameters too when the trainer runs a bf16 copy of it
        self.model = with_compute_dtype(model, compute_dtype_for(precision, self.device))
        self.accum, self.lr, self.warmup_steps, self.min_lr_ratio = value, lr, warmup_steps, min_lr_ratio
        self.max_grad_norm, self.weight_decay, self.betas = max_grad_norm, weight_decay, tuple(betas)
        self.eval_every, self.checkpoint_every, self.seed = eval_every, checkpoint_every, seed
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress, self.plot, self.callbacks = progress, plot, list(callbacks)
        self.announce: Callable[[str], None] | None = None  # where eval and resume lines go (the CLI sets it)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.params = None
        self.opt_state = None
        self._stop = False
        self._log = runlog.RunLog(self.history)

    # --- public API -----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop at the end of the current step (a checkpoint is saved there when there is an ``out_dir``)."""
        self._stop = True

    def fit(self, data: TrainingData, steps: int, resume: str | os.PathLike | None = None) -> dict[str, Any]:
        """Optimizer steps up to ``steps`` in all on ``data``; ``resume``: a checkpoint file or run folder.
        Returns the summary (as the torch trainer's): steps done, last loss, last evaluation, paths."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be a positive integer")
        if data.seq_len > self.max_length:
            raise InputError(f"seq_len={data.seq_len} exceeds max_length={self.max_length}")
        self._stop, self.step, self.history = False, 0, []
        self._warmup = warmup_steps(steps, self.warmup_steps)
        self._total = steps  # the schedule's length, saved so another backend can resume at its position
        factor = cosine_schedule(self._warmup, steps, self.min_lr_ratio)
        with jax.default_device(self.device):
            # Committed to the device, as the step's outputs are: the step then compiles once, not twice.
            self.params = jax.device_put(self.model.params, self.device)
            self.opt_state = jax.device_put(self._optimizer().init(self.params), self.device)
        run_settings = self._run_settings(data)
        if resume is not None:
            where = self._resume(resume, data, run_settings)
        elif self.out_dir is not None and (self.out_dir / ckpt.FILENAME).exists():
            raise ConfigError(f"{os.fspath(self.out_dir)!r} already holds a checkpoint; resume it (--resume) or "
                              "choose another output folder")
        start = self.step
        if start >= steps:
            raise ConfigError(f"the checkpoint is at step {start}, already at or past steps={steps}; "
                              "ask for more steps to continue")
        if resume is not None:
            self._say(f"resumed from step {start} of {os.fspath(where)}", None)
        self._open_log(data, steps, start)
        last_eval: dict[str, Any] = {}
        peak = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        try:
            with self._sigint_stops():
                for step in range(start + 1, steps + 1):
                    record = self._train_step(data, step, self.lr * factor(step - 1))
                    peak = max(peak, record["mem_bytes"])
                    if (self.eval_every and step % self.eval_every == 0 or step == steps) and data.eval_batches:
                        last_eval = {"kind": "eval", "step": step, **self.evaluate(data)}
                        self._emit(last_eval)
                        self._say(runlog.eval_line(last_eval), bar)
                    bar.update(1)
                    bar.set_postfix_str(f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s",
                                        refresh=False)
                    for callback in self.callbacks:
                        callback(self, record)
                    if self.checkpoint_every and step % self.checkpoint_every == 0 and step != steps:
                        self.save(data, run_settings)
                    if self._stop:
                        break
        finally:
            bar.close()
            self._log.close()
        self.model.params = self._given.params = self.params
        paths: dict[str, str] = {}
        with runlog.sigint_noted() as noted:
            if self.out_dir is not None:
                paths["checkpoint"] = os.fspath(self.save(data, run_settings))
                log = self.out_dir / runlog.LOG_NAME
                paths["log"] = os.fspath(log)
                if self.plot:
                    paths["plot"] = os.fspath(runlog.plot_log(log, self.out_dir / runlog.PLOT_NAME))
            summary = self._summary(steps, start if resume is not None else None, last_eval, peak, paths, data)
        summary["interrupted"] = bool(noted)
        return summary

    def evaluate(self, data: TrainingData) -> dict[str, float]:
        """Held-out loss (nats), bits per byte (or per token), and for labelled data the share of sequences
        whose every target is predicted right (``eval_accuracy``) and of target tokens (``eval_token_accuracy``)."""
        nats, count, exact, rows, right = 0.0, 0, 0, 0, 0
        for ids_np, labels_np in data.eval_batches:
            ids = jnp.asarray(ids_np, jnp.int32)
            labelled = labels_np is not None
            labels = jnp.asarray(labels_np if labelled else ids_np, jnp.int32)
            sums = self._jit("eval", eval_sums, static_argnums=3)(self.params, ids, labels, labelled)
            s, n, e, r = (float(v) for v in sums)
            nats, count = nats + s, count + int(n)
            if labelled:
                exact, right, rows = exact + int(e), right + int(r), rows + ids.shape[0]
        return eval_record(nats, count, data.units, exact, right, rows)

    def save(self, data: TrainingData, run_settings: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/checkpoint.safetensors`` atomically with everything ``fit(resume=...)`` needs."""
        import optax

        if self.out_dir is None:
            raise ConfigError("no out_dir: the trainer has nowhere to write a checkpoint")
        get = optax.tree_utils.tree_get
        sections = {"model": to_canonical(self.params, dtype=None),
                    "optimizer/exp_avg": to_canonical(get(self.opt_state, "mu"), dtype=None),
                    "optimizer/exp_avg_sq": to_canonical(get(self.opt_state, "nu"), dtype=None)}
        state = {"step": self.step, "adam_step": int(get(self.opt_state, "count")),
                 "model_class": type(self.model).__name__, "config": self._comparable_config(),
                 "model_config": self.config.to_dict(), "run": run_settings or self._run_settings(data),
                 "trainer": self.hyperparameters(), "data": data.sampler.state_dict(),
                 "rng": {"jax_seed": self.seed},  # the dropout keys' root: a resume draws the same masks
                 # the schedule's length and warmup: torch's LambdaLR resumes at its position (checkpoint.to_torch)
                 "schedule": {"steps": getattr(self, "_total", None), "warmup": getattr(self, "_warmup", None)}}
        return ckpt.save_checkpoint(self.out_dir / ckpt.FILENAME, sections, state)

    def hyperparameters(self) -> dict[str, Any]:
        """The trainer's settings, as recorded in logs and checkpoints."""
        return {"max_length": self.max_length, "gradient_accumulation_steps": self.accum, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "max_grad_norm": self.max_grad_norm, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "precision": self.precision, "seed": self.seed, "optimizer": "optax.adamw"}

    # --- the jitted functions -------------------------------------------------------------------------
    def _hyper(self) -> "StepSettings":
        return StepSettings(self.seed, self.max_grad_norm, self.betas, self.weight_decay)

    def _optimizer(self):
        return optimizer(self._hyper())

    def _jit(self, name: str, make: Callable, *args, **kwargs) -> Callable:
        # Kept on the model, whose own jit cache set_policy & co. clear: trainers of one model compile once.
        key = ("trainer", name, *args)
        if key not in self.model._jitted:
            self.model._jitted[key] = jax.jit(functools.partial(make, self.model, *args), **kwargs)
        return self.model._jitted[key]

    def _train_step(self, data: TrainingData, step: int, lr: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        batches = [data.sampler.next_batch() for _ in range(self.accum)]
        shapes = {b[0].shape for b in batches}
        if len(shapes) != 1:
            raise InputError(f"the micro-batches of one step have different shapes {sorted(shapes)}; the JAX "
                             "trainer scans them in one compiled step, so they must match")
        ids = np.stack([b[0] for b in batches]).astype(np.int32)
        labels = np.stack([b[0] if b[1] is None else b[1] for b in batches]).astype(np.int32)
        fn = self._jit("step", train_step, self._hyper(),
                       donate_argnums=(0, 1) if self.device.platform != "cpu" else ())
        self.params, self.opt_state, loss, norm = fn(self.params, self.opt_state, jnp.asarray(ids),
                                                     jnp.asarray(labels), jnp.float32(lr),
                                                     jnp.int32((step - 1) * self.accum))
        loss_value, grad_norm = float(loss), float(norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step}; "
                                f"lower the learning rate (lr={self.lr}) or use fp32 precision")
        self.step = step
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(ids.size), "tokens_per_s": ids.size / elapsed, "step_s": elapsed,
                  "mem_bytes": self._memory_bytes()}
        self._emit(record)
        return record

    # --- resume ---------------------------------------------------------------------------------------
    def _run_settings(self, data: TrainingData) -> dict[str, Any]:
        return resume.run_settings(data, self)

    def _comparable_config(self) -> dict[str, Any]:
        return resume.comparable_config(self.config.to_dict(), *RESUMABLE_TOO)

    def _resume(self, path, data: TrainingData, run_settings: dict[str, Any]) -> Path:
        import optax

        sections, state, where = ckpt.load_checkpoint(path)
        ckpt.check_compatible(state, config=self._comparable_config(), run=run_settings, where=where)
        try:
            template = self.params
            params = from_canonical(sections["model"], template, source=os.fspath(where))
            mu = from_canonical(sections["optimizer/exp_avg"], template, source=os.fspath(where))
            nu = from_canonical(sections["optimizer/exp_avg_sq"], template, source=os.fspath(where))
            data.sampler.load_state_dict(state["data"])
        except (ConfigError, InputError, KeyError) as exc:
            raise ckpt.CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} does not fit this run: "
                                                   f"{exc}") from None
        self.params = jax.device_put(params, self.device)
        count = jnp.asarray(state["adam_step"], optax.tree_utils.tree_get(self.opt_state, "count").dtype)
        self.opt_state = jax.device_put(optax.tree_utils.tree_set(self.opt_state, mu=mu, nu=nu, count=count),
                                        self.device)
        self.step = int(state["step"])
        self.seed = int(state.get("rng", {}).get("jax_seed", self.seed))  # a torch checkpoint has no jax keys
        if self.out_dir is None:
            self.out_dir = where.parent
        return where

    # --- log, memory, signals -------------------------------------------------------------------------
    def _mem_kind(self) -> str:
        # "cuda..." makes the shared plot label the curve as device memory
        return "cpu_rss" if self.device.platform == "cpu" else f"{self.device.platform}_peak_bytes_in_use"

    def _memory_bytes(self) -> int:
        if self.device.platform == "cpu":
            return host_rss_bytes()
        stats = self.device.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0))

    def _summary(self, steps, resumed_from, last_eval, peak, paths, data) -> dict[str, Any]:
        train = [r for r in self.history if r.get("kind") == "train"]
        summary = {"step": self.step, "steps": steps, "stopped": self.step < steps, "resumed_from": resumed_from,
                   "loss": train[-1]["loss"] if train else None,
                   "eval": {k: v for k, v in last_eval.items() if k != "kind"}, "overflow_steps": 0,
                   "peak_mem_bytes": peak, "mem_kind": self._mem_kind(), "paths": paths,
                   "device": _device_name(self.device), "precision": "bf16" if self.model.compute_dtype else "fp32",
                   "data": data.identity, "policies": list(self.model.policies),
                   "params": self.model.num_params()}
        if self.out_dir is not None:
            paths["result"] = os.fspath(self.out_dir / runlog.RESULT_NAME)
            runlog.write_json(self.out_dir / runlog.RESULT_NAME,
                              {**summary, "environment": environment(self.device), "config": self.config.to_dict(),
                               "trainer": self.hyperparameters()})
        return summary

    def _open_log(self, data: TrainingData, steps: int, start: int) -> None:
        header = {"kind": "run" if start == 0 else "resume", "step": start, "steps": steps,
                  "config": self.config.to_dict(), "trainer": self.hyperparameters(), "warmup": self._warmup,
                  "data": data.identity, "environment": environment(self.device), "mem_kind": self._mem_kind()}
        self._log = runlog.RunLog(self.history)  # fit() starts a new history
        self._log.open(self.out_dir, header, start)

    def _emit(self, record: dict[str, Any]) -> None:
        self._log.emit(record)

    def _say(self, line: str, bar) -> None:
        if self.announce is not None:
            self.announce(line)
        elif self.progress and bar is not None:
            bar.write(line, file=sys.stderr)

    @contextlib.contextmanager
    def _sigint_stops(self):
        """Ctrl-C (any number of times) stops the run at the end of the step in flight."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if not self._stop:
                print("\nstopping after this step", file=sys.stderr)
            self._stop = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# --- the CLI's entry point ----------------------------------------------------------------------------
def _refuse_unbuilt(settings) -> None:
    if settings.scheduler:
        raise ConfigError(f"--scheduler {settings.scheduler} is not built in the JAX trainer yet (the planner's "
                          "strategies drive torch's scheduler); pick a --policy, or use --backend torch")


def run(settings, data: TrainingData) -> dict[str, Any]:
    """Build the model ``settings`` describe (``revnet_core.settings.TrainSettings``) and train it on ``data``
    (``revnet train --backend jax``)."""
    from .model import ReversibleTransformerJAX

    _refuse_unbuilt(settings)
    device = pick_device(settings.device)
    compute_dtype_for(settings.precision, device)  # refuse fp16 before a model is built
    with jax.default_device(device):
        model = ReversibleTransformerJAX(settings.model_config(), seed=settings.seed)
        if settings.policies:
            model.set_policy(settings.policies)
        trainer = JAXTrainer(
            model, max_length=settings.seq_len, gradient_accumulation_steps=settings.grad_accum, lr=settings.lr,
            warmup_steps=settings.warmup, min_lr_ratio=settings.min_lr_ratio, max_grad_norm=settings.clip_norm,
            weight_decay=settings.weight_decay, precision=settings.precision, eval_every=settings.eval_every,
            out_dir=settings.out, checkpoint_every=settings.checkpoint_every, device=settings.device,
            seed=settings.seed, progress=settings.progress, plot=settings.plot)
        from tqdm.auto import tqdm

        trainer.announce = lambda line: tqdm.write(line, file=sys.stderr)  # shown with --no-progress too
        return trainer.fit(data, steps=settings.steps, resume=settings.resume)
