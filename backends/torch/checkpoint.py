"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer and LR-scheduler states, every RNG state (Python, numpy, torch CPU,
CUDA when present), the data sampler's state, the step, the model config, the run settings that must not
change across a resume, and the backend name. It is written to a temporary file in the same folder, synced,
then renamed over the old one (``os.replace`` is atomic within a file system): a crash mid-write leaves the
last good checkpoint intact, and the next save removes the temp file it left. SIGINT is held while a file is
written and delivered once it is complete. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.

Integrity: the payload carries a SHA-256 of every tensor and of every section's other values
(``checksums``), and the zip's comment carries the SHA-256 of the file itself, so any changed byte is
found. A damaged file names the part that fails; corrupt, truncated, refused (pickled code) and
incompatible files raise distinct ``CheckpointError`` subclasses. Files written before checksums (format
v1) still load, with a warning that they were not verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickletools
import random
import re
import signal
import struct
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revnet_core.errors import (CheckpointCorruptError, CheckpointError, CheckpointIncompatibleError,  # noqa: F401
                                 CheckpointTruncatedError, CheckpointUnsafeError)  # (re-exported: users catch them here)
from revnet_core import atomic
from revnet_core.resume import check_resumable

FORMAT = "revnet-zero-checkpoint-v2"  # v2: checksummed
UNVERIFIED_FORMATS = ("revnet-zero-checkpoint-v1",)  # loadable, with a warning: written before checksums
BACKEND = "torch"
FILENAME = "checkpoint.pt"
_FILE_TAG = b"revnet-sha256:"  # zip comment: the tag, then the hex SHA-256 of the file as torch wrote it
_EOCD = struct.Struct("<4s4H2LH")  # zip end-of-central-directory record; its last field is the comment length
# Seconds to sleep inside a save, with SIGINT held: lets a test land a signal in the middle of one.
TEST_DELAY_ENV = "REVNET_TEST_SAVE_DELAY"


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


@contextlib.contextmanager
def deferred_sigint():
    """Hold SIGINT (Ctrl-C, any number of times) until the block ends, then hand each one to the handler that
    was in place, so a file being written is always finished first. Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    pending: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for frame in pending:
            if callable(previous):
                previous(signal.SIGINT, frame)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files of ``path`` that crashed saves left (their process is gone); returns them."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag, backend and checksums) atomically to ``path``; returns the path.
    SIGINT is held until the file is complete (``deferred_sigint``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "backend": BACKEND, **state}
    payload["checksums"] = checksums(payload)
    with deferred_sigint():
        remove_stale_temps(path)
        with atomic.replacing(path) as tmp, open(tmp, "w+b") as f:
            torch.save(payload, f)
            _seal(f)
            delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
            if delay:
                time.sleep(delay)
    return path


# --- checksums ---------------------------------------------------------------------------------------------
def checksums(payload: dict[str, Any]) -> dict[str, str]:
    """SHA-256 hex digests: one per tensor (``"model/layers.0.attn.qkv.weight"``) and one per top-level section
    over its other values and its tensors' digests (``"step"``, ``"rng"``, ...)."""
    out: dict[str, str] = {}
    for key in sorted(payload):
        if key != "checksums":
            section = hashlib.sha256()
            _feed(section, payload[key], key, out)
            out[key] = section.hexdigest()
    return out


def _feed(h, value: Any, where: str, out: dict[str, str]) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        out[where] = digest.hexdigest()
        h.update(f"T{out[where]};".encode())
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k in sorted(value, key=repr):
            h.update(f"{k!r}:".encode())
            _feed(h, value[k], f"{where}/{k}", out)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)};".encode())
        for i, v in enumerate(value):
            _feed(h, v, f"{where}/{i}", out)
    else:  # str, int, float (repr round-trips exactly), bool, None
        h.update(f"{type(value).__name__}:{value!r};".encode())


def _seal(f) -> None:
    """Put the SHA-256 of the file torch just wrote into its zip comment (empty until now)."""
    f.seek(0)
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 24), b""):
        digest.update(block)
    f.seek(-_EOCD.size, os.SEEK_END)
    *fields, comment_len = _EOCD.unpack(f.read(_EOCD.size))
    if fields[0] != b"PK\x05\x06" or comment_len:
        raise CheckpointError("torch.save wrote no plain zip end record; cannot seal the checkpoint")
    comment = _FILE_TAG + digest.hexdigest().encode()
    f.seek(-2, os.SEEK_END)
    f.write(struct.pack("<H", len(comment)) + comment)


