"""``revnet train --backend numba``: the same files as torch's trainer; AdamW equal to torch's; what is not
built is refused by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from revnet_core.errors import CheckpointIncompatibleError, ConfigError
from revnet_core.settings import TrainSettings, make_data
from revnet_numba import trainer
from revnet_numba.optim import AdamW


def test_adamw_equals_torch():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = AdamW(params, lr=1e-2, weight_decay=0.1, decay=["w"])
    theirs = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.1}, {"params": [tp["b"]], "weight_decay": 0.0}],
                               lr=1e-2)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        theirs.step()
        ours.step(grads)
    for k in params:
        assert np.abs(params[k] - tp[k].detach().numpy()).max() < 1e-14


def revnet(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "revnet_zero", "train", "--backend", "numba", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_train_writes_the_log_plot_checkpoint_and_result(tmp_path):
    out = tmp_path / "run"
    r = revnet("--size", "tiny", "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2",
               "--eval-windows", "2", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"log.jsonl", "train.png", "run.json", "checkpoint.npz"}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run", "train", "train", "eval", "train", "train", "eval"]
    assert all(np.isfinite(r["loss"]) and r["mem_bytes"] > 0 for r in records if r["kind"] == "train")
    assert records[-1]["eval_bits_per_byte"] > 0
    result = json.loads((out / "run.json").read_text())
    assert result["step"] == 4 and result["config"]["num_layers"] == 2
    ckpt = np.load(out / "checkpoint.npz")
    assert json.loads(ckpt["meta"].tobytes())["step"] == 4
    assert ckpt["param/head.weight"].shape == (256, 64)


@pytest.mark.parametrize("flag", [["--scheduler", "adaptive"], ["--task", "passkey"]])
def test_unbuilt_options_are_refused_in_one_line(tmp_path, flag):
    r = revnet("--size", "tiny", "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "r"), "--no-progress", *flag)
    assert r.returncode != 0
    assert "not built in the numba trainer yet" in r.stderr or "revnet: error" in r.stderr
    assert "Traceback" not in r.stderr


def _settings(out, **kw):
    base = dict(size="tiny", layers=2, d_model=32, heads=2, steps=5, seq_len=24, batch_size=2, grad_accum=2,
                eval_every=0, eval_windows=2, checkpoint_every=2, out=str(out), progress=False, plot=False,
                lr=3e-3, warmup=2)
    return TrainSettings(**{**base, **kw})


def _train_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    trainer.run(_settings(whole), make_data(_settings(whole)))

    cut = tmp_path / "cut"
    real_step, calls = trainer.train_step, []

    def dies_at_step_4(*args, **kwargs):  # the process "dies" during step 4: the step-2 checkpoint remains
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(_settings(cut), make_data(_settings(cut)))
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert json.loads(np.load(cut / "checkpoint.npz")["meta"].tobytes())["step"] == 2
    assert not list(cut.glob("*.tmp*"))  # no temporary file left (.checkpoint.npz.tmp-PID)

    resumed = _settings(cut, resume=str(cut))
    summary = trainer.run(resumed, make_data(resumed))
    assert summary["resumed_from"] == 2
    kinds = [json.loads(line)["kind"] for line in (cut / "log.jsonl").read_text().splitlines()]
    # steps 3's first try was logged, then dropped: the log holds what an uninterrupted run's does
    assert kinds == ["run", "train", "train", "resume", "train", "train", "train", "eval"]
    a, b = _train_records(whole), _train_records(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    with np.load(whole / "checkpoint.npz") as za, np.load(cut / "checkpoint.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            if k != "meta":
                assert np.array_equal(za[k], zb[k]), k


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    out = tmp_path / "r"
    trainer.run(_settings(out, steps=2), make_data(_settings(out, steps=2)))
    other = _settings(out, steps=4, lr=1e-3, resume=str(out))
    with pytest.raises(CheckpointIncompatibleError, match="a run with other settings: lr: checkpoint"):
        trainer.run(other, make_data(other))
    done = _settings(out, steps=2, resume=str(out))
    with pytest.raises(ConfigError, match="at step 2 of 2"):
        trainer.run(done, make_data(done))
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        trainer.run(_settings(out, steps=3), make_data(_settings(out, steps=3)))
