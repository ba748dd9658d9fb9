"""Checkpoints: exact resume, atomic writes, and clear errors for corrupt or incompatible files."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import revnet_core
from revnet_zero.cli import main
from revnet_core.data import file_corpus, lm_data
from revnet_torch import checkpoint as ckpt
from revnet_torch.trainer import LongContextTrainer, read_log

TINY = dict(num_layers=2, d_model=32, num_heads=2, d_ff=48, vocab_size=256, max_seq_len=32, dropout=0.1)
CLI_TINY = ["train", "--size", "tiny", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32",
            "--batch-size", "2", "--eval-windows", "2", "--no-progress", "--no-plot"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and an OpenMP pool on a busy 2-core machine costs 10x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(24):
        (folder / f"f{i:02d}.txt").write_text(f"file {i}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    return folder


def make_trainer(out, seed=0, **kw):
    torch.manual_seed(seed)
    model = revnet_core.build("torch", **TINY)  # dropout on: the resumed run must replay the torch RNG too
    return LongContextTrainer(model, lr=3e-3, warmup_steps=2, eval_every=4, out_dir=out, progress=False,
                              plot=False, **kw)


def train_losses(history):
    return {r["step"]: r["loss"] for r in history if r["kind"] == "train"}


def test_stopped_and_resumed_run_matches_uninterrupted_bit_for_bit(tmp_path, corpus):
    data = lambda: lm_data(file_corpus([corpus]), 32, 2, seed=5, eval_windows_max=2)  # noqa: E731
    full = make_trainer(tmp_path / "full")
    full.fit(data(), steps=8)

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            trainer.request_stop()

    first = make_trainer(tmp_path / "cut", callbacks=[stop_at_3])
    summary = first.fit(data(), steps=8)
    assert summary["stopped"] and summary["step"] == 3
    assert ckpt.load_checkpoint(tmp_path / "cut")["step"] == 3

    torch.manual_seed(123)  # a different global RNG state and init: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "cut", seed=99)
    resumed.fit(data(), steps=8, resume=tmp_path / "cut")

    expected = train_losses(full.history)
    got = train_losses(resumed.history)
    assert sorted(got) == [4, 5, 6, 7, 8]
    assert [got[s] for s in got] == [expected[s] for s in got]  # exact equality, not a tolerance
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    log = read_log(tmp_path / "cut" / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))
    assert [r["kind"] for r in log if r["kind"] in ("run", "resume")] == ["run", "resume"]


def test_checkpoint_holds_everything_for_a_resume(tmp_path, corpus):
    trainer = make_trainer(tmp_path / "run")
    trainer.fit(lm_data(file_corpus([corpus]), 32, 2, eval_windows_max=2), steps=2)
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "rng", "data", "step", "config", "run", "backend"):
        assert key in state
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["data"]["kind"] == "windows" and state["data"]["batches"] == 2
    assert state["backend"] == "torch" and state["step"] == 2
    assert state["run"]["data"]["sha256"] == file_corpus([corpus]).sha256


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "payload": torch.arange(4)})

    def dies_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 2, "payload": torch.arange(4)})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left behind


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


# --- through the CLI: clear messages, exit code 2, no traceback -------------------------------------------
def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


@pytest.fixture
def finished_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "2", "--data", str(corpus), "--out", str(out))
    assert code == 0, err
    return out


def test_resume_extends_a_finished_run(finished_run, corpus, capsys):
    code, stdout, err = run_cli(capsys, *CLI_TINY, "--steps", "4", "--data", str(corpus), "--resume", str(finished_run))
    assert code == 0, err
    assert "step 4/4" in stdout
    steps = [r["step"] for r in read_log(finished_run / "log.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_truncated_checkpoint_is_reported(finished_run, corpus, capsys):
    path = finished_run / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "4", "--data", str(corpus), "--resume", str(finished_run))
    assert code == 2
    assert "corrupt or truncated" in err and "checkpoint.pt" in err


def test_a_file_that_is_no_checkpoint_is_reported(tmp_path, corpus, capsys):
    bogus = tmp_path / "weights.pt"
    torch.save({"some": torch.zeros(2)}, bogus)
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "4", "--data", str(corpus), "--resume", str(bogus))
    assert code == 2 and "not a RevNet-Zero training checkpoint" in err


def test_wrong_model_config_is_reported(finished_run, corpus, capsys):
    code, _, err = run_cli(capsys, *CLI_TINY, "--d-model", "64", "--steps", "4", "--data", str(corpus),
                           "--resume", str(finished_run))
    assert code == 2
    assert "different model config" in err and "d_model: checkpoint 32, now 64" in err


def test_wrong_backend_is_reported(finished_run, corpus, capsys):
    path = finished_run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["backend"] = "jax"
    torch.save(state, path)
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "4", "--data", str(corpus), "--resume", str(finished_run))
    assert code == 2 and "written by the 'jax' backend" in err and "uses 'torch'" in err


def test_other_data_is_reported(finished_run, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("completely different text, long enough for a window or two. " * 40)
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "4", "--data", str(other), "--resume", str(finished_run))
    assert code == 2 and "other settings" in err and "sha256" in err


def test_an_existing_run_is_not_overwritten(finished_run, corpus, capsys):
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "2", "--data", str(corpus), "--out", str(finished_run))
    assert code == 2 and "already holds a checkpoint" in err


def test_resuming_past_the_end_asks_for_more_steps(finished_run, corpus, capsys):
    code, _, err = run_cli(capsys, *CLI_TINY, "--steps", "2", "--data", str(corpus), "--resume", str(finished_run))
    assert code == 2 and "ask for more steps" in err


def test_missing_checkpoint_is_reported(tmp_path, corpus, capsys):
    code, _, err = run_cli(capsys, *CLI_TINY, "--data", str(corpus), "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "nothing to resume" in err


# --- Ctrl-C in a real process ------------------------------------------------------------------------------
def test_ctrl_c_checkpoints_and_resume_continues_exactly(tmp_path, corpus, capsys):
    """SIGINT stops a `revnet train` process at a step boundary with a checkpoint; resuming it gives the
    losses of an uninterrupted run. A constant LR after warmup 0 lets the resumed run ask for fewer steps
    than the interrupted one without changing the schedule."""
    flags = [*CLI_TINY, "--data", str(corpus), "--warmup", "0", "--min-lr-ratio", "1.0", "--eval-every", "1000"]
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "revnet_zero", *flags, "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"kind": "train"' in line) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with" in stderr and "--resume" in stderr
    k = ckpt.load_checkpoint(out)["step"]
    assert k >= 3

    code, _, err = run_cli(capsys, *flags, "--steps", str(k + 2), "--resume", str(out))
    assert code == 0, err
    code, _, err = run_cli(capsys, *flags, "--steps", str(k + 2), "--out", str(tmp_path / "full"))
    assert code == 0, err
    got = train_losses(read_log(out / "log.jsonl"))
    expected = train_losses(read_log(tmp_path / "full" / "log.jsonl"))
    assert got == expected
