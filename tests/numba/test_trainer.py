"""``revnet train --backend numba``: the same files as torch's trainer; AdamW equal to torch's; what is not
built is refused by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("flag", [["--resume", "somewhere"], ["--scheduler", "adaptive"], ["--task", "passkey"]])
def test_unbuilt_options_are_refused_in_one_line(tmp_path, flag):
    r = revnet("--size", "tiny", "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "r"), "--no-progress", *flag)
    assert r.returncode != 0
    assert "not built in the numba trainer yet" in r.stderr or "revnet: error" in r.stderr
    assert "Traceback" not in r.stderr
