"""Byte-level data, a user's datasets and the passkey task: deterministic, resumable, and clear about bad input.
No framework."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from revnet_core import InputError
from revnet_core.data import (HELDOUT_EVERY, IGNORE_INDEX, EpochSampler, WindowSampler, collate, dataset_data,
                              dataset_sequences, eval_windows, file_corpus, lm_data, stdlib_corpus, stdlib_files)
from revnet_core.tasks import QUESTION, PasskeyTask, passkey_data


# --- the embedded corpus -----------------------------------------------------------------------------------
def test_stdlib_corpus_is_this_pythons_sources_sorted_without_tests_or_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    assert not any(part in ("site-packages", "dist-packages", "test", "tests") for r in rel for part in r.split("/"))
    assert "os.py" in rel and "json/__init__.py" in rel


def test_stdlib_corpus_split_hash_and_version():
    corpus = stdlib_corpus()
    assert corpus.source == "python-stdlib" and corpus.train.dtype == np.uint8
    assert corpus.heldout_files == len(stdlib_files()) // HELDOUT_EVERY
    assert 0.02 < corpus.heldout.size / corpus.train.size < 0.1
    ident = corpus.identity()
    assert len(ident["sha256"]) == 64 and ident["python_version"].count(".") == 2
    stdlib_corpus.cache_clear()
    assert stdlib_corpus().sha256 == corpus.sha256  # read again from disk: the same bytes


# --- user files ----------------------------------------------------------------------------------------------
def write_files(folder: Path, n: int, text="line of text {i}\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(text.format(i=i) * 20)
    return folder


def test_folders_are_read_recursively_sorted_and_split_by_file(tmp_path):
    write_files(tmp_path / "a", 15)
    write_files(tmp_path / "b" / "deep", 15)
    (tmp_path / "a" / ".hidden").write_bytes(b"\0binary but hidden")
    one = file_corpus([tmp_path / "b", tmp_path / "a"])
    two = file_corpus([tmp_path / "a", tmp_path / "b"])
    assert one.sha256 == two.sha256  # argument order does not matter: one sorted list of files
    assert one.files == 30 and one.heldout_files == 1
    held = (tmp_path / "b" / "deep" / "004.txt").read_bytes()  # the 20th file in sorted order
    assert bytes(one.heldout) == held


def test_few_files_hold_out_the_last_bytes(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    corpus = file_corpus([f])
    assert corpus.heldout.size == 1000 // HELDOUT_EVERY and corpus.train.size == 1000 - corpus.heldout.size
    assert bytes(corpus.train) + bytes(corpus.heldout) == f.read_bytes()


def _file(content: bytes):
    def make(folder: Path) -> Path:
        path = folder / "data.txt"
        path.write_bytes(content)
        return path

    return make


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "does not exist"),
    (_empty_folder, "contains no files"),
    (_file(b""), "the data is empty"),
    (_file(b"ab\0cd"), "not a text file"),
    (_file("caf\xe9".encode("latin-1")), "not UTF-8 text"),
], ids=["missing", "empty-folder", "empty-file", "binary", "not-utf8"])
def test_bad_data_paths_raise_clear_errors(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        file_corpus([make(tmp_path)])


# --- sampling ------------------------------------------------------------------------------------------------
def test_windows_are_contiguous_seeded_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.int64) % 251
    a = WindowSampler(tokens, 16, 4, seed=3)
    first = [a.next_batch()[0] for _ in range(3)]
    for ids in first:
        assert ids.shape == (4, 16) and ids.dtype == np.int64
        assert np.all((np.diff(ids, axis=1) % 251) == 1)  # contiguous slices of the data
    state = a.state_dict()
    rest = [a.next_batch()[0] for _ in range(3)]
    b = WindowSampler(tokens, 16, 4, seed=999)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, [b.next_batch()[0] for _ in range(3)]))
    c = WindowSampler(tokens, 16, 4, seed=3)
    assert np.array_equal(c.next_batch()[0], first[0])


def test_eval_windows_are_fixed_and_disjoint():
    tokens = np.arange(1000, dtype=np.int64)
    batches = eval_windows(tokens, 64, 10, batch_size=4)
    windows = np.concatenate([b[0] for b in batches])
    assert windows.shape == (10, 64) and [b[0].shape[0] for b in batches] == [4, 4, 2]
    starts = windows[:, 0]
    assert np.all(np.diff(starts) >= 64)
    assert np.array_equal(windows, np.concatenate([b[0] for b in eval_windows(tokens, 64, 10, 4)]))


def test_sequence_longer_than_the_data_is_refused(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("x" * 400)
    with pytest.raises(InputError, match="larger than the held-out data"):
        lm_data(file_corpus([f]), 64, 2)
    with pytest.raises(InputError, match="larger than the training data"):
        lm_data(file_corpus([f]), 1000, 2)


def test_a_sampler_state_of_another_kind_is_refused():
    windows = WindowSampler(np.arange(100), 8, 2).state_dict()
    with pytest.raises(InputError, match="of kind 'windows' does not fit a passkey sampler"):
        PasskeyTask(200, 2).load_state_dict(windows)
    with pytest.raises(InputError, match="does not fit this dataset"):
        EpochSampler([(np.arange(4), None)] * 3, 2).load_state_dict(windows)
    with pytest.raises(InputError, match="batch_size=0 must be a positive integer"):
        WindowSampler(np.arange(100), 8, 0)


# --- a user's datasets ---------------------------------------------------------------------------------------
def test_items_are_cut_to_max_length_and_one_token_pieces_dropped():
    items = [np.arange(10), [1, 2, 3], {"input_ids": np.arange(5), "labels": np.arange(5) + 1}, "héllo", b"xy"]
    pieces, units, sha = dataset_sequences(items, 4, 256, "ds")
    assert [p[0].tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [1, 2, 3], [0, 1, 2, 3],
                                               list("héll".encode())[:4], [108, 111], [120, 121]]
    assert pieces[4][1].tolist() == [1, 2, 3, 4] and pieces[0][1] is None
    assert all(p[0].dtype == np.int64 for p in pieces)
    assert units == "tokens" and len(sha) == 64  # mixed texts and ids count tokens, not bytes
    assert dataset_sequences(["ab", b"cd"], 4, 256, "ds")[1] == "bytes"
    assert dataset_sequences([np.arange(10)], 4, 256, "ds")[2] == sha_of([np.arange(10)], 4)
    assert sha_of([np.arange(10)], 4) != sha_of([np.arange(10)], 5)  # the same tokens cut otherwise: other data


def sha_of(items, max_length):
    return dataset_sequences(items, max_length, 256, "ds")[2]


@pytest.mark.parametrize("dataset, vocab, message", [
    (["", "a"], 256, "empty: no item holds two or more tokens"),
    ([np.ones(4)], 256, r"ds\[0\] must hold integer token ids"),
    ([np.ones((2, 3), dtype=int)], 256, r"shape \(T,\), got shape \(2, 3\)"),
    ([np.array([1, 2, 300])], 256, r"ids in \[1, 300\], outside the model's vocabulary \[0, 256\)"),
    ([np.array([-1, 2])], 256, "outside the model's vocabulary"),
    (["some text"], 50, "byte-tokenised"),
    ([{"ids": [1, 2]}], 256, "a dict without 'input_ids'"),
    ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 256, "labels shape"),
    ([{"input_ids": [1, 2, 3], "labels": [0.5, 1, 2]}], 256, r"ds\[0\] labels must hold integer"),
    ("a text", 256, "not one str"),
    (iter([[1, 2]]), 256, "must support len"),
])
def test_bad_datasets_raise_clear_errors(dataset, vocab, message):
    with pytest.raises(InputError, match=message):
        dataset_sequences(dataset, 8, vocab, "ds")


def test_collate_pads_with_no_loss_and_leaves_equal_unlabelled_pieces_alone():
    ids, labels = collate([(np.arange(4), None), (np.arange(4) + 1, None)])
    assert ids.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]] and labels is None
    ids, labels = collate([(np.arange(4), None), (np.array([7, 8]), np.array([IGNORE_INDEX, 9]))])
    assert ids.tolist() == [[0, 1, 2, 3], [7, 8, 0, 0]]
    assert labels.tolist() == [[0, 1, 2, 3], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]


def test_epochs_shuffle_every_piece_once_and_resume_exactly():
    pieces = [(np.full(3, i), None) for i in range(5)]
    a = EpochSampler(pieces, 2, seed=1)
    first = [a.next_batch()[0][:, 0].tolist() for _ in range(5)]  # 10 pieces: two epochs exactly
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5)) and a.epoch == 1
    state = a.state_dict()
    rest = [a.next_batch()[0] for _ in range(4)]
    b = EpochSampler(pieces, 2, seed=999)
    b.load_state_dict(json.loads(json.dumps(state)))  # through a checkpoint's JSON-like state
    assert all(np.array_equal(x, y) for x, y in zip(rest, [b.next_batch()[0] for _ in range(4)]))
    assert b.batches == a.batches == 9 and b.epoch == a.epoch
    c = EpochSampler(pieces, 2, seed=1)
    assert [c.next_batch()[0][:, 0].tolist() for _ in range(5)] == first


def test_dataset_data_is_a_trainers_data():
    data = dataset_data([np.arange(10), np.arange(3)], ["held out text"], 4, 256, batch_size=2, seed=0)
    assert data.task == "dataset" and data.units == "tokens" and data.seq_len == 4 and data.batch_size == 2
    assert data.identity["pieces"] == 4 and data.identity["source"] == "user-dataset"
    # 13 bytes: pieces of 4, 4 and 4; the last byte alone has no next-token target
    assert [b[0].shape for b in data.eval_batches] == [(2, 4), (1, 4)]
    assert dataset_data(["ab"], None, 4, 256, 1).eval_batches == []


# --- passkey -------------------------------------------------------------------------------------------------
def test_passkey_sample_layout():
    task = PasskeyTask(seq_len=300, batch_size=8, seed=1, digits=5)
    ids, labels = task.next_batch()
    assert ids.shape == labels.shape == (8, 300)
    depths = set()
    for row, lab in zip(ids, labels):
        text = bytes(row.astype(np.uint8))
        key = text[-5:]
        assert key.isdigit()
        assert text.count(b"The pass key is " + key + b".") == 1 and text.endswith(QUESTION + key)
        depths.add(text.index(b"The pass key is"))
        assert np.array_equal(lab[-5:], row[-5:]) and np.all(lab[:-5] == IGNORE_INDEX)
    assert len(depths) > 4  # the needle moves


def test_passkey_resumes_and_keeps_a_fixed_eval_set():
    a = PasskeyTask(200, 2, seed=4)
    a.next_batch()
    state = a.state_dict()
    nxt = a.next_batch()
    b = PasskeyTask(200, 2, seed=0)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(nxt, b.next_batch()))
    e1 = passkey_data(200, 2, seed=0, eval_samples=5).eval_batches
    e2 = passkey_data(200, 2, seed=7, eval_samples=5).eval_batches
    assert [b[0].shape[0] for b in e1] == [2, 2, 1]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(e1, e2))  # the same held-out set for every seed


def test_passkey_too_short_is_refused():
    with pytest.raises(InputError, match=r"needs seq_len >= \d+"):
        PasskeyTask(seq_len=40)
