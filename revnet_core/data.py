"""Byte-level training data, framework-free: the embedded corpus, user files, and seeded window sampling.

The embedded default corpus is the running Python's own standard library: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, minus third-party and test code (``site-packages``, ``dist-packages``,
folders named ``test``/``tests``/``idle_test`` or starting with ``test``, files named ``test_*.py``) so its
size and content depend on the Python version alone. Files are read in sorted order of their relative path
and joined with a newline; tokens are bytes (vocab 256, no tokenizer). Every 20th file is held out for
evaluation. Because the corpus changes with the Python version, every result records ``python_version`` and
the corpus ``sha256`` (over the training and held-out bytes).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from .errors import InputError

HELDOUT_EVERY = 20  # every 20th file (5%) is held out
IGNORE_INDEX = -100  # label value with no loss: the same convention as torch's cross-entropy
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_SEPARATOR = b"\n"


@dataclass(frozen=True)
class ByteCorpus:
    """Training and held-out bytes (uint8 arrays) and where they came from."""

    train: np.ndarray
    heldout: np.ndarray
    source: str  # "python-stdlib" or "files"
    files: int
    heldout_files: int
    sha256: str
    python_version: str = field(default_factory=platform.python_version)
    roots: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What a result must record about its data (and what a resumed run must match)."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "python_version": self.python_version,
            "files": self.files,
            "heldout_files": self.heldout_files,
            "train_bytes": int(self.train.size),
            "heldout_bytes": int(self.heldout.size),
        }


def _corpus_hash(train: np.ndarray, heldout: np.ndarray) -> str:
    # Paths are left out: the same bytes split the same way are the same data wherever they live.
    h = hashlib.sha256()
    h.update(b"train\0")
    h.update(train.tobytes())
    h.update(b"\0heldout\0")
    h.update(heldout.tobytes())
    return h.hexdigest()


def _split(blobs: Sequence[bytes], heldout_every: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Held out by file (every ``heldout_every``-th); with fewer files than that, the last 1/heldout_every
    of the bytes instead, so one large file still gets an evaluation split."""
    if len(blobs) >= heldout_every:
        held = [b for i, b in enumerate(blobs) if i % heldout_every == heldout_every - 1]
        kept = [b for i, b in enumerate(blobs) if i % heldout_every != heldout_every - 1]
        return _join(kept), _join(held), len(held)
    everything = _join(blobs)
    cut = len(everything) - max(1, len(everything) // heldout_every)
    return everything[:cut], everything[cut:], 0


def _join(blobs: Sequence[bytes]) -> np.ndarray:
    return np.frombuffer(_SEPARATOR.join(blobs), dtype=np.uint8)  # read-only: cached corpora are shared


def stdlib_files() -> list[Path]:
    """The embedded corpus's files, sorted by path relative to the standard library root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def stdlib_corpus(heldout_every: int = HELDOUT_EVERY) -> ByteCorpus:
    """The embedded default corpus: this Python's standard library sources (see the module docstring)."""
    files = stdlib_files()
    if not files:
        raise InputError(f"no standard library sources found under {sysconfig.get_paths()['stdlib']!r}; "
                         "pass --data PATH with your own text files")
    blobs = [p.read_bytes() for p in files]
    train, heldout, n_held = _split(blobs, heldout_every)
    return ByteCorpus(train, heldout, "python-stdlib", len(files), n_held, _corpus_hash(train, heldout),
                      roots=(sysconfig.get_paths()["stdlib"],))


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly plus every file under named folders (recursively, hidden ones skipped), sorted
    and deduplicated. Missing paths and folders with no files raise InputError."""
    found: set[Path] = set()
    paths = list(paths)
    if not paths:
        raise InputError("no data paths given")
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"data path {os.fspath(raw)!r} does not exist")
        if p.is_dir():
            inside = [f for f in p.rglob("*") if f.is_file() and not _is_hidden(f, p)]
            if not inside:
                raise InputError(f"data folder {os.fspath(raw)!r} contains no files")
            found.update(f.resolve() for f in inside)
        elif p.is_file():
            found.add(p.resolve())
        else:
            raise InputError(f"data path {os.fspath(raw)!r} is neither a file nor a folder")
    return sorted(found, key=lambda f: f.as_posix())


def _check_text(path: Path, blob: bytes) -> None:
    # A NUL byte never occurs in text; invalid UTF-8 means binary or a legacy encoding we would misread.
    if b"\0" in blob:
        raise InputError(f"{os.fspath(path)!r} is not a text file (it contains NUL bytes); pass UTF-8 text files only")
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{os.fspath(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "pass UTF-8 text files only") from None


def file_corpus(paths: Iterable[str | os.PathLike], heldout_every: int = HELDOUT_EVERY) -> ByteCorpus:
    """A corpus from the user's UTF-8 text files or folders (``--data PATH...``), split like the default."""
    paths = list(paths)
    files = expand_paths(paths)
    blobs = []
    for f in files:
        blob = f.read_bytes()
        _check_text(f, blob)
        blobs.append(blob)
    if sum(len(b) for b in blobs) == 0:
        raise InputError(f"the data is empty: {len(files)} file(s) under {[os.fspath(p) for p in paths]} hold no bytes")
    train, heldout, n_held = _split([b for b in blobs if b], heldout_every)
    return ByteCorpus(train, heldout, "files", len(files), n_held, _corpus_hash(train, heldout),
                      roots=tuple(os.fspath(p) for p in paths))


# --- sampling ------------------------------------------------------------------------------------------
Batch = tuple[np.ndarray, "np.ndarray | None"]  # ids (B, T) int64, labels (B, T) int64 or None (= ids)


class Sampler(Protocol):
    """What a trainer draws training batches from; its state makes a resumed run draw the same batches."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def new_generator(seed: int) -> np.random.Generator:
    """A numpy Generator whose whole state is ``bit_generator.state`` (a dict of ints: checkpointable)."""
    return np.random.Generator(np.random.PCG64(seed))


class WindowSampler:
    """Random contiguous windows of ``seq_len`` tokens, ``batch_size`` per batch, from a seeded Generator."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, what: str = "training data"):
        check_length(tokens, seq_len, what)
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be a positive integer")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rng = new_generator(seed)
        self.batches = 0

    def next_batch(self) -> Batch:
        starts = self.rng.integers(0, self.tokens.size - self.seq_len + 1, size=self.batch_size)
        ids = np.stack([self.tokens[s:s + self.seq_len] for s in starts]).astype(np.int64)  # (B, T)
        self.batches += 1
        return ids, None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "windows", "rng": self.rng.bit_generator.state, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "windows":
            raise InputError(f"sampler state of kind {state.get('kind')!r} does not fit a window sampler")
        self.rng.bit_generator.state = state["rng"]
        self.batches = int(state["batches"])


def check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    """InputError unless ``tokens`` holds at least one window of ``seq_len``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"seq_len={seq_len!r} must be an integer >= 2 (next-token loss needs two tokens)")
    if tokens.size < seq_len:
        raise InputError(f"seq_len={seq_len} is larger than the {what} ({tokens.size} bytes); "
                         "use a shorter --seq-len or more data")


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int, batch_size: int) -> list[Batch]:
    """Fixed held-out batches: up to ``max_windows`` windows spread evenly over ``tokens`` (non-overlapping
    when they fit), in batches of ``batch_size``. Deterministic, so every run and every model sees the same."""
    check_length(tokens, seq_len, "held-out data")
    n = max(1, min(max_windows, tokens.size // seq_len))
    stride = tokens.size // n  # >= seq_len, so windows never overlap
    starts = [i * stride for i in range(n)]
    windows = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)
    return [(windows[i:i + batch_size], None) for i in range(0, n, batch_size)]


@dataclass
class TrainingData:
    """Everything a trainer needs about its data, framework-free.

    ``units`` says what a token is: "bytes" makes the eval report bits per byte; ``identity`` is recorded with
    every result and must match when a run is resumed.
    """

    sampler: Sampler
    eval_batches: list[Batch]
    identity: dict[str, Any]
    units: str = "bytes"
    task: str = "lm"
    seq_len: int = 0
    batch_size: int = 0


def lm_data(corpus: ByteCorpus, seq_len: int, batch_size: int, seed: int = 0, eval_windows_max: int = 64,
            eval_batch_size: int | None = None) -> TrainingData:
    """Byte-level language modelling on ``corpus``: random training windows, fixed held-out windows."""
    check_length(corpus.train, seq_len, "training data")
    check_length(corpus.heldout, seq_len, "held-out data")
    sampler = WindowSampler(corpus.train, seq_len, batch_size, seed)
    evals = eval_windows(corpus.heldout, seq_len, eval_windows_max, eval_batch_size or batch_size)
    return TrainingData(sampler, evals, {"task": "lm", **corpus.identity()}, "bytes", "lm", seq_len, batch_size)


def bits(nats: float) -> float:
    """Nats per token to bits per token (bits per byte for byte-level data)."""
    return nats / math.log(2)
