"""Token files: written chunk by chunk, mapped without loading, sampled like the embedded corpus, and every
damaged or missing file named."""

import json

import numpy as np
import pytest

from revnet_core import token_file as tfm
from revnet_core.data import TrainingData, WindowSampler, eval_windows
from revnet_core.errors import ConfigError, DatasetUnavailableError, InputError


@pytest.mark.parametrize("vocab,dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"),
                                         (65537, "uint32"), (2**32, "uint32")])
def test_dtype_is_the_narrowest_that_holds_the_vocabulary(vocab, dtype):
    assert tfm.dtype_for(vocab) == np.dtype(dtype)


def test_dtype_refuses_bad_vocabularies():
    with pytest.raises(InputError, match="exceeds 2\\*\\*32"):
        tfm.dtype_for(2**32 + 1)
    with pytest.raises(InputError, match="positive integer"):
        tfm.dtype_for(0)


def test_round_trip_in_chunks_is_a_read_only_memmap(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50257, size=n) for n in (7, 0, 1000, 3)]
    path = tmp_path / "tok.bin"
    tf = tfm.write_tokens(path, iter(chunks), vocab_size=50257)
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16 and not tf.tokens.flags.writeable
    np.testing.assert_array_equal(np.asarray(tf.tokens), np.concatenate(chunks))
    assert path.stat().st_size == 1010 * 2
    header = json.loads(tfm.header_path(path).read_text())
    assert header["count"] == 1010 and header["vocab_size"] == 50257 and header["dtype"] == "uint16"
    tfm.open_tokens(path, verify=True)  # the SHA-256 and the id range hold


def test_a_single_array_or_list_is_one_chunk(tmp_path):
    a = tfm.write_tokens(tmp_path / "a.bin", np.arange(10), vocab_size=10)
    b = tfm.write_tokens(tmp_path / "b.bin", list(range(10)), vocab_size=10)
    assert a.sha256 == b.sha256 and a.count == b.count == 10


def test_bad_ids_are_refused_and_leave_no_file(tmp_path):
    path = tmp_path / "bad.bin"
    with pytest.raises(InputError, match="outside the vocabulary"):
        tfm.write_tokens(path, [np.arange(5), np.array([3, 300])], vocab_size=256)
    with pytest.raises(InputError, match="integers"):
        tfm.write_tokens(path, np.array([0.5, 1.0]), vocab_size=256)
    with pytest.raises(InputError, match="no tokens"):
        tfm.write_tokens(path, [], vocab_size=256)
    assert list(tmp_path.iterdir()) == []  # neither the data nor a temporary file nor a header


def test_text_files_become_bytes_joined_like_the_corpus(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("hello")
    (tmp_path / "t" / "b.txt").write_text("wörld")
    tf = tfm.text_to_token_file([tmp_path / "t"], tmp_path / "out.bin")
    assert bytes(np.asarray(tf.tokens)) == "hello\nwörld".encode() and tf.vocab_size == 256
    (tmp_path / "t" / "c.bin").write_bytes(b"\0\1")
    with pytest.raises(InputError, match="not a text file"):
        tfm.text_to_token_file([tmp_path / "t"], tmp_path / "out2.bin")


def test_the_command_line_writes_a_token_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc" * 10)
    assert tfm.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "x.bin")]) == 0
    assert "wrote 30 tokens" in capsys.readouterr().out
    assert tfm.open_tokens(tmp_path / "x.bin").count == 30


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "tok.bin"
    tfm.write_tokens(path, np.arange(1000) % 300, vocab_size=300)
    return path


def test_missing_file_is_a_dataset_unavailable_error_with_the_recipe(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="python -m revnet_core.token_file") as info:
        tfm.open_tokens(tmp_path / "nothing.bin")
    assert isinstance(info.value, ConfigError)


def test_truncated_longer_and_mismatched_files_are_named(written):
    data = written.read_bytes()
    written.write_bytes(data[:-3])
    with pytest.raises(InputError, match="truncated"):
        tfm.open_tokens(written)
    written.write_bytes(data + b"\0\0")
    with pytest.raises(InputError, match="does not belong"):
        tfm.open_tokens(written)
    written.write_bytes(data)
    header = json.loads(tfm.header_path(written).read_text())
    tfm.header_path(written).write_text(json.dumps({**header, "dtype": "uint8", "count": 2000}))
    with pytest.raises(InputError, match="cannot hold vocab_size=300"):
        tfm.open_tokens(written)
    tfm.header_path(written).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        tfm.open_tokens(written)
    tfm.header_path(written).write_text(json.dumps({**header, "format": "other"}))
    with pytest.raises(InputError, match="not a token file header"):
        tfm.open_tokens(written)
    tfm.header_path(written).unlink()
    with pytest.raises(InputError, match="has no header"):
        tfm.open_tokens(written)


def test_verify_finds_changed_bytes(written):
    data = bytearray(written.read_bytes())
    data[10] ^= 1
    written.write_bytes(bytes(data))
    tfm.open_tokens(written)  # the size still fits: only reading it all can tell
    with pytest.raises(InputError, match="SHA-256"):
        tfm.open_tokens(written, verify=True)


def test_token_data_reuses_the_window_sampler_and_holds_out_the_end(written):
    data = tfm.token_data(written, seq_len=16, batch_size=3, seed=4, eval_windows_max=4)
    assert isinstance(data, TrainingData) and isinstance(data.sampler, WindowSampler)
    assert data.units == "tokens" and data.identity["source"] == "token-file"
    assert data.identity["heldout_tokens"] == 50 and data.sampler.tokens.size == 950
    tokens = np.arange(1000) % 300
    ids, labels = data.sampler.next_batch()
    assert ids.shape == (3, 16) and ids.dtype == np.int64 and labels is None
    # the same windows a WindowSampler over the array in memory draws: the memmap is only the storage
    expected, _ = WindowSampler(tokens[:950], 16, 3, seed=4).next_batch()
    np.testing.assert_array_equal(ids, expected)
    held = np.concatenate([b[0] for b in data.eval_batches])
    np.testing.assert_array_equal(held, np.concatenate([b[0] for b in eval_windows(tokens[950:], 16, 4, 3)]))


def test_byte_token_files_report_bytes_and_too_short_files_are_refused(tmp_path):
    path = tmp_path / "b.bin"
    tfm.write_tokens(path, np.arange(40) % 256, vocab_size=256)
    assert tfm.token_data(path, seq_len=8, batch_size=1).units == "bytes"
    with pytest.raises(InputError, match="training part"):
        tfm.token_data(path, seq_len=30, batch_size=1)
    with pytest.raises(InputError, match="heldout_fraction"):
        tfm.split(tfm.open_tokens(path), 8, heldout_fraction=1.5)
