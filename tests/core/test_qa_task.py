"""The synthetic long-document QA task: exact lengths, facts at the depth asked, deterministic by seed, labels
on the answer only."""

import numpy as np
import pytest

from revnet_core import qa_task
from revnet_core.data import IGNORE_INDEX, new_generator
from revnet_core.errors import InputError

TEXT = np.frombuffer(("def f(x):\n    return x + 1\n# é comment\n" * 200).encode(), dtype=np.uint8)


@pytest.fixture
def task():
    return qa_task.QATask(TEXT)


@pytest.mark.parametrize("length", [qa_task.min_length(), 100, 777])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_document_has_the_length_and_the_fact_at_its_depth(task, length, depth):
    ex = task.example(new_generator(3), length, depth)
    assert len(ex.document.encode()) == length and ex.document.isascii()  # é became spaces, no split character
    name = ex.question[len("What is the secret code of "):-1]
    fact = qa_task.fact_sentence(name, ex.answer)
    at = ex.document.index(fact)
    assert ex.document.count(fact) == 1 and ex.document.count(name) == 1
    assert at == round(depth * (length - len(fact)))
    assert len(ex.answer) == qa_task.CODE_DIGITS and ex.answer.isdigit()


def test_examples_are_deterministic_by_seed_and_vary_with_it(task):
    a = task.examples(20, lengths=[80, 120], seed=1)
    b = task.examples(20, lengths=[80, 120], seed=1)
    c = task.examples(20, lengths=[80, 120], seed=2)
    assert a == b and a != c
    assert {e.length for e in a} == {80, 120} and len({e.answer for e in a}) == 20
    assert all(0 <= e.depth <= 1 for e in a) and len({e.depth for e in a}) == 20


def test_grid_cells_are_stable_whatever_the_rest_of_the_grid(task):
    small = {(l, d): c for l, d, c in task.grid([100], [0.5], n=3)}
    large = {(l, d): c for l, d, c in task.grid([80, 100], [0.1, 0.5], n=3)}
    assert small[(100, 0.5)] == large[(100, 0.5)]
    assert all(e.length == 80 and e.depth == 0.1 for e in large[(80, 0.1)])


def test_bad_lengths_depths_and_texts_are_refused(task):
    rng = new_generator(0)
    with pytest.raises(InputError, match="length"):
        task.example(rng, 10, 0.5)
    with pytest.raises(InputError, match="depth"):
        task.example(rng, 100, 1.5)
    with pytest.raises(InputError, match="corpus holds"):
        qa_task.QATask(TEXT[:50]).example(rng, 200, 0.5)
    with pytest.raises(InputError, match="uint8"):
        qa_task.QATask(np.zeros(10, dtype=np.int64))
    with pytest.raises(InputError, match="split"):
        qa_task.QATask(TEXT, split="test")


def test_encoded_example_labels_only_the_answer_and_its_end():
    item = qa_task.encode_example("some doc", "What?", "42")
    text = bytes(item["input_ids"].astype(np.uint8)).decode()
    assert text == "some doc\n\nQuestion: What?\nAnswer: 42\n"
    labelled = item["labels"] != IGNORE_INDEX
    assert bytes(item["labels"][labelled].astype(np.uint8)) == b"42\n"
    assert labelled[-3:].all() and not labelled[:-3].any()


def test_as_example_names_what_is_missing():
    ex = qa_task.QATask(TEXT).example(new_generator(0), 100, 0.5)
    assert qa_task.as_example(ex) == qa_task.as_example(ex.as_dict())
    with pytest.raises(InputError, match="lacks \\['answer'\\]"):
        qa_task.as_example({"document": "d", "question": "q"})
    with pytest.raises(InputError, match="must be strings"):
        qa_task.as_example({"document": "d", "question": "q", "answer": 3})
    with pytest.raises(InputError, match="give a dict"):
        qa_task.as_example(("d", "q", "a"))


def test_embedded_corpus_splits_never_mention_the_planted_names():
    train, held = qa_task.QATask(split="train"), qa_task.QATask(split="eval")
    assert train.text.size > held.text.size > 0
    corpus = train.text.tobytes() + held.text.tobytes()
    assert b"secret code" not in corpus
    assert not [n for n in qa_task.FIRST + qa_task.LAST if n.encode() in corpus]


def test_heatmap_is_a_png(tmp_path):
    result = {"lengths": [100, 200], "depths": [0.1, 0.9], "n": 2, "accuracy": [[0.0, 0.5], [1.0, 0.25]]}
    path = qa_task.save_heatmap(result, tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
