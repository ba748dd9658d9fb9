"""``DocumentQA``: generative question answering over a whole long document with a byte-level reversible LM.

    doc_qa = DocumentQA(base_model='revnet-zero-base', max_document_length=131072)
    doc_qa.finetune(train_data=long_doc_dataset, num_epochs=3, learning_rate=5e-5)
    answer = doc_qa.answer_question(document=entire_book_text, question="What is the main theme?")

The model reads ``revnet_core.qa_task.prompt(document, question)`` (the document's UTF-8 bytes, then
``Question: ...`` and ``Answer: ``) and generates the answer greedily through the KV cache of
``revnet_torch.generate.Decoder`` until a newline. Fine-tuning is ``LongContextTrainer.train`` on examples
whose labels cover only the answer bytes (``revnet_core.qa_task.encode_example``): the loss is on the
answer, the document is context. ``evaluate`` scores the synthetic task of ``revnet_core.qa_task`` (a fact
planted at a known depth) per document length and depth.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from revnet_core import qa_task
from revnet_core.data import IGNORE_INDEX
from revnet_core.errors import ConfigError, InputError
from revnet_core.presets import PRESETS, preset_config, size_name

from .generate import Decoder, load_for_inference, sample
from .model import ReversibleTransformer
from .trainer import LongContextTrainer, autocast_dtype, pick_device

MAX_QUESTION_BYTES = 512  # room kept beyond the document for the question and the prompt's framing
MAX_ANSWER_BYTES = 64


class DocumentQA:
    """QA over documents of up to ``max_document_length`` bytes.

    ``base_model``: a preset name (a freshly initialised model of that shape, e.g. 'revnet-zero-base',
    'small', 'tiny') or a checkpoint file or run folder written by ``revnet train``, ``LongContextPretraining``
    or ``finetune(out_dir=...)``. The model is byte-level (vocab 256); its ``max_seq_len`` is raised to hold
    the document, the question and the answer (rotary positions have no length-bound parameters).
    ``truncate=True`` keeps the first ``max_document_length`` bytes of a longer document (with a warning)
    instead of raising InputError. Other keywords: ``device``, ``precision``, ``seed``,
    ``max_answer_length`` (bytes generated at most), ``progress``; ModelConfig fields for a fresh model.
    """

    def __init__(self, base_model: str | os.PathLike = "revnet-zero-base", max_document_length: int = 4096, *,
                 device: str | torch.device | None = None, precision: str = "auto", seed: int = 0,
                 max_answer_length: int = 32, truncate: bool = False, progress: bool = True, **config_fields: Any):
        for name, value in (("max_document_length", max_document_length), ("max_answer_length", max_answer_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if max_answer_length > MAX_ANSWER_BYTES:
            raise ConfigError(f"max_answer_length={max_answer_length} exceeds {MAX_ANSWER_BYTES} bytes")
        self.max_document_length = max_document_length
        self.max_answer_length = max_answer_length
        self.truncate = truncate
        self.device = pick_device(device)
        self.precision = precision
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.seed = seed
        self.progress = progress
        needed = max_document_length + MAX_QUESTION_BYTES + MAX_ANSWER_BYTES + len(qa_task.ANSWER_END)
        self.model = self._load(base_model, needed, config_fields)
        self.trainer: LongContextTrainer | None = None

    def _load(self, base_model: str | os.PathLike, needed: int, fields: dict[str, Any]) -> ReversibleTransformer:
        if isinstance(base_model, str) and not Path(base_model).exists():
            try:
                name = size_name(base_model)
            except ConfigError:
                raise ConfigError(f"base_model={base_model!r} is neither a model size ({sorted(PRESETS)}) nor an "
                                  "existing checkpoint file or run folder") from None
            torch.manual_seed(self.seed)
            return ReversibleTransformer(preset_config(name, max_seq_len=needed, **fields)).to(self.device)
        if fields:
            raise ConfigError(f"config fields {sorted(fields)} only apply to a fresh model; base_model="
                              f"{os.fspath(base_model)!r} is a checkpoint with its own config")
        model = load_for_inference(base_model, device=self.device)
        if model.config.vocab_size != 256:
            raise ConfigError(f"base_model {os.fspath(base_model)!r} has vocab_size={model.config.vocab_size}; "
                              "DocumentQA reads UTF-8 bytes and needs a byte-level model (vocab_size=256)")
        if model.config.max_seq_len < needed:
            model.config = model.config.replace(max_seq_len=needed)
        return model.train()

    # --- inputs -------------------------------------------------------------------------------------------
    def _document(self, document: str) -> str:
        if not isinstance(document, str):
            raise InputError(f"document must be a str, got {type(document).__name__}")
        data = document.encode("utf-8")
        if len(data) <= self.max_document_length:
            return document
        if not self.truncate:
            raise InputError(f"the document is {len(data):,} bytes, longer than max_document_length="
                             f"{self.max_document_length:,}; build DocumentQA with a larger max_document_length "
                             "or truncate=True to keep its start")
        warnings.warn(f"document of {len(data):,} bytes truncated to its first {self.max_document_length:,}",
                      stacklevel=3)
        return data[:self.max_document_length].decode("utf-8", errors="ignore")

    def _encode(self, item: Any, where: str) -> dict[str, np.ndarray]:
        document, question, answer = qa_task.as_example(item, where)
        self._question(question)
        if len(answer.encode("utf-8")) > self.max_answer_length or qa_task.ANSWER_END in answer:
            raise InputError(f"{where}: the answer must be one line of at most max_answer_length="
                             f"{self.max_answer_length} bytes, got {answer[:80]!r}")
        return qa_task.encode_example(self._document(document), question, answer)

    def _question(self, question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question must be a non-empty str, got {question!r}")
        framing = len(qa_task.QUESTION_PREFIX) + len(qa_task.ANSWER_PREFIX)
        if len(question.encode("utf-8")) + framing > MAX_QUESTION_BYTES:
            raise InputError(f"the question is longer than {MAX_QUESTION_BYTES - framing} bytes")

    def encode(self, examples: Any, what: str = "train_data") -> list[dict[str, np.ndarray]]:
        """Token ids and answer-only labels of ``examples`` (dicts with document/question/answer, or
        ``QAExample``s; a list or any finite iterable such as a generator)."""
        if isinstance(examples, (str, bytes, dict)) or not isinstance(examples, Iterable):
            raise InputError(f"{what} must be a list (or iterable) of examples: dicts with 'document', 'question' "
                             f"and 'answer', or revnet_core.qa_task.QAExample; got {type(examples).__name__}")
        items = [self._encode(item, f"{what}[{i}]") for i, item in enumerate(examples)]
        if not items:
            raise InputError(f"{what} is empty: give at least one example")
        return items

    # --- training -----------------------------------------------------------------------------------------
    def finetune(self, train_data: Any, num_epochs: int = 1, learning_rate: float = 5e-5, *, batch_size: int = 1,
                 eval_data: Any = None, gradient_accumulation: int = 1, warmup_steps: int | None = None,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """Train on ``train_data`` for ``num_epochs`` (loss on the answer bytes only), optionally evaluating on
        ``eval_data`` (teacher-forced answer loss and exact-match accuracy). Returns the trainer's summary;
        with ``out_dir`` the run's checkpoint there is a ``base_model`` for a later DocumentQA."""
        train = self.encode(train_data, "train_data")
        held = None if eval_data is None else self.encode(eval_data, "eval_data")
        self.trainer = LongContextTrainer(
            self.model, lr=learning_rate, gradient_accumulation_steps=gradient_accumulation,
            warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            precision=self.precision, out_dir=out_dir, device=self.device, seed=self.seed, progress=self.progress,
            plot=out_dir is not None)
        return self.trainer.train(train, held, num_epochs=num_epochs, batch_size=batch_size)

    @torch.no_grad()
    def answer_loss(self, examples: Any) -> float:
        """Mean nats per answer byte (the answer and its newline) of ``examples``, teacher-forced."""
        nats = count = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            for item in self.encode(examples, "examples"):
                ids = torch.from_numpy(item["input_ids"]).to(self.device)[None]
                labels = torch.from_numpy(item["labels"]).to(self.device)[None]
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                with self._autocast():
                    nats += float(self.model(ids, labels=labels).loss) * n
                count += n
        finally:
            self.model.train(was_training)
        return nats / max(1.0, count)

    # --- answering ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer_question(self, document: str, question: str, max_answer_length: int | None = None) -> str:
        """The model's answer (greedy, at most ``max_answer_length`` bytes, up to the first newline) to
        ``question`` about ``document``. InputError if the document exceeds ``max_document_length`` (unless
        ``truncate``)."""
        limit = self.max_answer_length if max_answer_length is None else max_answer_length
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_ANSWER_BYTES:
            raise InputError(f"max_answer_length={limit!r} must be an integer in [1, {MAX_ANSWER_BYTES}]")
        document = self._document(document)
        self._question(question)
        context = qa_task.prompt(document, question).encode("utf-8")
        ids = torch.tensor(list(context), dtype=torch.int64, device=self.device)[None]
        end = qa_task.ANSWER_END.encode("utf-8")[0]
        was_training = self.model.training
        self.model.eval()
        out: list[int] = []
        try:
            decoder = Decoder(self.model, 1, ids.shape[1] + limit)
            with self._autocast():
                logits = decoder.feed(ids)
                for step in range(limit):
                    nxt = sample(logits, 0.0, None)  # greedy
                    token = int(nxt)
                    if token == end:
                        break
                    out.append(token)
                    if step + 1 < limit:
                        logits = decoder.feed(nxt)
        finally:
            self.model.train(was_training)
        return bytes(out).decode("utf-8", errors="replace").strip()

    def _autocast(self):
        import contextlib

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- the synthetic benchmark --------------------------------------------------------------------------
    def evaluate(self, lengths: Sequence[int] = (256, 512, 1024), depths: Sequence[float] = (0.1, 0.5, 0.9),
                 n: int = 10, seed: int = qa_task.EVAL_SEED, task: qa_task.QATask | None = None,
                 heatmap: str | os.PathLike | None = None) -> dict[str, Any]:
        """Answer ``n`` held-out synthetic questions per (document length, fact depth) cell.

        Returns {"lengths", "depths", "n", "accuracy": [[exact-match share per depth] per length],
        "digit_accuracy" (share of code digits right, position by position), "answer_loss" (teacher-forced
        nats per answer byte), "overall_accuracy", "chance_accuracy" (10^-digits), "examples" (a few answers)};
        with ``heatmap`` a PNG of the accuracy grid is written there."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n={n!r} must be a positive integer")
        lengths, depths = [int(x) for x in lengths], [float(x) for x in depths]
        if not lengths or not depths:
            raise InputError("evaluate needs at least one length and one depth")
        too_long = [x for x in lengths if x > self.max_document_length]
        if too_long:
            raise InputError(f"lengths {too_long} exceed max_document_length={self.max_document_length}")
        task = task or qa_task.QATask(split="eval")
        acc = np.zeros((len(lengths), len(depths)))
        digits = np.zeros_like(acc)
        loss = np.zeros_like(acc)
        shown: list[dict[str, Any]] = []
        for length, depth, cell in task.grid(lengths, depths, n, seed):
            i, j = lengths.index(length), depths.index(depth)
            answers = [self.answer_question(ex.document, ex.question) for ex in cell]
            acc[i, j] = np.mean([a == ex.answer for a, ex in zip(answers, cell)])
            digits[i, j] = np.mean([_digit_share(a, ex.answer) for a, ex in zip(answers, cell)])
            loss[i, j] = self.answer_loss(cell)
            shown.append({"length": length, "depth": depth, "answer": cell[0].answer, "predicted": answers[0]})
        result = {"lengths": lengths, "depths": depths, "n": n, "seed": seed, "accuracy": acc.tolist(),
                  "digit_accuracy": digits.tolist(), "answer_loss": loss.tolist(),
                  "overall_accuracy": float(acc.mean()), "overall_digit_accuracy": float(digits.mean()),
                  "chance_accuracy": 10.0 ** -qa_task.CODE_DIGITS, "chance_digit_accuracy": 0.1,
                  "chance_answer_loss": math.log(10) * qa_task.CODE_DIGITS / (qa_task.CODE_DIGITS + 1),
                  "examples": shown}
        if heatmap is not None:
            result["heatmap"] = os.fspath(qa_task.save_heatmap(result, heatmap))
        return result


def _digit_share(predicted: str, answer: str) -> float:
    """Share of the answer's characters the prediction has at the same position."""
    return sum(a == b for a, b in zip(predicted, answer)) / len(answer)
