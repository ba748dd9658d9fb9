"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer and LR-scheduler states, every RNG state (Python, numpy, torch CPU,
CUDA when present), the data sampler's state, the step, the model config, the run settings that must not
change across a resume, and the backend name. It is written to a temporary file in the same folder, synced,
then renamed over the old one (``os.replace`` is atomic within a file system): a crash mid-write leaves the
last good checkpoint intact. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revnet_core.errors import RevNetError

FORMAT = "revnet-zero-checkpoint-v1"
BACKEND = "torch"
FILENAME = "checkpoint.pt"


class CheckpointError(RevNetError):
    """A checkpoint is missing, corrupt, truncated, or was written by an incompatible run."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _listify(random.getstate()),
        "numpy": {**np_state, "state": {k: _listify(v) for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (the CUDA part only where CUDA is present)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(state["numpy"])
    inner = dict(np_state["state"])
    if "key" in inner:
        inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    np_state["state"] = inner
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _listify(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [_listify(v) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag and backend) atomically to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "backend": BACKEND, **state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _sync_dir(path.parent)
    return path


def _sync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path or a run folder (``DIR/checkpoint.pt``)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {os.fspath(p)!r}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint; corrupt, truncated or foreign files raise CheckpointError."""
    p = resolve(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zips and bad pickles
        raise CheckpointError(
            f"checkpoint {os.fspath(p)!r} is corrupt or truncated and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{os.fspath(p)!r} is not a RevNet-Zero training checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    missing = [k for k in ("backend", "model", "optimizer", "scheduler", "rng", "data", "step", "config", "run")
               if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {os.fspath(p)!r} is incomplete: missing {missing}")
    return state


def check_compatible(state: dict[str, Any], *, backend: str, model_class: str, config: dict[str, Any],
                     run: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """CheckpointError naming every difference that would make resuming from ``state`` wrong."""
    where = os.fspath(path)
    if state["backend"] != backend:
        raise CheckpointError(f"checkpoint {where!r} was written by the {state['backend']!r} backend; this run "
                              f"uses {backend!r}. Resume with --backend {state['backend']}")
    if state.get("model_class", model_class) != model_class:
        raise CheckpointError(f"checkpoint {where!r} holds a {state['model_class']} model; this run builds a "
                              f"{model_class}")
    diffs = _diff(state["config"], config)
    if diffs:
        raise CheckpointError(f"checkpoint {where!r} was written for a different model config: {'; '.join(diffs)}. "
                              "Resume with the same model settings, or start a new run in another --out folder")
    diffs = _diff(state["run"], run)
    if diffs:
        raise CheckpointError(f"checkpoint {where!r} was written by a run with other settings: {'; '.join(diffs)}. "
                              "Resume with the same data, sequence length, batch and accumulation")


def _diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}"
            for k in keys if _norm(saved.get(k, "<absent>")) != _norm(now.get(k, "<absent>"))]


def _norm(value):
    # Checkpoints store tuples as lists; compare them alike.
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value
