"""Training data, framework-free: the embedded byte corpus, user files, seeded window sampling, and a user's
datasets (cut to length, padded, drawn in seeded epochs).

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
from typing import Any, Callable, Iterable, Protocol, Sequence

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
    return ByteCorpus(train, heldout, "python-stdlib", len(files), n_held, _corpus_hash(train, heldout))


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
    return ByteCorpus(train, heldout, "files", len(files), n_held, _corpus_hash(train, heldout))


# --- sampling ------------------------------------------------------------------------------------------
Batch = tuple[np.ndarray, "np.ndarray | None"]  # ids (B, T) int64, labels (B, T) int64 or None (= ids)
Piece = tuple[np.ndarray, "np.ndarray | None"]  # one sequence: ids (T,) int64, labels (T,) int64 or None


class Sampler(Protocol):
    """What a trainer draws training batches from; its state makes a resumed run draw the same batches."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def new_generator(seed: int) -> np.random.Generator:
    """A numpy Generator whose whole state is ``bit_generator.state`` (a dict of ints: checkpointable)."""
    return np.random.Generator(np.random.PCG64(seed))


class SeededSampler:
    """The state every built-in sampler shares: a seeded Generator and the count of batches drawn, saved
    under the sampler's ``kind`` so a checkpoint from another kind of data is refused."""

    kind = ""

    def __init__(self, batch_size: int, seed: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer")
        self.batch_size = batch_size
        self.rng = new_generator(seed)
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rng": self.rng.bit_generator.state, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise InputError(f"sampler state of kind {state.get('kind')!r} does not fit a {self.kind} sampler")
        self.rng.bit_generator.state = state["rng"]
        self.batches = int(state.get("batches", 0))  # epoch states saved before they counted batches lack it


class WindowSampler(SeededSampler):
    """Random contiguous windows of ``seq_len`` tokens, ``batch_size`` per batch, from a seeded Generator."""

    kind = "windows"

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, what: str = "training data"):
        check_length(tokens, seq_len, what)
        super().__init__(batch_size, seed)
        self.tokens = tokens
        self.seq_len = seq_len

    def next_batch(self) -> Batch:
        starts = self.rng.integers(0, self.tokens.size - self.seq_len + 1, size=self.batch_size)
        ids = np.stack([self.tokens[s:s + self.seq_len] for s in starts]).astype(np.int64)  # (B, T)
        self.batches += 1
        return ids, None