def _file_digest(p: Path) -> tuple[str | None, str]:
    """(the SHA-256 the file's comment states or None, the SHA-256 of the file without that comment)."""
    comment_size = _EOCD.size + len(_FILE_TAG) + 64
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size < comment_size:
            return None, ""
        f.seek(size - comment_size)
        tail = f.read()
        record, stated = tail[:_EOCD.size], tail[_EOCD.size:]
        if not stated.startswith(_FILE_TAG) or record[:4] != b"PK\x05\x06":
            return None, ""
        f.seek(0)
        digest, left = hashlib.sha256(), size - comment_size
        while left > 0:
            block = f.read(min(left, 1 << 24))
            digest.update(block)
            left -= len(block)
        digest.update(record[:-2] + b"\x00\x00")  # as torch wrote it: no comment
        return stated[len(_FILE_TAG):].decode("ascii", "replace"), digest.hexdigest()


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path or a run folder (``DIR/checkpoint.pt``)."""
    p = Path(path)
    if p.is_dir():
        # The JAX trainer's file (load_checkpoint converts it) when it is the folder's newer checkpoint: a run
        # resumed across backends writes the other's file beside the first.
        jax_file, own = p / "checkpoint.safetensors", p / FILENAME
        newer = jax_file.exists() and (not own.exists() or jax_file.stat().st_mtime_ns > own.stat().st_mtime_ns)
        p = jax_file if newer else own
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {os.fspath(p)!r}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint. Raises CheckpointTruncatedError, CheckpointCorruptError (naming the part
    that fails its checksum), CheckpointUnsafeError (pickled code) or CheckpointIncompatibleError."""
    p = resolve(path)
    if p.suffix == ".safetensors":  # a JAX trainer's checkpoint, verified and converted by its own backend
        from revnet_jax.checkpoint import to_torch

        return to_torch(p, map_location)
    where = os.fspath(p)
    stated, actual = _file_digest(p)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zips and bad pickles
        raise _read_error(p, exc) from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *UNVERIFIED_FORMATS):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointIncompatibleError(f"{where!r} is not a RevNet-Zero training checkpoint (format {found!r}, "
                                          f"expected {FORMAT!r})")
    if state["format"] == FORMAT:
        _verify(state, stated, actual, where)
    else:
        warnings.warn(f"checkpoint {where!r} ({state['format']}) was written before checkpoints carried checksums; "
                      "it was loaded unverified (the next save adds them)", stacklevel=2)
    missing = [k for k in ("backend", "model", "optimizer", "scheduler", "rng", "data", "step", "config", "run")
               if k not in state]
    if missing:
        raise CheckpointIncompatibleError(f"checkpoint {where!r} is incomplete: missing {missing}")
    return state


def _verify(state: dict[str, Any], stated: str | None, actual: str, where: str) -> None:
    saved = state.pop("checksums", None)
    if not isinstance(saved, dict):
        raise CheckpointCorruptError(f"checkpoint {where!r} is damaged: its checksums are missing or unreadable")
    now = checksums(state)
    bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    tensors = [k for k in bad if "/" in k]
    if bad:
        part = f"tensor {tensors[0]!r}" if tensors else f"section {bad[0]!r}"
        more = f" (and {len(bad) - 1} more checksums)" if len(bad) > 1 else ""
        raise CheckpointCorruptError(f"checkpoint {where!r} is damaged: {part} fails its SHA-256 check{more}; "
                                     "restore it from a copy or start a new run")
    if stated != actual:
        raise CheckpointCorruptError(f"checkpoint {where!r} is damaged: the file fails its SHA-256 check outside "
                                     "the tensors (archive records or the stated checksum); restore it from a copy")


def _read_error(p: Path, exc: Exception) -> CheckpointError:
    """The named error for a file torch could not load; never torch's advice to load it unsafely."""
    where = os.fspath(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - (1 << 16) - _EOCD.size))
        tail = f.read()
    if size == 0 or head == b"PK\x03\x04" and b"PK\x05\x06" not in tail:
        return CheckpointTruncatedError(f"checkpoint {where!r} is truncated ({size:,} bytes, the archive's end "
                                        "is missing): a write or copy was cut short; restore it from a copy")
    refused = _pickled_code(p)
    if refused:
        return CheckpointUnsafeError(f"checkpoint {where!r} was refused: it holds pickled code or objects "
                                     f"({', '.join(refused[:3])}) that a RevNet-Zero checkpoint never contains. It "
                                     "was not loaded; do not load it unsafely unless you wrote it yourself")
    # torch's own wording ends with advice to load unsafely, wrong for a damaged file: keep its first sentence
    # (or the unpickler's reason).
    text = str(exc).partition("WeightsUnpickler error:")[2] or str(exc)
    detail = re.sub(r"\s+", " ", text).strip().split(". ")[0][:120] or type(exc).__name__
    return CheckpointCorruptError(f"checkpoint {where!r} is corrupt and cannot be read ({detail}); restore it "
                                  "from a copy or start a new run")


_SAFE_MODULES = ("torch", "collections", "_codecs")  # what torch.save itself writes into a checkpoint's pickle


def _pickled_code(p: Path) -> list[str]:
    """The globals a file's pickle would import from outside torch (read with pickletools, nothing run);
    empty if none or if the pickle cannot be parsed (then it is corrupt, not unsafe)."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = p.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return [g for g in found if g.partition(".")[0] not in _SAFE_MODULES]
    except Exception:  # a pickle that does not parse is corrupt, and the caller says so
        return []


def check_compatible(state: dict[str, Any], *, backend: str, model_class: str, config: dict[str, Any],
                     run: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """CheckpointError naming every difference that would make resuming from ``state`` wrong."""
    where = os.fspath(path)
    if state["backend"] != backend:
        raise CheckpointIncompatibleError(f"checkpoint {where!r} was written by the {state['backend']!r} backend; this run "
                              f"uses {backend!r}. Resume with --backend {state['backend']}")
    if state.get("model_class", model_class) != model_class:
        raise CheckpointIncompatibleError(f"checkpoint {where!r} holds a {state['model_class']} model; this run builds a "
                              f"{model_class}")
    check_resumable(state["config"], config, state["run"], run, where)


