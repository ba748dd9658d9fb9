"""DocumentQA: the README's calls at tiny sizes, fine-tuning on the answer bytes only, greedy answers through
the KV cache, checkpoints as base models, the synthetic evaluation grid, and named errors."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from revnet_core import qa_task
from revnet_core.data import IGNORE_INDEX
from revnet_core.errors import CheckpointError, ConfigError, InputError
from revnet_torch.document_qa import DocumentQA
from revnet_torch.generate import generate
from revnet_torch.pretraining import LongContextPretraining
from revnet_zero.examples import DocumentQA as Exported

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def examples():
    train = qa_task.QATask(split="train").examples(64, lengths=[64, 96], seed=1)
    held = qa_task.QATask(split="eval").examples(12, lengths=[64, 96], seed=2)
    return train, held


@pytest.fixture(scope="module")
def tuned(examples):
    """A tiny model fine-tuned for a few seconds, with its answer loss before and the summary."""
    torch.set_num_threads(1)
    train, held = examples
    qa = DocumentQA(base_model="tiny", max_document_length=256, progress=False)
    before = qa.answer_loss(held)
    summary = qa.finetune(train_data=[e.as_dict() for e in train], num_epochs=2, learning_rate=3e-3, batch_size=8,
                          eval_data=held)
    return qa, before, summary


def test_readme_calls_as_written_at_tiny_size(examples):
    train, held = examples
    long_doc_dataset = [e.as_dict() for e in train[:4]]
    entire_book_text = held[0].document
    assert Exported is DocumentQA
    doc_qa = Exported(
        base_model='tiny',
        max_document_length=256,  # 256 bytes
        progress=False,
    )
    summary = doc_qa.finetune(
        train_data=long_doc_dataset,
        num_epochs=3,
        learning_rate=5e-5
    )
    answer = doc_qa.answer_question(
        document=entire_book_text,
        question="What is the main theme?"
    )
    assert summary["step"] == 3 * 4 and isinstance(answer, str) and len(answer) <= 32  # one character per byte at most
    assert "\n" not in answer


def test_the_readme_base_model_is_the_125M_shape_with_room_for_the_document():
    qa = DocumentQA(base_model="revnet-zero-base", max_document_length=131072, progress=False)
    cfg = qa.model.config
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size) == (12, 768, 12, 256)
    assert cfg.max_seq_len >= 131072 + len(qa_task.prompt("", "q")) + 32


def test_finetune_lowers_the_answer_loss(tuned, examples):
    qa, before, summary = tuned
    after = qa.answer_loss(examples[1])
    assert before > math.log(256) - 0.5  # a fresh model: about uniform over bytes
    assert after < before - 1.0  # measured 5.5 -> about 3.0 nats per answer byte
    assert summary["eval"]["eval_loss"] == pytest.approx(after, rel=1e-5)  # the trainer scores the same bytes


def test_the_loss_is_on_the_answer_bytes_only(tuned, examples):
    qa, _, _ = tuned
    ex = examples[0][0]
    (item,) = qa.encode([ex])
    labelled = item["labels"] != IGNORE_INDEX
    assert bytes(item["labels"][labelled].astype(np.uint8)) == (ex.answer + "\n").encode()
    assert labelled[-len(ex.answer) - 1:].all() and labelled.sum() == len(ex.answer) + 1


def test_answer_is_the_greedy_continuation_up_to_the_newline(tuned, examples):
    qa, _, _ = tuned
    ex = examples[1][0]
    answer = qa.answer_question(document=ex.document, question=ex.question, max_answer_length=16)
    ids = torch.tensor(list(qa_task.prompt(ex.document, ex.question).encode()))
    full = generate(qa.model, ids, max_new_tokens=16, temperature=0.0)[ids.numel():]
    text = bytes(full.tolist()).decode("utf-8", errors="replace").split("\n")[0].strip()
    assert answer == text


def test_documents_longer_than_the_limit_raise_or_are_truncated(tuned):
    qa, _, _ = tuned
    with pytest.raises(InputError, match="longer than max_document_length=256"):
        qa.answer_question(document="x" * 257, question="What?")
    with pytest.raises(InputError, match="max_document_length"):
        qa.finetune(train_data=[{"document": "y" * 300, "question": "q?", "answer": "1"}])
    cut = DocumentQA(base_model="tiny", max_document_length=64, truncate=True, progress=False)
    with pytest.warns(UserWarning, match="truncated to its first 64"):
        assert isinstance(cut.answer_question(document="z" * 100, question="What?"), str)


@pytest.mark.parametrize("call,message", [
    (lambda qa: qa.answer_question(document=b"bytes", question="q?"), "must be a str"),
    (lambda qa: qa.answer_question(document="d", question="  "), "non-empty"),
    (lambda qa: qa.answer_question(document="d", question="q" * 600), "question is longer"),
    (lambda qa: qa.answer_question(document="d", question="q?", max_answer_length=0), "max_answer_length"),
    (lambda qa: qa.finetune(train_data=[]), "empty"),
    (lambda qa: qa.finetune(train_data=qa_task.QATask(split="eval")), "list \\(or iterable\\)"),
    (lambda qa: qa.finetune(train_data=[{"document": "d", "question": "q"}]), "lacks \\['answer'\\]"),
    (lambda qa: qa.finetune(train_data=[{"document": "d", "question": "q", "answer": "a\nb"}]), "one line"),
    (lambda qa: qa.evaluate(lengths=[512], depths=[0.5], n=1), "exceed max_document_length"),
    (lambda qa: qa.evaluate(n=0), "n=0"),
])
def test_bad_inputs_raise_named_errors(tuned, call, message):
    with pytest.raises(InputError, match=message):
        call(tuned[0])


def test_train_data_may_be_the_tasks_generator(examples):
    qa = DocumentQA(base_model="tiny", max_document_length=128, progress=False)
    summary = qa.finetune(train_data=(e for e in examples[0][:4]), num_epochs=1, learning_rate=1e-3)
    assert summary["step"] == 4


def test_evaluate_returns_the_grid_and_writes_a_heatmap(tuned, tmp_path):
    qa, _, _ = tuned
    result = qa.evaluate(lengths=[64, 128], depths=[0.1, 0.5, 0.9], n=2, heatmap=tmp_path / "h.png")
    for key in ("accuracy", "digit_accuracy", "answer_loss"):
        grid = np.asarray(result[key])
        assert grid.shape == (2, 3) and np.isfinite(grid).all(), key
    assert ((np.asarray(result["accuracy"]) >= 0) & (np.asarray(result["accuracy"]) <= 1)).all()
    assert result["chance_accuracy"] == 1e-6 and len(result["examples"]) == 6
    assert Path(result["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    again = qa.evaluate(lengths=[128], depths=[0.5], n=2)  # a cell does not depend on the rest of the grid
    assert again["answer_loss"][0][0] == pytest.approx(result["answer_loss"][1][1], rel=1e-6)


def test_a_finetuned_run_folder_is_a_base_model(tuned, examples, tmp_path):
    train, held = examples
    qa = DocumentQA(base_model="tiny", max_document_length=128, progress=False)
    qa.finetune(train_data=train[:4], learning_rate=1e-3, out_dir=tmp_path / "qa")
    loaded = DocumentQA(base_model=tmp_path / "qa", max_document_length=128, progress=False)
    for (name, a), (_, b) in zip(qa.model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(a, b), name
    ex = held[0]
    assert loaded.answer_question(ex.document, ex.question) == qa.answer_question(ex.document, ex.question)


def test_a_pretraining_run_is_a_base_model_with_its_length_raised(tmp_path):
    run = tmp_path / "pre"
    LongContextPretraining("tiny", context_length=32, batch_size=1, out_dir=run, progress=False, plot=False,
                           eval_windows=1).run(dataset="embedded", num_steps=1)
    qa = DocumentQA(base_model=str(run), max_document_length=200, progress=False)
    assert qa.model.config.max_seq_len >= 200  # trained at 32; rotary positions extend
    assert isinstance(qa.answer_question(document="a" * 200, question="Why?"), str)


def test_bad_base_models_are_named(tmp_path):
    with pytest.raises(ConfigError, match="neither a model size"):
        DocumentQA(base_model="gpt-17", max_document_length=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        DocumentQA(base_model=tmp_path / "empty", max_document_length=64)
    with pytest.raises(ConfigError, match="max_document_length"):
        DocumentQA(base_model="tiny", max_document_length=0)


def test_a_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    from revnet_core import token_file

    token_file.write_tokens(tmp_path / "t.bin", np.arange(3000) % 300, vocab_size=300)
    LongContextPretraining("tiny", context_length=16, batch_size=1, out_dir=tmp_path / "r", progress=False,
                           plot=False, eval_windows=1).run(dataset=tmp_path / "t.bin", num_steps=1)
    with pytest.raises(ConfigError, match="vocab_size=300"):
        DocumentQA(base_model=tmp_path / "r", max_document_length=64)


def test_every_python_block_of_the_examples_doc_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their runs where a user would: the current folder
    text = (ROOT / "docs" / "examples.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, "docs/examples.md", "exec"), {"__name__": "__doc_example__"})
