"""``LongContextPretraining``: the README's pre-training recipe, a named model size trained on a long context.

    pretrainer = LongContextPretraining(model_size='1B', context_length=262144, batch_size=1,
                                        gradient_accumulation=64)
    pretrainer.run(dataset='openwebtext', num_steps=100000, save_every=10000)

The recipe is a ``ReversibleTransformer`` of a ``revnet_core.presets`` shape trained by ``LongContextTrainer``
(its schedule, clipping, atomic checkpoints, JSONL log, progress bar and held-out bits per byte): no loop of
its own. ``save_every`` is the trainer's ``checkpoint_every``: ``out_dir/checkpoint.pt`` is rewritten every
``save_every`` steps and at the end. ``run`` continues from that checkpoint when one is there, bit for bit
as if the run had never stopped.

Data is local: ``'embedded'`` (the standard library's sources, ``revnet_core.data.stdlib_corpus``), a token
file (``revnet_core.token_file``, memory-mapped), or text files and folders. Nothing is downloaded: a dataset
name such as ``'openwebtext'`` raises ``DatasetUnavailableError`` saying how to make a token file of it.

Before a model is built, the torch cost model (``revnet_torch.cost``) predicts the step's peak memory; a run
predicted not to fit the device raises ``TrainingError`` with the prediction (``memory_check='warn'`` warns
instead).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from revnet_core import token_file
from revnet_core.advisor import ALLOCATOR_HEADROOM, usable_bytes
from revnet_core.config import ModelConfig
from revnet_core.data import TrainingData, file_corpus, lm_data, stdlib_corpus
from revnet_core.errors import ConfigError, DatasetUnavailableError, TrainingError
from revnet_core.memory import Workload, format_bytes
from revnet_core.presets import preset_config, size_name

from . import checkpoint as ckpt
from .model import ReversibleTransformer
from .trainer import LongContextTrainer, autocast_dtype, pick_device

EMBEDDED = "embedded"
MEMORY_CHECKS = ("raise", "warn", "off")
WARN_FRACTION = 0.8  # a predicted peak above this share of the budget is warned about
_AMP_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def predicted_peak_bytes(config: ModelConfig, batch_size: int, seq_len: int, precision: str,
                         device: torch.device) -> int:
    """The torch cost model's peak bytes of one training step (AdamW, the config's policy in every layer)."""
    from .cost import CostModel

    amp = autocast_dtype(precision, device)
    workload = Workload(batch=batch_size, seq_len=seq_len, autocast_dtype=_AMP_NAMES.get(amp),
                        device="cuda" if device.type == "cuda" else "cpu")
    return CostModel(config, workload).peak_bytes(config.policy)


def device_budget_bytes(device: torch.device) -> int | None:
    """Bytes a training step may allocate on ``device``: the GPU's memory less the CUDA context and headroom,
    or on the CPU the machine's RAM less headroom (None where the OS does not say)."""
    if device.type == "cuda":
        return usable_bytes(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * (1 - ALLOCATOR_HEADROOM))
    except (ValueError, OSError, AttributeError):
        return None


def unavailable(name: str) -> DatasetUnavailableError:
    """The error for a dataset this machine has no local copy of: how to make one."""
    return DatasetUnavailableError(
        f"dataset {name!r} cannot be loaded here: nothing is downloaded, and no file or folder {name!r} exists. "
        f"Use dataset='{EMBEDDED}' (the built-in corpus), a folder of UTF-8 text files, or a token file: "
        f"{token_file.MAKE_HINT}; then run(dataset='tokens.bin', ...)")


