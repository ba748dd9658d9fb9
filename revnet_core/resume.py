"""Whether a checkpoint's run can be continued by this one: the comparison every backend's trainer makes."""

from __future__ import annotations

import json
import os
from typing import Any

from .config import LEGACY_DEFAULTS
from .errors import CheckpointIncompatibleError


def plain(value: Any) -> Any:
    """What a JSON round trip makes of ``value`` (tuples become lists): saved and current settings compare."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# Config fields that change memory or speed, not the function computed: a resumed run may change them.
RESUMABLE_CONFIG_FIELDS = ("policy", "loss_chunk_size")


def comparable_config(config: dict[str, Any], *also: str) -> dict[str, Any]:
    """A config dict less the fields a resume may change (``RESUMABLE_CONFIG_FIELDS`` and ``also``, e.g.
    "backend_options" for a backend that resumes another's checkpoints), as JSON reads it back."""
    return plain({k: v for k, v in config.items() if k not in RESUMABLE_CONFIG_FIELDS + also})


def run_settings(data: Any, trainer: Any) -> dict[str, Any]:
    """What must match for a resume to continue the same run (the total number of steps may change): the
    data's identity and shapes and the trainer's optimizer settings (attributes every backend's trainer has)."""
    return {"data": data.identity, "seq_len": data.seq_len, "batch_size": data.batch_size,
            "gradient_accumulation_steps": trainer.accum, "lr": trainer.lr, "warmup_steps": trainer.warmup_steps,
            "min_lr_ratio": trainer.min_lr_ratio, "max_grad_norm": trainer.max_grad_norm,
            "weight_decay": trainer.weight_decay, "betas": list(trainer.betas)}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: checkpoint X, now Y' for every key whose value differs (a missing key reads '<absent>')."""
    saved, now = plain(saved), plain(now)
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, "<absent>") != now.get(k, "<absent>")]


def check_resumable(saved_config: dict[str, Any], config: dict[str, Any], saved_run: dict[str, Any],
                    run: dict[str, Any], where: str | os.PathLike) -> None:
    """CheckpointIncompatibleError naming every model-config or run-setting difference that would make
    resuming wrong. A config field the checkpoint predates held the value its model used
    (``LEGACY_DEFAULTS``: stream_merge "mean"), not today's default."""
    where = os.fspath(where)
    saved_config = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in config}, **saved_config}
    for saved, now, what, fix in ((saved_config, config, "a different model config", "the same model settings"),
                                  (saved_run, run, "a run with other settings",
                                   "the same data, sequence length, batch and accumulation")):
        diffs = differences(saved, now)
        if diffs:
            raise CheckpointIncompatibleError(f"checkpoint {where!r} was written for {what}: {'; '.join(diffs)}. "
                                              f"Resume with {fix}, or start a new run in another --out folder")