class EpochSampler(SeededSampler):
    """Batches from a list of pieces in a fresh seeded shuffle each epoch, padded by ``collate``; the state
    also holds the order and the position in it."""

    kind = "epochs"

    def __init__(self, pieces: Sequence[Piece], batch_size: int, seed: int = 0):
        super().__init__(batch_size, seed)
        self.pieces = pieces
        self.order = self.rng.permutation(len(pieces)).tolist()
        self.pos = self.epoch = 0

    def next_batch(self) -> Batch:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.pos == len(self.order):  # next epoch, newly shuffled
                self.order = self.rng.permutation(len(self.pieces)).tolist()
                self.pos, self.epoch = 0, self.epoch + 1
            chosen.append(self.pieces[self.order[self.pos]])
            self.pos += 1
        self.batches += 1
        return collate(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order": list(self.order), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("order", ())) != len(self.pieces):
            raise InputError("the saved sampler state does not fit this dataset")
        super().load_state_dict(state)
        self.order, self.pos, self.epoch = list(state["order"]), int(state["pos"]), int(state["epoch"])


def collate(pieces: Sequence[Piece]) -> Batch:
    """Right-pad to the longest piece: ids with 0, labels with IGNORE_INDEX (padding gets no loss, and causal
    attention keeps real tokens from seeing it). -> ids (B, T), labels (B, T) or None when nothing is padded."""
    T = max(p[0].size for p in pieces)
    if all(p[0].size == T and p[1] is None for p in pieces):
        return np.stack([p[0] for p in pieces]), None
    ids = np.zeros((len(pieces), T), dtype=np.int64)
    labels = np.full((len(pieces), T), IGNORE_INDEX, dtype=np.int64)
    for row, (x, lab) in enumerate(pieces):
        ids[row, :x.size] = x
        labels[row, :x.size] = x if lab is None else lab
    return ids, labels


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


# --- a user's datasets (``trainer.train(train_dataset, eval_dataset)``) ---------------------------------------
def _as_ids(item: Any, where: str, vocab_size: int, to_numpy: Callable[[Any], Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One dataset item -> (ids (T,) int64, labels (T,) or None, units)."""
    labels = None
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise InputError(f"{where} is a dict without 'input_ids' (keys: {sorted(item)})")
        item, labels = item["input_ids"], item.get("labels")
    if isinstance(item, str):
        if vocab_size < 256:
            raise InputError(f"{where} is text, which is byte-tokenised (ids 0..255), but the model's "
                             f"vocab_size is {vocab_size}")
        item = item.encode("utf-8")
    if isinstance(item, (bytes, bytearray)):
        return np.frombuffer(bytes(item), dtype=np.uint8).astype(np.int64), None, "bytes"
    arr = _int_array(item, where, to_numpy)
    lab = None if labels is None else _int_array(labels, f"{where} labels", to_numpy)
    if lab is not None and lab.shape != arr.shape:
        raise InputError(f"{where}: labels shape {lab.shape} must match input_ids shape {arr.shape}")
    return arr, lab, "tokens"


def _int_array(value: Any, where: str, to_numpy: Callable[[Any], Any]) -> np.ndarray:
    arr = np.asarray(to_numpy(value))
    if arr.dtype.kind not in "iu":
        raise InputError(f"{where} must hold integer token ids (an integer tensor, array or list) or a text, "
                         f"got {type(value).__name__} of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InputError(f"{where} must be one sequence of shape (T,), got shape {arr.shape}")
    return arr.astype(np.int64)


def dataset_sequences(dataset: Any, max_length: int, vocab_size: int, what: str,
                      to_numpy: Callable[[Any], Any] = np.asarray) -> tuple[list[Piece], str, str]:
    """Sequences of at most ``max_length`` tokens from a Dataset (or any sequence) of token-id arrays or dicts
    with ``input_ids``/``labels``, or a list of texts (UTF-8 bytes). Longer items are cut into consecutive
    pieces; pieces of one token (no next-token target) are dropped. ``to_numpy`` turns a framework's tensor
    into something ``np.asarray`` reads (torch: any device, detached). -> (pieces, units, sha256)."""
    try:
        n = len(dataset)
    except TypeError:
        raise InputError(f"{what} must support len() and indexing (a Dataset or a list), got "
                         f"{type(dataset).__name__}") from None
    if isinstance(dataset, (str, bytes)):
        raise InputError(f"{what} must be a list of texts or a dataset of token-id tensors, not one {type(dataset).__name__}")
    pieces: list[Piece] = []
    units_seen = set()
    digest = hashlib.sha256()
    for i in range(n):
        ids, labels, units = _as_ids(dataset[i], f"{what}[{i}]", vocab_size, to_numpy)
        units_seen.add(units)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"{what}[{i}] holds ids in [{ids.min()}, {ids.max()}], outside the model's "
                             f"vocabulary [0, {vocab_size})")
        for start in range(0, ids.size, max_length):
            piece = ids[start:start + max_length]
            if piece.size < 2:
                continue
            lab = None if labels is None else labels[start:start + max_length]
            pieces.append((piece, lab))
            digest.update(piece.tobytes())
            digest.update(b"\0" if lab is None else lab.tobytes())
    if not pieces:
        raise InputError(f"{what} is empty: no item holds two or more tokens")
    units = "bytes" if units_seen == {"bytes"} else "tokens"
    return pieces, units, digest.hexdigest()


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


def dataset_data(train_dataset: Any, eval_dataset: Any, max_length: int, vocab_size: int, batch_size: int,
                 seed: int = 0, to_numpy: Callable[[Any], Any] = np.asarray) -> TrainingData:
    """A user's datasets as a trainer's data (see ``dataset_sequences``): the training pieces in seeded
    epochs, the held-out ones in fixed padded batches; ``identity["pieces"]`` counts the training pieces."""
    pieces, units, sha = dataset_sequences(train_dataset, max_length, vocab_size, "train_dataset", to_numpy)
    sampler = EpochSampler(pieces, batch_size, seed)
    evals: list[Batch] = []
    if eval_dataset is not None:
        held, _, _ = dataset_sequences(eval_dataset, max_length, vocab_size, "eval_dataset", to_numpy)
        evals = [collate(held[i:i + batch_size]) for i in range(0, len(held), batch_size)]
    identity = {"task": "dataset", "source": "user-dataset", "sha256": sha, "pieces": len(pieces)}
    seq_len = max(p[0].size for p in pieces)
    return TrainingData(sampler, evals, identity, units, "dataset", seq_len, batch_size)


def eval_record(nats: float, count: int, units: str, exact: int = 0, right: int = 0, rows: int = 0) -> dict[str, float]:
    """A held-out evaluation as every trainer logs it: ``nats`` summed over ``count`` targets -> eval_loss and
    bits per byte (``units`` "bytes") or per token; with labelled ``rows``, the share of sequences answered
    exactly (``exact``) and of target tokens right (``right``)."""
    loss = nats / max(1, count)
    result = {"eval_loss": loss, f"eval_bits_per_{'byte' if units == 'bytes' else 'token'}": bits(loss)}
    if rows:
        result["eval_accuracy"] = exact / rows
        result["eval_token_accuracy"] = right / max(1, count)
    return result


def bits(nats: float) -> float:
    """Nats per token to bits per token (bits per byte for byte-level data)."""
    return nats / math.log(2)