class LongContextPretraining:
    """Pre-train a ``ReversibleTransformer`` of a named size at ``context_length`` tokens.

    ``model_size``: a ``revnet_core.presets`` name ('tiny', 'small', '125M', '1B', ...) or parameter count.
    ``batch_size`` sequences per micro-batch, ``gradient_accumulation`` micro-batches per optimizer step.
    Keywords: ``out_dir`` (log, checkpoint, plot, run.json), ``learning_rate``, ``warmup_steps``,
    ``precision`` (auto | fp32 | bf16 | fp16), ``device``, ``seed``, ``policy`` (a memory policy for every
    layer), ``vocab_size`` (default: the data's), ``eval_every``, ``eval_windows`` (held-out windows),
    ``progress``, ``plot``, ``callbacks`` (the trainer's), ``memory_check`` (raise | warn | off),
    ``memory_budget`` (bytes; default: the device's); other keywords are ModelConfig fields.
    """

    def __init__(self, model_size: str | int | float = "125M", context_length: int = 2048, batch_size: int = 1,
                 gradient_accumulation: int = 1, *, out_dir: str | os.PathLike = "runs/pretrain",
                 learning_rate: float = 3e-4, warmup_steps: int | None = None, precision: str = "auto",
                 device: str | torch.device | None = None, seed: int = 0, policy: str | None = None,
                 vocab_size: int | None = None, eval_every: int | None = None, eval_windows: int = 16,
                 progress: bool = True, plot: bool = True, callbacks: Iterable[Callable] = (),
                 memory_check: str = "raise", memory_budget: int | None = None, **config_fields: Any):
        for name, value in (("context_length", context_length), ("batch_size", batch_size),
                            ("gradient_accumulation", gradient_accumulation), ("eval_windows", eval_windows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if context_length < 2:
            raise ConfigError(f"context_length={context_length} must be >= 2 (next-token loss needs two tokens)")
        if memory_check not in MEMORY_CHECKS:
            raise ConfigError(f"memory_check={memory_check!r} is not one of {list(MEMORY_CHECKS)}")
        self.model_size = size_name(model_size)
        self.context_length = context_length
        self.batch_size = batch_size
        self.gradient_accumulation = gradient_accumulation
        self.out_dir = Path(out_dir)
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.precision = precision
        self.device = pick_device(device)
        autocast_dtype(precision, self.device)  # validates the name now, not after the data is loaded
        self.seed = seed
        self.vocab_size = vocab_size
        self.eval_every = eval_every
        self.eval_windows = eval_windows
        self.progress = progress
        self.plot = plot
        self.callbacks = list(callbacks)
        self.memory_check = memory_check
        self.memory_budget = memory_budget
        self._fields = {**config_fields, **({"policy": policy} if policy is not None else {})}
        self.config = self._config(vocab_size or 256)
        self.predicted_peak = self._check_fits(self.config)
        self.model: ReversibleTransformer | None = None
        self.trainer: LongContextTrainer | None = None

    def _config(self, vocab_size: int) -> ModelConfig:
        return preset_config(self.model_size, max_seq_len=self.context_length, vocab_size=vocab_size, **self._fields)

    def _check_fits(self, config: ModelConfig) -> int | None:
        """The predicted peak (bytes); TrainingError (or a warning) if it exceeds the device's budget."""
        if self.memory_check == "off":
            return None
        peak = predicted_peak_bytes(config, self.batch_size, self.context_length, self.precision, self.device)
        budget = self.memory_budget if self.memory_budget is not None else device_budget_bytes(self.device)
        if budget is None:
            return peak
        what = (f"model_size={self.model_size!r} at context_length={self.context_length} with batch_size="
                f"{self.batch_size} is predicted to need {format_bytes(peak)} at its peak (revnet_torch.cost: "
                f"policy {config.policy!r}, AdamW) and {self.device.type} has {format_bytes(budget)} usable")
        if peak > budget:
            fix = ("use a smaller model_size or context_length, a GPU with more memory, or memory_check='warn' "
                   "to try anyway")
            if self.memory_check == "raise":
                raise TrainingError(f"{what}: it does not fit; {fix}")
            warnings.warn(f"{what}: it is not expected to fit", ResourceWarning, stacklevel=3)
        elif peak > WARN_FRACTION * budget:
            warnings.warn(f"{what}: close to the limit", ResourceWarning, stacklevel=3)
        return peak

    # --- data ---------------------------------------------------------------------------------------------
    def data(self, dataset: Any = EMBEDDED) -> tuple[TrainingData, int]:
        """(the trainer's data, its vocabulary size) for ``dataset``: 'embedded', a token file, text files or
        folders (a path or a list of them), or a ``TrainingData`` already made."""
        T, B, seed, n_eval = self.context_length, self.batch_size, self.seed, self.eval_windows
        if isinstance(dataset, TrainingData):
            return dataset, self.vocab_size or 256
        if isinstance(dataset, str) and dataset == EMBEDDED:
            return lm_data(stdlib_corpus(), T, B, seed, eval_windows_max=n_eval), 256
        paths = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
        if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise ConfigError(f"dataset={dataset!r} must be '{EMBEDDED}', a token file, or text files or folders")
        # A header beside it makes a token file; so does the suffix, so that a lost header is named as such.
        if len(paths) == 1 and (token_file.header_path(paths[0]).exists() or Path(paths[0]).suffix == ".bin"):
            tf = token_file.open_tokens(paths[0])
            return token_file.token_data(tf, T, B, seed, eval_windows_max=n_eval), tf.vocab_size
        for p in paths:
            if not Path(p).exists():
                raise unavailable(os.fspath(p))
        return lm_data(file_corpus(paths), T, B, seed, eval_windows_max=n_eval), 256

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, dataset: Any = EMBEDDED, num_steps: int = 1000, save_every: int | None = None,
            resume: bool = True) -> dict[str, Any]:
        """Train for ``num_steps`` optimizer steps in all on ``dataset`` (see ``data``), writing
        ``out_dir/checkpoint.pt`` every ``save_every`` steps (None: at the end only). With ``resume`` (the
        default) a checkpoint already in ``out_dir`` is continued, and the run says so.

        Returns: steps done, the final training loss (nats per token), held-out bits per byte (per token for
        a token file with another vocabulary), peak memory (bytes; the GPU's allocated peak or the process's
        RSS), the checkpoint path, the step resumed from (None), the parameter count and the trainer's summary.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConfigError(f"num_steps={num_steps!r} must be a positive integer")
        if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int)
                                       or save_every < 1):
            raise ConfigError(f"save_every={save_every!r} must be a positive integer (or None: at the end only)")
        data, data_vocab = self.data(dataset)
        vocab = self.vocab_size or data_vocab
        if vocab < data_vocab:
            raise ConfigError(f"vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab}); leave "
                              "vocab_size unset to take the data's")
        if vocab != self.config.vocab_size:
            self.config = self._config(vocab)
            self.predicted_peak = self._check_fits(self.config)
        torch.manual_seed(self.seed)
        self.model = ReversibleTransformer(self.config)
        self.trainer = LongContextTrainer(
            self.model, max_length=self.context_length, gradient_accumulation_steps=self.gradient_accumulation,
            lr=self.learning_rate, warmup_steps=self.warmup_steps, precision=self.precision,
            eval_every=self.eval_every, out_dir=self.out_dir, checkpoint_every=save_every, device=self.device,
            seed=self.seed, progress=self.progress, plot=self.plot, callbacks=self.callbacks)
        self.trainer.announce = _announce
        existing = self.out_dir / ckpt.FILENAME
        start = None
        if existing.exists():
            if not resume:
                raise ConfigError(f"{os.fspath(self.out_dir)!r} already holds a checkpoint; run(resume=True) "
                                  "continues it, or choose another out_dir")
            start = self.out_dir
        try:
            summary = self.trainer.fit(data, steps=num_steps, resume=start)
        except torch.OutOfMemoryError as exc:
            raise TrainingError(f"out of memory: {str(exc).splitlines()[0]}; lower context_length or batch_size "
                                "(raise gradient_accumulation to keep the tokens per step)") from None
        unit = "byte" if data.units == "bytes" else "token"
        return {
            "steps": summary["step"], "num_steps": num_steps, "loss": summary["loss"],
            f"heldout_bits_per_{unit}": summary["eval"].get(f"eval_bits_per_{unit}"),
            "peak_mem_bytes": summary["peak_mem_bytes"], "mem_kind": summary["mem_kind"],
            "predicted_peak_bytes": self.predicted_peak, "checkpoint": summary["paths"].get("checkpoint"),
            "resumed_from": summary["resumed_from"], "stopped": summary["stopped"],
            "params": sum(p.numel() for p in self.model.parameters()), "trainer": summary,
        }


def _announce(line: str) -> None:
    """Resume and evaluation lines, shown whether or not a progress bar is."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


