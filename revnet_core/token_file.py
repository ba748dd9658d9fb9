"""Memory-mapped token files, framework-free: a corpus of any size as one flat binary file of token ids, read
by ``np.memmap`` so only the windows a batch draws are ever paged in.

A token file is two files: ``NAME`` (the ids back to back, native unsigned integers of the smallest width that
holds the vocabulary: uint8 up to 256, uint16 up to 65536, else uint32) and ``NAME.json`` (its header:
format, dtype, count, vocab_size, byteorder and the SHA-256 of ``NAME``'s bytes). Both are written to temporary
files and renamed into place, the data first, so a crash never leaves a header describing a partial file.

Make one from text files (UTF-8 bytes are the ids, vocab 256, as the embedded corpus)::

    python -m revnet_core.token_file my_texts/ --out data/tokens.bin

or from a tokenizer's ids: ``write_tokens("data/tokens.bin", chunks_of_ids, vocab_size=50257)``.
``token_data(path, seq_len, batch_size)`` turns one into a trainer's ``TrainingData``: random training windows
(``WindowSampler``) from the first part, fixed held-out windows from the last ``heldout_fraction``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import atomic
from .data import TrainingData, WindowSampler, _check_text, check_length, eval_windows, expand_paths
from .errors import DatasetUnavailableError, InputError

FORMAT = "revnet-zero-tokens-v1"
HEADER_SUFFIX = ".json"
HELDOUT_FRACTION = 0.05  # the last 5% of the tokens, as the embedded corpus holds out 5% of its files
_DTYPES = (("uint8", 2**8), ("uint16", 2**16), ("uint32", 2**32))
_SEPARATOR = b"\n"  # between text files, as in the embedded corpus
MAKE_HINT = ("make a token file locally: `python -m revnet_core.token_file TEXT_FILES_OR_FOLDERS --out "
             "tokens.bin` (UTF-8 bytes, vocab 256), or revnet_core.token_file.write_tokens('tokens.bin', ids, "
             "vocab_size=V) with your tokenizer's ids")


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ids 0 .. vocab_size - 1."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(f"vocab_size={vocab_size!r} must be a positive integer")
    for name, limit in _DTYPES:
        if vocab_size <= limit:
            return np.dtype(name)
    raise InputError(f"vocab_size={vocab_size} exceeds 2**32: token files hold uint32 ids at most")


def header_path(path: str | os.PathLike) -> Path:
    """Where the header of the token file ``path`` lives: ``path`` + ``.json``."""
    return Path(os.fspath(path) + HEADER_SUFFIX)


@dataclass(frozen=True)
class TokenFile:
    """An opened token file: ``tokens`` is a read-only ``np.memmap`` of shape (count,) in ``dtype``."""

    path: Path
    tokens: np.ndarray
    vocab_size: int
    sha256: str

    @property
    def count(self) -> int:
        return int(self.tokens.size)

    def identity(self) -> dict[str, Any]:
        """What a run must record about its data, and a resumed run must match (the path is left out)."""
        return {"source": "token-file", "sha256": self.sha256, "tokens": self.count, "vocab_size": self.vocab_size,
                "dtype": str(self.tokens.dtype)}


class TokenWriter:
    """Write a token file chunk by chunk: ``with TokenWriter(path, vocab_size) as w: w.write(ids)``. Each chunk
    is any 1-D integer array-like with ids in [0, vocab_size); nothing is kept in memory. The files appear
    only when the block ends without an error."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for(vocab_size)
        self.count = 0
        self._digest = hashlib.sha256()
        self._file = None
        self._stack = None

    def __enter__(self) -> "TokenWriter":
        import contextlib

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic.replacing(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        return self

    def write(self, ids: Any) -> None:
        """Append ``ids`` (T,) integers."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise InputError(f"token ids must be integers, got an array of dtype {arr.dtype}")
        if arr.ndim != 1:
            raise InputError(f"write takes one sequence of ids of shape (T,), got shape {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise InputError(f"ids in [{int(arr.min())}, {int(arr.max())}] lie outside the vocabulary "
                             f"[0, {self.vocab_size}); pass the tokenizer's vocab_size")
        raw = arr.astype(self.dtype).tobytes()
        self._file.write(raw)
        self._digest.update(raw)
        self.count += arr.size

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._file.close()
        if exc_type is None and self.count == 0:
            empty = InputError(f"no tokens were written to {os.fspath(self.path)!r}: a token file needs at least one")
            self._stack.__exit__(InputError, empty, None)  # removes the temporary file
            raise empty
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # removes the temporary file; the error goes on
            return False
        self._stack.__exit__(None, None, None)  # the data file is in place: now its header
        header = {"format": FORMAT, "dtype": self.dtype.name, "count": self.count, "vocab_size": self.vocab_size,
                  "byteorder": sys.byteorder, "sha256": self._digest.hexdigest()}
        hp = header_path(self.path)
        with atomic.replacing(hp) as tmp:
            tmp.write_text(json.dumps(header, indent=1) + "\n")
        return False


def write_tokens(path: str | os.PathLike, tokens: Any, vocab_size: int) -> TokenFile:
    """Write ``tokens`` (one 1-D integer array, or an iterable of such chunks) as a token file at ``path``;
    returns it opened."""
    with TokenWriter(path, vocab_size) as w:
        if isinstance(tokens, np.ndarray) and tokens.ndim == 1 or _is_flat_list(tokens):
            w.write(tokens)
        else:
            for chunk in tokens:
                w.write(chunk)
    return open_tokens(path)


def _is_flat_list(tokens: Any) -> bool:
    return isinstance(tokens, (list, tuple)) and (not tokens or isinstance(tokens[0], (int, np.integer)))


def text_to_token_file(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> TokenFile:
    """UTF-8 text files or folders (read one at a time, sorted, joined by a newline as the embedded corpus)
    as a byte-level token file (vocab 256)."""
    files = expand_paths(paths)
    with TokenWriter(out, 256) as w:
        for i, f in enumerate(files):
            blob = f.read_bytes()
            _check_text(f, blob)
            if i:
                w.write(np.frombuffer(_SEPARATOR, dtype=np.uint8))
            w.write(np.frombuffer(blob, dtype=np.uint8))
    return open_tokens(out)


def _read_header(path: Path) -> dict[str, Any]:
    hp = header_path(path)
    if not path.exists():
        raise DatasetUnavailableError(f"no token file at {os.fspath(path)!r}; {MAKE_HINT}")
    if not hp.exists():
        raise InputError(f"{os.fspath(path)!r} has no header {os.fspath(hp)!r}; it was not written by "
                         f"revnet_core.token_file (or its header was lost): {MAKE_HINT}")
    try:
        header = json.loads(hp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the token file header {os.fspath(hp)!r} is not valid JSON ({exc}); rewrite the file") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise InputError(f"{os.fspath(hp)!r} is not a token file header (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in ("dtype", "count", "vocab_size", "sha256") if k not in header]
    if missing:
        raise InputError(f"the token file header {os.fspath(hp)!r} lacks {missing}; rewrite the file")
    return header


def open_tokens(path: str | os.PathLike, verify: bool = False) -> TokenFile:
    """Map the token file ``path`` read-only, without reading it. Its size must be exactly count x itemsize and
    its dtype must hold the vocabulary; ``verify=True`` also reads it once to check the SHA-256 and the id range.
    Raises DatasetUnavailableError (missing) or InputError (truncated, too long, mismatched, damaged)."""
    path = Path(path)
    header = _read_header(path)
    where = os.fspath(path)
    names = [n for n, _ in _DTYPES]
    if header["dtype"] not in names:
        raise InputError(f"{where!r}: header dtype {header['dtype']!r} is not one of {names}")
    dtype = np.dtype(header["dtype"])
    count, vocab = header["count"], header["vocab_size"]
    if not isinstance(count, int) or count < 1 or not isinstance(vocab, int) or vocab < 1:
        raise InputError(f"{where!r}: header count={count!r} and vocab_size={vocab!r} must be positive integers")
    if vocab > 2 ** (8 * dtype.itemsize):
        raise InputError(f"{where!r}: header dtype {dtype.name} cannot hold vocab_size={vocab} (mismatched header); "
                         "rewrite the file")
    if header.get("byteorder", sys.byteorder) != sys.byteorder and dtype.itemsize > 1:
        raise InputError(f"{where!r} was written on a {header['byteorder']}-endian machine; this one is "
                         f"{sys.byteorder}-endian: rewrite it here")
    size, expected = path.stat().st_size, count * dtype.itemsize
    if size < expected:
        raise InputError(f"{where!r} is truncated: {size:,} bytes, its header says {count:,} {dtype.name} tokens "
                         f"({expected:,} bytes); a write or copy was cut short, rewrite it")
    if size > expected:
        raise InputError(f"{where!r} holds {size:,} bytes but its header says {count:,} {dtype.name} tokens "
                         f"({expected:,} bytes): the header does not belong to this file; rewrite it")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    tf = TokenFile(path, tokens, vocab, header["sha256"])
    if verify:
        check_contents(tf)
    return tf


def check_contents(tf: TokenFile, block: int = 1 << 24) -> None:
    """Read ``tf`` once, in blocks: InputError if its bytes fail the header's SHA-256 or an id is >= vocab."""
    digest = hashlib.sha256()
    highest = 0
    for start in range(0, tf.count, block):
        part = np.asarray(tf.tokens[start:start + block])
        digest.update(part.tobytes())
        highest = max(highest, int(part.max()))
    if digest.hexdigest() != tf.sha256:
        raise InputError(f"{os.fspath(tf.path)!r} fails its SHA-256 check: the file was changed after it was "
                         "written; rewrite it")
    if highest >= tf.vocab_size:
        raise InputError(f"{os.fspath(tf.path)!r} holds id {highest}, outside its vocabulary [0, {tf.vocab_size})")


def split(tf: TokenFile, seq_len: int, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) views of the memmap (no copy): the last ``heldout_fraction`` of the tokens, at least
    one window of ``seq_len``, are held out. InputError unless both parts hold a window."""
    if not 0 < heldout_fraction < 1:
        raise InputError(f"heldout_fraction={heldout_fraction!r} must lie in (0, 1)")
    check_length(tf.tokens, seq_len, f"token file {os.fspath(tf.path)!r}")
    held = max(seq_len, math.ceil(tf.count * heldout_fraction))
    train, heldout = tf.tokens[:tf.count - held], tf.tokens[tf.count - held:]
    check_length(train, seq_len, f"training part of {os.fspath(tf.path)!r} (after holding out {held:,} tokens)")
    return train, heldout


def token_data(source: str | os.PathLike | TokenFile, seq_len: int, batch_size: int, seed: int = 0,
               heldout_fraction: float = HELDOUT_FRACTION, eval_windows_max: int = 64,
               eval_batch_size: int | None = None) -> TrainingData:
    """Language modelling on a token file: random training windows of ``seq_len`` (``WindowSampler`` over the
    memmap, so a window is read only when drawn), fixed held-out windows. ``units`` is "bytes" for a
    vocabulary of 256 (bits per byte), else "tokens"."""
    tf = source if isinstance(source, TokenFile) else open_tokens(source)
    train, heldout = split(tf, seq_len, heldout_fraction)
    sampler = WindowSampler(train, seq_len, batch_size, seed)
    evals = eval_windows(heldout, seq_len, eval_windows_max, eval_batch_size or batch_size)
    identity = {"task": "lm", **tf.identity(), "heldout_tokens": int(heldout.size)}
    units = "bytes" if tf.vocab_size == 256 else "tokens"
    return TrainingData(sampler, evals, identity, units, "lm", seq_len, batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m revnet_core.token_file TEXT... --out FILE``: text files or folders to a byte token file."""
    parser = argparse.ArgumentParser(prog="python -m revnet_core.token_file", description=main.__doc__)
    parser.add_argument("paths", nargs="+", help="UTF-8 text files or folders (recursively)")
    parser.add_argument("--out", required=True, help="the token file to write (its header goes to OUT.json)")
    args = parser.parse_args(argv)
    tf = text_to_token_file(args.paths, args.out)
    print(f"wrote {tf.count:,} tokens ({tf.tokens.dtype}, vocab {tf.vocab_size}) to {os.fspath(tf.path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
