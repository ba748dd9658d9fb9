"""``TrainSettings``: everything a training run takes (the ``revnet train`` flags and ``--config`` TOML keys),
validated without a framework, and the data they describe. Every backend's trainer takes these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import policies as policy_table
from .config import ModelConfig
from .errors import ConfigError
from .planner import STRATEGIES

# Named model shapes (--size); explicit --layers/--d-model/--heads override them.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 2, "d_model": 64, "num_heads": 2},
    "small": {"num_layers": 4, "d_model": 128, "num_heads": 4},  # the default: a few minutes on a laptop CPU
    "base": {"num_layers": 6, "d_model": 256, "num_heads": 4},  # the accuracy-parity size
    "medium": {"num_layers": 12, "d_model": 512, "num_heads": 8},
    "large": {"num_layers": 24, "d_model": 1024, "num_heads": 16},  # the seed model's shape (byte vocab)
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 autocast where supported, else fp32; fp16: loss-scaled


def _opt(default, help: str, kind=None, choices=None, flag: str | None = None, nargs=None, metavar=None):
    return field(default=default, metadata={"help": help, "kind": kind or type(default), "choices": choices,
                                            "flag": flag, "nargs": nargs, "metavar": metavar})


@dataclass
class TrainSettings:
    """Everything ``revnet train`` takes; the same names are the keys of a ``--config`` TOML file."""

    backend: str = _opt("torch", "backend to train with (see `revnet info`)")
    size: str = _opt("small", "named model shape", choices=tuple(PRESETS))
    layers: int | None = _opt(None, "number of reversible layers (overrides --size)", kind=int)
    d_model: int | None = _opt(None, "model width (overrides --size)", kind=int)
    heads: int | None = _opt(None, "attention heads (overrides --size)", kind=int)
    d_ff: int | None = _opt(None, "feed-forward width (default 4 x d_model)", kind=int)
    coupling: str = _opt("additive", "coupling name (built-ins: additive, affine; plugins add more)")
    max_seq_len: int | None = _opt(None, "the model's longest sequence (default: --seq-len)", kind=int)
    seq_len: int = _opt(256, "tokens (bytes) per training sequence")
    steps: int = _opt(200, "optimizer steps in all (a resumed run may ask for more)")
    batch_size: int = _opt(8, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    warmup: int | None = _opt(None, "warmup steps (default: min(100, steps/10))", kind=int)
    min_lr_ratio: float = _opt(0.1, "the cosine schedule ends at lr x this")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 turns clipping off")
    precision: str = _opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU; fp16: with a dynamic loss scaler",
                           choices=PRECISIONS)
    policy: str = _opt(policy_table.DEFAULT, f"memory policy, one of {', '.join(policy_table.NAMES)}; or one per "
                       "layer, comma-separated")
    scheduler: str | None = _opt(None, "memory scheduler strategy that picks the policies at every forward "
                                 "(overrides --policy)", kind=str, choices=STRATEGIES)
    task: str = _opt("lm", "lm: byte-level language modelling; passkey: synthetic long-range retrieval",
                     choices=("lm", "passkey"))
    passkey_digits: int = _opt(5, "digits of the passkey (--task passkey)")
    data: list | None = _opt(None, "text files or folders to train on instead of the embedded corpus",
                             kind=str, nargs="+", metavar="PATH")
    tokens: str | None = _opt(None, "a token file (python -m revnet_core.token_file) to train on instead; the "
                              "vocabulary comes from its header", kind=str, metavar="PATH")
    eval_every: int = _opt(50, "steps between held-out evaluations (and at the end)")
    eval_windows: int = _opt(64, "held-out sequences per evaluation")
    checkpoint_every: int | None = _opt(None, "steps between checkpoints (one is always written at the end)",
                                        kind=int)
    out: str | None = _opt(None, "output folder (default: runs/<date-time>)", kind=str, metavar="DIR")
    resume: str | None = _opt(None, "continue from a checkpoint file or run folder (no value: the --out folder)",
                              kind=str, nargs="?", metavar="PATH")
    seed: int = _opt(0, "seed of the model init and the data order")
    device: str = _opt("auto", "auto (GPU when present), cpu, cuda, cuda:1, ...")
    progress: bool = _opt(True, "progress bar", flag="--no-progress")
    plot: bool = _opt(True, "PNG plot of loss and memory at the end", flag="--no-plot")

    # --- derived ---------------------------------------------------------------------------------------
    @property
    def policies(self) -> list[str] | None:
        """One policy per layer when ``policy`` is a comma-separated list, else None."""
        return [p.strip() for p in self.policy.split(",")] if "," in self.policy else None

    def model_config(self) -> ModelConfig:
        """The ModelConfig these settings describe (validated; byte vocabulary)."""
        shape = dict(PRESETS[self.size])
        for key, name in (("num_layers", "layers"), ("d_model", "d_model"), ("num_heads", "heads")):
            if getattr(self, name) is not None:
                shape[key] = getattr(self, name)
        max_seq_len = self.max_seq_len if self.max_seq_len is not None else self.seq_len
        if self.seq_len > max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} is larger than max_seq_len={max_seq_len}")
        return ModelConfig(**shape, d_ff=self.d_ff, vocab_size=self.vocab_size(), max_seq_len=max_seq_len,
                           coupling=self.coupling,
                           policy="reverse" if self.policies else self.policy)

    def validate(self) -> None:
        """ConfigError naming the first bad setting."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, choices = f.metadata["kind"], f.metadata["choices"]
            if value is None:
                if f.default is not None:
                    raise ConfigError(f"{f.name} must be set")
                continue
            if f.name == "data":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"data must be a list of paths, got {value!r}")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name}={value!r} must be of type {kind.__name__}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not one of {list(choices)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows", "seq_len", "passkey_digits",
                     "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: only checkpoint_every may be unset
                raise ConfigError(f"{name}={value} must be a positive integer")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup} must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 turns clipping off)")
        for p in self.policies or [self.policy]:
            policy_table.check(p)
        config = self.model_config()
        if self.policies and len(self.policies) != config.num_layers:
            raise ConfigError(f"got {len(self.policies)} policies for {config.num_layers} layers")
        if self.data is not None and self.task != "lm":
            raise ConfigError(f"--data is for --task lm; the {self.task} task makes its own data")
        if self.tokens is not None and (self.data is not None or self.task != "lm"):
            raise ConfigError("--tokens is a corpus for --task lm, instead of --data: give one of them"
                              if self.data is not None else f"--tokens is for --task lm; the {self.task} task "
                              "makes its own data")

    def vocab_size(self) -> int:
        """The model's vocabulary: the token file's (its header), else bytes (256)."""
        if self.tokens is None:
            return 256
        from .token_file import open_tokens

        return open_tokens(self.tokens).vocab_size

    @property
    def clip_norm(self) -> float | None:
        return self.max_grad_norm or None


def make_data(settings: TrainSettings):
    """The TrainingData of these settings, built in the core (no framework)."""
    if settings.task == "passkey":
        from .tasks import passkey_data

        return passkey_data(settings.seq_len, settings.batch_size, settings.seed, settings.eval_windows,
                            settings.passkey_digits)
    if settings.tokens is not None:
        from .token_file import token_data

        return token_data(settings.tokens, settings.seq_len, settings.batch_size, settings.seed,
                          eval_windows_max=settings.eval_windows)
    from .data import file_corpus, lm_data, stdlib_corpus

    corpus = file_corpus(settings.data) if settings.data else stdlib_corpus()
    return lm_data(corpus, settings.seq_len, settings.batch_size, settings.seed, settings.eval_windows)
