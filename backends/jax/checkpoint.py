"""Training checkpoints of the JAX trainer: one safetensors file in the project's canonical weight layout.

Tensors (numpy arrays as the parameters store them: fp32 in training, so a resume is bit-exact):

    model/<canonical name>                 the weights (``revnet_jax.weights``: torch ``state_dict`` names)
    optimizer/exp_avg/<canonical name>     AdamW's first moment (torch's name for it)
    optimizer/exp_avg_sq/<canonical name>  AdamW's second moment

The safetensors metadata holds ``format``, ``backend``, ``state`` (JSON: the step, AdamW's step count, the
model config, the run settings that must not change across a resume, the sampler's state, the trainer's
settings) and ``sha256``, a digest over every tensor's name, dtype, shape and bytes and over ``state``, so a
changed byte is found. The file is written beside its final name, synced, then renamed over it: a crash
mid-write leaves the last good checkpoint whole.

A torch trainer's ``checkpoint.pt`` resumes here too (``from_torch``): its weights, AdamW moments and step
count, sampler state and schedule position map one to one; only its RNG states do not (JAX draws dropout
masks from its own keys).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from revnet_core import atomic
from revnet_core.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompatibleError  # noqa: F401
from revnet_core.resume import check_resumable, plain

FORMAT = "revnet-zero-safetensors-checkpoint-v1"
BACKEND = "jax"
FILENAME = "checkpoint.safetensors"
TORCH_FILENAME = "checkpoint.pt"  # the torch trainer's: read (and converted) when torch is installed
SECTIONS = ("model", "optimizer/exp_avg", "optimizer/exp_avg_sq")


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder holding ``checkpoint.safetensors`` (else torch's ``checkpoint.pt``,
    which ``load_checkpoint`` converts); CheckpointError when there is none."""
    p = Path(path)
    if p.is_dir():
        for name in (FILENAME, TORCH_FILENAME):
            if (p / name).exists():
                return p / name
        hint = ("; it holds checkpoint.npz, the numba trainer's, which the JAX trainer cannot resume"
                if (p / "checkpoint.npz").exists() else "")
        raise CheckpointError(f"no {FILENAME} (or torch's {TORCH_FILENAME}) in {os.fspath(p)!r}{hint}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {os.fspath(p)!r} does not exist")
    if p.suffix == ".npz":
        raise CheckpointIncompatibleError(f"{os.fspath(p)!r} is the numba trainer's checkpoint; the JAX trainer "
                                          f"resumes from its own {FILENAME} or torch's {TORCH_FILENAME}")
    return p


