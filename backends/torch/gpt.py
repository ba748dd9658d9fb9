"""ReversibleGPT: the causal reversible LM under its README name, and the pretrained-model format.

``model.save_pretrained(DIR)`` writes ``DIR/config.json`` (format tag, model class, the whole ModelConfig) and
``DIR/model.safetensors`` (the canonical weights, ``revnet_torch.weights``). ``Class.from_pretrained(path)``
reads that folder back, or a training checkpoint: ``checkpoint.pt`` itself or the run folder ``revnet train``
(``LongContextTrainer`` with an ``out_dir``) leaves. Every failure is a ``CheckpointError``: missing
(``CheckpointNotFoundError``), damaged (``CheckpointCorruptError``, ``CheckpointTruncatedError``), or another
kind of model (``CheckpointIncompatibleError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from revnet_core import atomic
from revnet_core.config import ModelConfig
from revnet_core.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompatibleError, ConfigError

from . import checkpoint as ckpt
from .model import ReversibleTransformer

FORMAT = "revnet-zero-pretrained-v1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# which class loads the saves of each model class (named in the refusal of another class's save)
LOADERS = {"ReversibleGPT": "ReversibleGPT", "ReversibleTransformer": "ReversibleGPT",
           "ReversibleBERT": "ReversibleBERT"}


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No saved model at the path: neither a ``save_pretrained`` folder nor a training checkpoint."""


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} was asked for but CUDA is not available here")
    return dev


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for a torch model class (a mixin before the nn.Module base).

    ``loads``: the model class names (as checkpoints record them) whose saves this class rebuilds;
    ``check_saved_config`` refuses a config the class cannot be (e.g. a bidirectional one for a GPT).
    """

    loads: tuple[str, ...] = ()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/config.json`` and ``directory/model.safetensors`` (fp32, checksummed), each
        atomically; the folder is made if needed. Returns the folder. Memory policies are not saved."""
        from .weights import save_weights

        folder = Path(directory)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"save_pretrained needs a folder; {os.fspath(folder)!r} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self, folder / WEIGHTS_NAME)  # first: a config.json always names weights that exist
        record = {"format": FORMAT, "model_class": type(self).__name__, "backend": ckpt.BACKEND,
                  "config": self.config.to_dict()}
        with atomic.replacing(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """The model saved at ``path``, in eval mode on ``device`` ("auto": the GPU when present): a
        ``save_pretrained`` folder, a training checkpoint file, or a run folder holding ``checkpoint.pt``."""
        where = Path(path)
        if where.is_file() and where.name in (CONFIG_NAME, WEIGHTS_NAME):  # a file of a save: its folder
            where = where.parent
        dev = _pick_device(device)
        if where.is_dir() and (where / CONFIG_NAME).exists():
            model = cls._from_folder(where)
        elif where.is_file() or (where.is_dir() and (where / ckpt.FILENAME).exists()):
            model = cls._from_checkpoint(where, dev)
        else:
            raise CheckpointNotFoundError(
                f"no saved model at {os.fspath(where)!r}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(save_pretrained), a run folder with {ckpt.FILENAME}, or a checkpoint file")
        return model.to(dev).eval()

    @classmethod
    def check_saved_config(cls, config: ModelConfig, where: str) -> None:
        """Raise CheckpointIncompatibleError if this class cannot be ``config`` (subclasses refine)."""

    @classmethod
    def _check_class(cls, saved_class: Any, where: str) -> None:
        if saved_class not in cls.loads:
            loader = LOADERS.get(saved_class)
            hint = f"; load it with {loader}.from_pretrained" if loader else ""
            raise CheckpointIncompatibleError(f"{where!r} holds a {saved_class} model; {cls.__name__}.from_pretrained "
                                              f"loads {list(cls.loads)}{hint}")

    @classmethod
    def _build(cls, saved: Any, where: str):
        if not isinstance(saved, dict):
            raise CheckpointCorruptError(f"{where!r} has no model config to rebuild the model from")
        try:
            config = ModelConfig.from_saved(saved)
        except ConfigError as exc:
            raise CheckpointIncompatibleError(f"{where!r} holds a config this version cannot build: {exc}") from None
        cls.check_saved_config(config, where)
        return cls(config)

    @classmethod
    def _from_folder(cls, folder: Path):
        from .weights import load_weights

        where = os.fspath(folder / CONFIG_NAME)
        try:
            record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointCorruptError(f"{where!r} is not readable JSON ({exc}); restore it from a copy") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise CheckpointIncompatibleError(f"{where!r} is not a RevNet-Zero pretrained config (format {found!r}, "
                                              f"expected {FORMAT!r})")
        if record.get("backend") != ckpt.BACKEND:
            raise CheckpointIncompatibleError(f"{where!r} was saved by the {record.get('backend')!r} backend; "
                                              "this loader builds torch models")
        cls._check_class(record.get("model_class"), where)
        model = cls._build(record.get("config"), where)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointNotFoundError(f"{os.fspath(folder)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the save "
                                          "did not finish or the file was moved; save the model again")
        try:
            load_weights(model, weights)
        except ConfigError as exc:  # names or shapes that do not fit the config beside them
            raise CheckpointIncompatibleError(str(exc)) from None
        return model

    @classmethod
    def _from_checkpoint(cls, path: Path, device: torch.device):
        where = ckpt.resolve(path)
        state = ckpt.load_checkpoint(where, map_location=device)
        if state["backend"] != ckpt.BACKEND:
            raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} was written by the "
                                              f"{state['backend']!r} backend; this loader builds torch models")
        cls._check_class(state.get("model_class", "ReversibleTransformer"), os.fspath(where))
        # Newer checkpoints carry the whole config, older ones only the fields a resume compares.
        model = cls._build(state.get("model_config", state["config"]), os.fspath(where))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} does not fit its own config: "
                                              f"{str(exc).splitlines()[0]}") from None
        return model


class ReversibleGPT(Pretrained, ReversibleTransformer):
    """The causal reversible LM (``ReversibleTransformer``) with ``save_pretrained`` / ``from_pretrained``.

    ``ReversibleGPT(num_layers=2, d_model=64, num_heads=4)`` or ``ReversibleGPT(config)``: every
    ``ModelConfig`` field and torch option; ``causal=False`` is refused (that model is ``ReversibleBERT``).
    It loads its own saves and the training checkpoints of a ``ReversibleTransformer`` (``revnet train``).
    """

    loads = ("ReversibleGPT", "ReversibleTransformer")

    def __init__(self, config: ModelConfig | None = None, **fields):
        if fields.get("causal", True if config is None else config.causal) is not True:
            raise ConfigError("ReversibleGPT is causal: causal=False is ReversibleBERT (revnet_torch.bert)")
        super().__init__(config, **fields)

    @classmethod
    def check_saved_config(cls, config: ModelConfig, where: str) -> None:
        if not config.causal:
            raise CheckpointIncompatibleError(f"{where!r} holds a bidirectional model (causal=False); load it with "
                                              "ReversibleBERT.from_pretrained")
