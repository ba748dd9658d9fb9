"""Synthetic long-range tasks, framework-free (numpy), byte-level like the corpus.

Passkey retrieval: a random digit key is stated once at a random depth inside long filler text and asked for
at the very end. Only the answer bytes carry a loss, so a model scores well only if it carries the key across
the whole sequence: the filler is periodic and predicts nothing about the key.

    ...The grass is green. The sky is blue. [The pass key is 48213. Remember it. 48213 is the pass key.] The
    sun is yellow. ... What is the pass key? The pass key is 48213
"""

from __future__ import annotations

import hashlib

import numpy as np

from .data import IGNORE_INDEX, Batch, SeededSampler, TrainingData, new_generator
from .errors import InputError

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = b" What is the pass key? The pass key is "
EVAL_SEED = 10_000_019  # held-out samples: one fixed stream for every run, apart from the training seeds


def _needle(key: bytes) -> bytes:
    return b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "


class PasskeyTask(SeededSampler):
    """Samples of exactly ``seq_len`` bytes with a ``digits``-digit key; labels are ``IGNORE_INDEX`` except on
    the answer (the last ``digits`` bytes). Also a training sampler: ``next_batch``/``state_dict``."""

    kind = "passkey"

    def __init__(self, seq_len: int, batch_size: int = 1, seed: int = 0, digits: int = 5):
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 32:
            raise InputError(f"digits={digits!r} must be an integer in [1, 32]")
        self.digits = digits
        need = self.min_seq_len(digits)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < need:
            raise InputError(f"the passkey task needs seq_len >= {need} (needle, question and a {digits}-digit "
                             f"answer), got {seq_len!r}")
        super().__init__(batch_size, seed)
        self.seq_len = seq_len

    @staticmethod
    def min_seq_len(digits: int = 5) -> int:
        """The shortest sequence that holds the needle, the question and the answer."""
        return len(_needle(b"0" * digits)) + len(QUESTION) + digits

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One (ids (T,), labels (T,), depth) with the needle starting at byte ``depth``."""
        key = bytes(rng.integers(ord("0"), ord("9") + 1, size=self.digits).astype(np.uint8))
        needle = _needle(key)
        budget = self.seq_len - len(needle) - len(QUESTION) - self.digits  # filler bytes in all
        depth = int(rng.integers(0, budget + 1))
        phase = int(rng.integers(0, len(FILLER)))  # where in the filler's cycle the text starts
        reps = (phase + budget) // len(FILLER) + 1
        filler = (FILLER * reps)[phase:phase + budget]
        text = filler[:depth] + needle + filler[depth:] + QUESTION + key
        ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[-self.digits:] = ids[-self.digits:]
        return ids, labels, depth

    def _batch(self, rng: np.random.Generator, n: int) -> Batch:
        samples = [self.sample(rng) for _ in range(n)]
        return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])  # (B, T) each

    def next_batch(self) -> Batch:
        self.batches += 1
        return self._batch(self.rng, self.batch_size)

    def eval_batches(self, samples: int, seed: int = EVAL_SEED) -> list[Batch]:
        """A fixed held-out set from its own seed stream, in batches of ``batch_size``."""
        rng = new_generator(seed)
        return [self._batch(rng, min(self.batch_size, samples - start)) for start in range(0, samples, self.batch_size)]


def passkey_data(seq_len: int, batch_size: int, seed: int = 0, eval_samples: int = 32, digits: int = 5) -> TrainingData:
    """The passkey task as a trainer's data: random training samples, a fixed held-out set."""
    task = PasskeyTask(seq_len, batch_size, seed, digits)
    identity = {"task": "passkey", "source": "synthetic", "digits": digits, "filler_sha": _filler_id()}
    return TrainingData(task, task.eval_batches(eval_samples), identity, "bytes", "passkey", seq_len, batch_size)


def _filler_id() -> str:
    return hashlib.sha256(FILLER + b"\0" + QUESTION + b"\0" + _needle(b"#")).hexdigest()[:16]
