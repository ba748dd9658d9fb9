"""A synthetic long-document QA task, framework-free: a fact planted at a known depth of a document cut from
the embedded corpus, and a question only that fact answers.

    <corpus text ...> The secret code of Mira Okafor is 482913. <... corpus text> \\n\\nQuestion: What is the
    secret code of Mira Okafor?\\nAnswer: 482913\\n

The document is ``length`` bytes of the corpus (the standard library's sources; non-ASCII bytes become
spaces so a byte cut never splits a character) with the fact sentence inserted so that it starts at
``depth`` (0: the start, 1: the end) of the surrounding text. Names are drawn from first and last names that
never occur in the corpus, so the fact is the only mention. Everything is deterministic by seed; training
documents come from the corpus's training part, evaluation documents from its held-out part.

A model answers from ``prompt(document, question)`` and is scored on the bytes of ``answer + ANSWER_END``;
``encode_example`` gives the token ids and labels that train exactly that (the loss on the answer only).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .data import IGNORE_INDEX, new_generator
from .errors import InputError

QUESTION_PREFIX = "\n\nQuestion: "
ANSWER_PREFIX = "\nAnswer: "
ANSWER_END = "\n"  # a generated answer ends at the first newline
CODE_DIGITS = 6
EVAL_SEED = 20_000_003  # evaluation documents: a stream of their own, apart from any training seed
FIRST = ("Mira", "Tobin", "Ilse", "Kenji", "Aurelia", "Bram", "Soraya", "Dmitri", "Yael", "Oskar", "Priya", "Lucan",
         "Zofia", "Emeka", "Ingrid", "Rafferty")
LAST = ("Okafor", "Vantongeren", "Quillfeather", "Marchetti", "Abernathy", "Szymanski", "Haldorsen", "Nakagawa",
        "Ferreira", "Lindqvist", "Obuya", "Castellano")


def prompt(document: str, question: str) -> str:
    """What a model reads before it answers: the document, then the question, then ``Answer: ``."""
    return f"{document}{QUESTION_PREFIX}{question}{ANSWER_PREFIX}"


def fact_sentence(name: str, code: str) -> str:
    return f" The secret code of {name} is {code}. "


def question_for(name: str) -> str:
    return f"What is the secret code of {name}?"


@dataclass(frozen=True)
class QAExample:
    """One document (``length`` bytes, ASCII) with the fact at relative ``depth``; ``answer`` the code."""

    document: str
    question: str
    answer: str
    depth: float
    length: int

    def as_dict(self) -> dict[str, Any]:
        return {"document": self.document, "question": self.question, "answer": self.answer, "depth": self.depth,
                "length": self.length}


def min_length() -> int:
    """The shortest document that holds the fact sentence and one byte of text around it."""
    longest = max(len(f) for f in FIRST) + max(len(n) for n in LAST) + 1
    return len(fact_sentence("x" * longest, "0" * CODE_DIGITS)) + 2


def _ascii(raw: np.ndarray) -> str:
    text = np.where(raw < 128, raw, ord(" ")).astype(np.uint8)
    return text.tobytes().decode("ascii")


class QATask:
    """Examples of the task from ``text`` (a uint8 array of corpus bytes; default: the embedded corpus's
    training part, or its held-out part with ``split="eval"``). ``example(rng, length, depth)`` makes one."""

    def __init__(self, text: np.ndarray | None = None, split: str = "train"):
        if split not in ("train", "eval"):
            raise InputError(f"split={split!r} must be 'train' or 'eval'")
        if text is None:
            from .data import stdlib_corpus

            corpus = stdlib_corpus()
            text = corpus.train if split == "train" else corpus.heldout
        text = np.asarray(text)
        if text.dtype != np.uint8 or text.ndim != 1:
            raise InputError(f"text must be a 1-D uint8 array of bytes, got {text.dtype} of shape {text.shape}")
        self.text = text
        self.split = split

    def example(self, rng: np.random.Generator, length: int, depth: float) -> QAExample:
        """A document of exactly ``length`` bytes whose fact starts at ``depth`` of the text around it."""
        if isinstance(length, bool) or not isinstance(length, int) or length < min_length():
            raise InputError(f"length={length!r} must be an integer >= {min_length()} (the fact sentence and "
                             "some text)")
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise InputError(f"depth={depth!r} must be a number in [0, 1] (0: the start of the document)")
        name = f"{FIRST[rng.integers(len(FIRST))]} {LAST[rng.integers(len(LAST))]}"
        code = "".join(str(d) for d in rng.integers(0, 10, size=CODE_DIGITS))
        fact = fact_sentence(name, code)
        filler_len = length - len(fact)
        if self.text.size < filler_len:
            raise InputError(f"length={length} needs {filler_len} bytes of text; the corpus holds {self.text.size}")
        start = int(rng.integers(0, self.text.size - filler_len + 1))
        filler = _ascii(self.text[start:start + filler_len])
        at = round(depth * filler_len)
        document = filler[:at] + fact + filler[at:]
        return QAExample(document, question_for(name), code, float(depth), length)

    def examples(self, n: int, lengths: Sequence[int], depths: Sequence[float] | None = None,
                 seed: int = 0) -> list[QAExample]:
        """``n`` examples, each of a length drawn from ``lengths`` and a depth drawn from ``depths`` (None: any
        depth in [0, 1]), deterministic by ``seed``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n={n!r} must be a positive integer")
        rng = new_generator(seed)
        out = []
        for _ in range(n):
            length = int(lengths[rng.integers(len(lengths))])
            depth = float(rng.random()) if depths is None else float(depths[rng.integers(len(depths))])
            out.append(self.example(rng, length, depth))
        return out

    def grid(self, lengths: Sequence[int], depths: Sequence[float], n: int,
             seed: int = EVAL_SEED) -> Iterator[tuple[int, float, list[QAExample]]]:
        """(length, depth, ``n`` examples) for every cell of the grid, each cell from its own seeded stream (so
        a cell's examples do not change when the grid around it does)."""
        for (i, length), (j, depth) in itertools.product(enumerate(lengths), enumerate(depths)):
            rng = new_generator(seed + 1_000_003 * int(length) + round(1e6 * float(depth)))
            yield int(length), float(depth), [self.example(rng, int(length), float(depth)) for _ in range(n)]


