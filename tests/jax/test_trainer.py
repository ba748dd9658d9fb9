"""The JAX trainer: ``revnet train --backend jax``, bit-identical resume, refusals, and the torch trainer's
optimizer step on shared weights."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import revnet_core
from revnet_core.data import file_corpus, lm_data
from revnet_core.errors import ConfigError
from revnet_core.runlog import read_log
from revnet_jax import checkpoint as ckpt
from revnet_jax.model import ReversibleTransformerJAX
from revnet_jax.trainer import JAXTrainer

SMALL = dict(num_layers=2, d_model=16, num_heads=2, d_ff=24, vocab_size=256, max_seq_len=16)
HYPER = dict(lr=3e-3, warmup_steps=1, gradient_accumulation_steps=2, progress=False, plot=False, eval_every=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))
    (folder / "a.py").write_text(text)
    return file_corpus([folder])


def data_of(corpus):
    return lm_data(corpus, seq_len=16, batch_size=2, seed=3, eval_windows_max=2)


def train_losses(records):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]


def test_stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, corpus):
    # One model for the three runs, so the step compiles once; each run starts from the same initial weights.
    model = ReversibleTransformerJAX(dropout=0.1, **SMALL)  # dropout: the keys must be the same after a resume
    initial = model.params
    whole = JAXTrainer(model, out_dir=tmp_path / "whole", **HYPER)
    whole.fit(data_of(corpus), steps=4)

    def stop_at_2(trainer, record):
        if record["step"] == 2:
            trainer.request_stop()

    model.params = initial
    first = JAXTrainer(model, out_dir=tmp_path / "cut", callbacks=[stop_at_2], **HYPER)
    summary = first.fit(data_of(corpus), steps=4)
    assert summary["stopped"] and summary["step"] == 2
    model.params = initial
    second = JAXTrainer(model, **HYPER)  # out_dir: the checkpoint's folder
    summary = second.fit(data_of(corpus), steps=4, resume=tmp_path / "cut")
    assert summary["resumed_from"] == 2 and summary["step"] == 4 and not summary["stopped"]

    a, b = read_log(tmp_path / "whole" / "log.jsonl"), read_log(tmp_path / "cut" / "log.jsonl")
    assert [r["kind"] for r in b if r["kind"] in ("run", "resume")] == ["run", "resume"]
    assert len(train_losses(a)) == 4 and train_losses(a) == train_losses(b)  # exact floats
    assert [r["eval_loss"] for r in a if r["kind"] == "eval"] == [r["eval_loss"] for r in b if r["kind"] == "eval"]
    wa, wb = (load_file(tmp_path / run / ckpt.FILENAME) for run in ("whole", "cut"))
    assert sorted(wa) == sorted(wb) and any(k.startswith("optimizer/exp_avg_sq/") for k in wa)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert all(wa[k].dtype == np.float32 for k in wa)


def test_a_resume_refuses_other_settings_and_a_damaged_file(tmp_path, corpus):
    out = tmp_path / "run"
    model = ReversibleTransformerJAX(**SMALL)
    JAXTrainer(model, out_dir=out, **HYPER).fit(data_of(corpus), steps=1)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        JAXTrainer(model, out_dir=out, **HYPER).fit(data_of(corpus), steps=2)
    with pytest.raises(ckpt.CheckpointIncompatibleError, match="lr: checkpoint 0.003, now 0.001"):
        JAXTrainer(model, **{**HYPER, "lr": 1e-3}).fit(data_of(corpus), 2, resume=out)
    with pytest.raises(ckpt.CheckpointIncompatibleError, match="d_model"):
        JAXTrainer(ReversibleTransformerJAX(**{**SMALL, "d_model": 32}), **HYPER).fit(data_of(corpus), 2, resume=out)
    with pytest.raises(ConfigError, match="at or past steps=1"):
        JAXTrainer(model, **HYPER).fit(data_of(corpus), 1, resume=out)
    raw = bytearray((out / ckpt.FILENAME).read_bytes())
    raw[-5] ^= 1  # a bit of the last tensor
    (out / ckpt.FILENAME).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointCorruptError, match="sha256"):
        JAXTrainer(model, **HYPER).fit(data_of(corpus), 2, resume=out)
    for name, error in (("checkpoint.pt", ckpt.CheckpointCorruptError), ("checkpoint.npz", ckpt.CheckpointError)):
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_bytes(b"not a checkpoint")
        with pytest.raises(error, match="cannot be|numba"):
            JAXTrainer(model, **HYPER).fit(data_of(corpus), 2, resume=tmp_path / name)


def test_the_optimizer_step_is_torchs_and_a_torch_checkpoint_resumes_here(tmp_path, corpus):
    """Same weights, same batches: losses, gradient norms and the weights after four clipped AdamW steps (with
    warmup and cosine) agree with the torch trainer's to fp32 rounding; and a torch run stopped at step 2
    (its checkpoint.pt) continued by the JAX trainer ends where the uninterrupted torch run does."""
    import torch

    from revnet_jax.weights import to_canonical
    from revnet_torch.trainer import LongContextTrainer

    torch.manual_seed(0)
    tm = revnet_core.build("torch", **SMALL)
    tm.save_weights(tmp_path / "w.safetensors")
    start = load_file(tmp_path / "w.safetensors")
    hyper = dict(lr=3e-3, warmup_steps=1, gradient_accumulation_steps=2, progress=False, plot=False,
                 max_grad_norm=0.05, precision="fp32")  # a small clip norm: clipping acts on every step

    def stop_at_2(trainer, record):
        if record["step"] == 2:
            trainer.request_stop()

    cut = revnet_core.build("torch", weights=str(tmp_path / "w.safetensors"), **SMALL)
    LongContextTrainer(cut, device="cpu", drift_every=None, out_dir=tmp_path / "torch", callbacks=[stop_at_2],
                       **hyper).fit(data_of(corpus), steps=4)
    t = LongContextTrainer(tm, device="cpu", drift_every=None, **hyper)
    t.fit(data_of(corpus), steps=4)
    theirs = {k: v.detach().numpy() for k, v in tm.state_dict().items()}

    def close_to_torch(trainer, steps):
        tl = {s: (a, n) for s, a, n in train_losses(t.history)}
        for step, b, nb in train_losses(trainer.history):
            a, na = tl[step]
            assert abs(a - b) / a < 1e-5 and abs(na - nb) / na < 1e-4 and nb > 0.05  # clipped
        assert [s for s, _, _ in train_losses(trainer.history)] == steps
        ours = to_canonical(trainer.params)
        assert sorted(theirs) == sorted(ours)
        for k in ours:
            moved = np.abs(theirs[k] - start[k]).max()
            assert np.abs(ours[k] - theirs[k]).max() <= 1e-3 * max(moved, 1e-6) + 1e-7, k

    jm = revnet_core.build("jax", weights=str(tmp_path / "w.safetensors"), **SMALL)
    initial = jm.params
    j = JAXTrainer(jm, **hyper)
    j.fit(data_of(corpus), steps=4)
    close_to_torch(j, [1, 2, 3, 4])
    jm.params = initial  # the same model: the step compiles once; the checkpoint replaces the weights anyway
    resumed = JAXTrainer(jm, **hyper)
    summary = resumed.fit(data_of(corpus), steps=4, resume=tmp_path / "torch")
    assert summary["resumed_from"] == 2 and (tmp_path / "torch" / ckpt.FILENAME).exists()
    close_to_torch(resumed, [3, 4])
    assert [r["kind"] for r in read_log(tmp_path / "torch" / "log.jsonl") if r["kind"] in ("run", "resume")] == [
        "run", "resume"]


def test_revnet_train_backend_jax_writes_the_run_files(tmp_path, capsys, corpus):
    from revnet_zero.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_bytes(corpus.train.tobytes()[:8000])
    out = tmp_path / "run"
    argv = ["train", "--backend", "jax", "--data", str(tmp_path / "data"), "--layers", "1", "--d-model", "16",
            "--heads", "2", "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--eval-every", "2",
            "--eval-windows", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "bits per byte" in err
    records = read_log(out / "log.jsonl")
    assert records[0]["kind"] == "run" and records[0]["environment"]["jax"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 3]
    assert all("eval_bits_per_byte" in r for r in records if r["kind"] == "eval")
    result = json.loads((out / "run.json").read_text())
    assert result["step"] == 3 and result["precision"] == "fp32" and (out / "train.png").stat().st_size > 0
    assert main(argv[:-3] + ["--steps", "4", "--resume", str(out), "--no-progress"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]
    for flags, match in ((["--precision", "fp16"], "fp16"), (["--scheduler", "balanced"], "--scheduler")):
        assert main(argv[:-3] + ["--out", str(tmp_path / "x"), *flags]) == 2
        assert match in capsys.readouterr().err


def test_a_jax_checkpoint_resumes_in_the_torch_trainer(tmp_path, corpus):
    """The other direction: a JAX run stopped at step 2 (checkpoint.safetensors) continued by the torch trainer
    ends where the uninterrupted torch run does (fp32 rounding of two frameworks), at the same LRs."""
    import torch

    from revnet_torch.trainer import LongContextTrainer

    torch.manual_seed(0)
    revnet_core.build("torch", **SMALL).save_weights(tmp_path / "w.safetensors")
    start = load_file(tmp_path / "w.safetensors")
    hyper = dict(lr=3e-3, warmup_steps=1, gradient_accumulation_steps=2, progress=False, plot=False,
                 max_grad_norm=0.05, precision="fp32")

    def stop_at_2(trainer, record):
        if record["step"] == 2:
            trainer.request_stop()

    jm = revnet_core.build("jax", weights=str(tmp_path / "w.safetensors"), **SMALL)
    JAXTrainer(jm, out_dir=tmp_path / "jax", callbacks=[stop_at_2], **hyper).fit(data_of(corpus), steps=4)
    whole = revnet_core.build("torch", weights=str(tmp_path / "w.safetensors"), **SMALL)
    t = LongContextTrainer(whole, device="cpu", drift_every=None, **hyper)
    t.fit(data_of(corpus), steps=4)
    resumed_model = revnet_core.build("torch", weights=str(tmp_path / "w.safetensors"), **SMALL)
    resumed = LongContextTrainer(resumed_model, device="cpu", drift_every=None, **hyper)
    summary = resumed.fit(data_of(corpus), steps=4, resume=tmp_path / "jax")
    assert summary["resumed_from"] == 2 and summary["step"] == 4

    ref = {r["step"]: r for r in t.history if r["kind"] == "train"}
    got = [r for r in resumed.history if r["kind"] == "train"]
    assert [r["step"] for r in got] == [3, 4]
    for r in got:
        a = ref[r["step"]]
        assert r["lr"] == pytest.approx(a["lr"], rel=1e-12)  # the schedule's position carried over
        assert abs(r["loss"] - a["loss"]) / a["loss"] < 1e-5
        assert abs(r["grad_norm"] - a["grad_norm"]) / a["grad_norm"] < 1e-4
    theirs = {k: v.detach().numpy() for k, v in whole.state_dict().items()}
    ours = {k: v.detach().numpy() for k, v in resumed_model.state_dict().items()}
    for k in theirs:
        moved = np.abs(theirs[k] - start[k]).max()
        assert np.abs(ours[k] - theirs[k]).max() <= 1e-3 * max(moved, 1e-6) + 1e-7, k
    # AdamW's moments came across too: without them step 3 would move the weights differently
    state = resumed.optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 4 for s in state.values())
    # the torch run saved its checkpoint.pt beside the JAX file: both trainers now resume the newer one
    from revnet_torch import checkpoint as torch_ckpt

    assert ckpt.resolve(tmp_path / "jax").name == torch_ckpt.resolve(tmp_path / "jax").name == "checkpoint.pt"