def _digest(tensors: dict[str, np.ndarray], state: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape};".encode())
        h.update(a.tobytes())
    h.update(state.encode())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, sections: dict[str, dict[str, np.ndarray]],
                    state: dict[str, Any]) -> Path:
    """Write ``sections`` (``SECTIONS`` name -> canonical name -> array) and ``state`` (JSON-able) atomically.
    Returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{section}/{name}": np.ascontiguousarray(a) for section, arrays in sections.items()
               for name, a in arrays.items()}
    text = json.dumps(state, sort_keys=True, default=str)
    meta = {"format": FORMAT, "backend": BACKEND, "state": text, "sha256": _digest(tensors, text)}
    with atomic.replacing(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], Path]:
    """(sections, state, file) of a checkpoint file or run folder, verified against its digest."""
    from safetensors import safe_open

    where = resolve(path)
    if where.suffix == ".pt":
        sections, state = from_torch(where)
        return sections, state, where
    try:
        with safe_open(os.fspath(where), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or a short file
        raise CheckpointCorruptError(f"checkpoint {os.fspath(where)!r} cannot be read: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointIncompatibleError(f"{os.fspath(where)!r} is not a JAX trainer checkpoint (format "
                                          f"{meta.get('format')!r}, expected {FORMAT!r})")
    if _digest(tensors, meta.get("state", "")) != meta.get("sha256"):
        raise CheckpointCorruptError(f"checkpoint {os.fspath(where)!r} is damaged: its sha256 does not match")
    sections: dict[str, dict[str, np.ndarray]] = {s: {} for s in SECTIONS}
    for key, a in tensors.items():
        section, _, name = key.rpartition("/")
        if section not in sections:
            raise CheckpointCorruptError(f"checkpoint {os.fspath(where)!r} holds an unknown tensor {key!r}")
        sections[section][name] = a
    state = json.loads(meta["state"])
    state["backend"] = meta.get("backend")
    return sections, state, where


def from_torch(where: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """A torch trainer checkpoint (``checkpoint.pt``, verified by ``revnet_torch.checkpoint``) as this
    module's sections and state. Its ``state_dict`` names are the canonical ones; AdamW's per-parameter state
    is keyed by position in torch's two parameter groups (matrices, decayed, then the rest, each in
    ``state_dict`` order: how the torch trainer builds them), which maps it onto the names."""
    try:
        from revnet_torch import checkpoint as torch_ckpt
    except ImportError:
        raise CheckpointError(f"{os.fspath(where)!r} is a torch checkpoint; reading it needs torch installed") from None
    try:
        state = torch_ckpt.load_checkpoint(where)
    except torch_ckpt.CheckpointError as exc:  # one family of errors for a JAX run, whichever file it read
        unfit = isinstance(exc, torch_ckpt.CheckpointIncompatibleError)
        raise (CheckpointIncompatibleError if unfit else CheckpointCorruptError)(str(exc)) from None
    if state.get("amp") is not None:
        raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} was trained in fp16 with a loss scaler, "
                                          "which the JAX trainer does not have; resume it with --backend torch")
    model = {k: v.detach().float().numpy() for k, v in state["model"].items()}
    decay = [k for k, v in model.items() if v.ndim >= 2]
    groups = [g["params"] for g in state["optimizer"]["param_groups"]]
    order = decay + [k for k in model if k not in decay]
    if len(groups) != 2 or [len(g) for g in groups] != [len(decay), len(order) - len(decay)]:
        raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r}: its optimizer's parameter groups "
                                          "are not the torch trainer's (matrices, then the rest)")
    exp_avg, exp_avg_sq, steps = {}, {}, set()
    for name, index in zip(order, groups[0] + groups[1]):
        st = state["optimizer"]["state"].get(index)
        if st is None:  # a parameter AdamW never updated: its moments are zero
            exp_avg[name], exp_avg_sq[name] = np.zeros_like(model[name]), np.zeros_like(model[name])
            continue
        exp_avg[name] = st["exp_avg"].float().numpy()
        exp_avg_sq[name] = st["exp_avg_sq"].float().numpy()
        steps.add(int(st["step"]))
    if len(steps) > 1:
        raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r}: AdamW step counts differ between "
                                          f"parameters ({sorted(steps)}); one count is kept per run here")
    config = {k: v for k, v in state["config"].items() if k != "backend_options"}  # torch's kernel choices
    converted = {"step": int(state["step"]), "adam_step": steps.pop() if steps else 0, "config": config,
                 "run": state["run"], "data": state["data"], "backend": BACKEND, "converted_from": "torch"}
    return {"model": model, "optimizer/exp_avg": exp_avg, "optimizer/exp_avg_sq": exp_avg_sq}, plain(converted)


def check_compatible(state: dict[str, Any], *, config: dict[str, Any], run: dict[str, Any], where) -> None:
    """CheckpointIncompatibleError naming every difference that would make resuming from ``state`` wrong."""
    where = os.fspath(where)
    if state.get("backend") != BACKEND:
        raise CheckpointIncompatibleError(f"checkpoint {where!r} was written by the {state.get('backend')!r} "
                                          f"backend; resume it with --backend {state.get('backend')}")
    check_resumable(state["config"], config, state["run"], run, where)