def as_example(item: Any, where: str = "example") -> tuple[str, str, str]:
    """(document, question, answer) of a QAExample or a dict with those keys."""
    if isinstance(item, QAExample):
        return item.document, item.question, item.answer
    if isinstance(item, dict):
        missing = [k for k in ("document", "question", "answer") if k not in item]
        if missing:
            raise InputError(f"{where} lacks {missing}: each training example is a dict with 'document', "
                             "'question' and 'answer' (strings)")
        values = item["document"], item["question"], item["answer"]
        bad = [k for k, v in zip(("document", "question", "answer"), values) if not isinstance(v, str)]
        if bad:
            raise InputError(f"{where}: {bad} must be strings")
        return values
    raise InputError(f"{where} is a {type(item).__name__}; give a dict with 'document', 'question' and 'answer' "
                     "or a revnet_core.qa_task.QAExample")


def encode_example(document: str, question: str, answer: str) -> dict[str, np.ndarray]:
    """Byte ids of ``prompt(document, question) + answer + ANSWER_END`` and labels that are ``IGNORE_INDEX``
    except on the answer and its end: {"input_ids": (T,) int64, "labels": (T,) int64}."""
    context = prompt(document, question).encode("utf-8")
    target = (answer + ANSWER_END).encode("utf-8")
    ids = np.frombuffer(context + target, dtype=np.uint8).astype(np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[len(context):] = ids[len(context):]
    return {"input_ids": ids, "labels": labels}


def heatmap_figure(result: dict[str, Any], key: str = "accuracy"):
    """A matplotlib Figure of ``result[key]`` (an evaluation's grid: rows lengths, columns depths)."""
    # Imported here: matplotlib is slow to load and only a plot needs it; no pyplot, the user's backend stays.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.asarray(result[key], dtype=float)
    fig = Figure(figsize=(1.3 * len(result["depths"]) + 2.5, 0.6 * len(result["lengths"]) + 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(x) for x in result["lengths"]])
    ax.set_xlabel("depth of the fact (0: document start)")
    ax.set_ylabel("document length (bytes)")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_title(f"{key.replace('_', ' ')} ({result['n']} questions per cell)")
    fig.colorbar(image, ax=ax)
    return fig


def save_heatmap(result: dict[str, Any], path: str | os.PathLike, key: str = "accuracy") -> Path:
    """Write ``heatmap_figure(result, key)`` as a PNG at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(result, key).savefig(path, dpi=100)
    return path
