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
masks from its own keys). The other way, ``to_torch`` turns this file into the state the torch trainer's
``load_checkpoint`` returns, so ``LongContextTrainer.fit(resume=<a JAX run folder>)`` continues it.
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
        # the newer of the two: a run resumed across backends writes the other's file beside the first
        found = [p / name for name in (FILENAME, TORCH_FILENAME) if (p / name).exists()]
        if found:
            return max(found, key=lambda f: f.stat().st_mtime_ns)
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


def to_torch(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """This trainer's checkpoint (verified) as the torch trainer's checkpoint state, for its resume.

    What maps one to one: the weights (canonical names are torch's ``state_dict`` names), AdamW's moments
    and step count (torch's two parameter groups: matrices, decayed, then the rest, in ``state_dict`` order),
    the step, the sampler state, the run settings. The LR schedule's position is rebuilt from the saved
    schedule (total steps, warmup) as torch's ``LambdaLR`` leaves it after that many steps. What does not:
    the RNG (the process's own states are kept: dropout masks come from another generator anyway), and the
    optimizer's kernel flags (fused on CUDA as the torch trainer sets them; ``memory_efficient_optimizer``
    runs are not told apart). The torch config's kernel section is the default one (``{"torch": {}}``): a
    torch run with other torch backend options is refused by name, as for any changed config field.
    """
    import torch

    from revnet_core.schedule import cosine_schedule
    from revnet_torch import checkpoint as torch_ckpt

    sections, state, where = load_checkpoint(path)
    if state.get("backend") != BACKEND:
        raise CheckpointIncompatibleError(f"{os.fspath(where)!r} was not written by the JAX trainer")
    schedule = state.get("schedule") or {}
    if schedule.get("steps") is None:
        raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r} predates the saved LR schedule; "
                                          "resume it with --backend jax")
    device = torch.device(map_location)

    def tensor(a):
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)

    model = {name: tensor(a) for name, a in sections["model"].items()}
    # torch numbers AdamW's state by position in its parameter groups, built in named_parameters order: take
    # that order from the torch model of this config, made on the meta device (no memory, no init).
    import revnet_core

    with torch.device("meta"):
        names = [n for n, _ in revnet_core.build("torch", **{k: v for k, v in state["model_config"].items()
                                                             if k != "backend_options"}).named_parameters()]
    if sorted(names) != sorted(model):
        raise CheckpointIncompatibleError(f"checkpoint {os.fspath(where)!r}: its weights are not the torch model's "
                                          "parameters of its config")
    decay = [k for k in names if model[k].dim() >= 2]
    order = decay + [k for k in names if k not in decay]
    step_count = torch.tensor(float(state["adam_step"]))  # torch keeps AdamW's step as a float32 CPU tensor
    opt_state = {i: {"step": step_count.clone(), "exp_avg": tensor(sections["optimizer/exp_avg"][name]),
                     "exp_avg_sq": tensor(sections["optimizer/exp_avg_sq"][name])}
                 for i, name in enumerate(order)}
    trainer = state["trainer"]
    lr, step = float(trainer["lr"]), int(state["step"])
    now = lr * cosine_schedule(int(schedule["warmup"]), int(schedule["steps"]), float(trainer["min_lr_ratio"]))(step)
    # Group hyperparameters as torch's AdamW writes them, from an optimizer over stand-in parameters.
    stand_in = [torch.nn.Parameter(torch.zeros(1, device=device)) for _ in range(2)]
    flags = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": [stand_in[0]], "weight_decay": float(trainer["weight_decay"])},
                             {"params": [stand_in[1]], "weight_decay": 0.0}], lr=lr,
                            betas=tuple(trainer["betas"]), **flags)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    groups = []
    for g, params in zip(opt.state_dict()["param_groups"], (range(len(decay)), range(len(decay), len(order)))):
        groups.append({**g, "lr": now, "initial_lr": lr, "params": list(params)})
    # LambdaLR after `step` steps: last_epoch counts them; the lambdas themselves come from the resuming fit.
    sched.last_epoch, sched._step_count, sched._last_lr = step, step + 1, [now, now]
    config = {k: v for k, v in state["model_config"].items() if k not in ("backend_options",)}
    config["backend_options"] = {"torch": {}}
    from revnet_core.resume import comparable_config

    return {"format": torch_ckpt.FORMAT, "backend": torch_ckpt.BACKEND, "converted_from": BACKEND,
            "model": model, "optimizer": {"state": opt_state, "param_groups": groups},
            "scheduler": sched.state_dict(), "rng": torch_ckpt.rng_state(), "data": state["data"], "step": step,
            "config": comparable_config(config), "model_config": config, "run": state["run"],
            "trainer": {**trainer, "optimizer": "adamw"}}
