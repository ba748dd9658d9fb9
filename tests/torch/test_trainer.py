"""The training loop: the seed README's call shapes, accumulation, clipping, logs, plot, passkey, and the CPU
parity smoke. The schedule, the dataset coercion and the log helpers are framework-free: tests/core."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import revnet_core
from revnet_core import ConfigError, InputError
from revnet_zero.cli import main
from revnet_core.data import lm_data, stdlib_corpus
from revnet_core.runlog import read_log
from revnet_torch.trainer import LongContextTrainer

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=2, d_model=32, num_heads=2, d_ff=48, vocab_size=256, max_seq_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only cost (conftest)


def tiny(seed=0, **fields):
    torch.manual_seed(seed)
    return revnet_core.build("torch", **{**TINY, **fields})


TEXTS = [f"text number {i}: " + "pack my box with five dozen liquor jugs. " * (3 + i % 4) for i in range(12)]


# --- the seed README's call shapes ---------------------------------------------------------------------
def test_readme_call_shape_on_a_list_of_texts():
    trainer = LongContextTrainer(model=tiny(), max_length=64, gradient_accumulation_steps=2, progress=False)
    summary = trainer.train(train_dataset=TEXTS[:10], eval_dataset=TEXTS[10:], num_epochs=2, batch_size=2)
    pieces = sum(math.ceil(len(t.encode()) / 64) for t in TEXTS[:10])
    assert summary["steps"] == math.ceil(2 * pieces / (2 * 2))  # epochs x pieces / (batch x accumulation)
    assert summary["eval"]["eval_bits_per_byte"] > 0
    assert trainer.max_grad_norm == 1.0  # clipping is on unless turned off


def test_dataset_of_token_tensors_reports_bits_per_token():
    class Ids(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.arange(i, i + 40) % 50

    trainer = LongContextTrainer(model=tiny(vocab_size=50), max_length=32, progress=False)
    summary = trainer.train(train_dataset=Ids(), eval_dataset=Ids(), num_epochs=1, batch_size=3)
    assert "eval_bits_per_token" in summary["eval"] and "eval_bits_per_byte" not in summary["eval"]


def test_memory_efficient_optimizer_updates_one_tensor_at_a_time():
    trainer = LongContextTrainer(model=tiny(), max_length=64, progress=False)
    trainer.train(train_dataset=TEXTS[:2], num_epochs=1, batch_size=2, memory_efficient_optimizer=True)
    assert all(g["foreach"] is False for g in trainer.optimizer.param_groups)
    plain = LongContextTrainer(model=tiny(), max_length=64, progress=False)
    plain.train(train_dataset=TEXTS[:2], num_epochs=1, batch_size=2)
    assert all(g["foreach"] is not False for g in plain.optimizer.param_groups)


@pytest.mark.parametrize("keyword, value, message", [
    ("attention_window_size", 0, "attention_window=0 must be a positive integer"),
    ("max_length", 128, "exceeds the model's max_seq_len=64"),
    ("gradient_accumulation_steps", 0, "must be a positive integer"),
    ("precision", "fp8", "is not one of"),
])
def test_unsupported_or_bad_keywords_raise(keyword, value, message):
    with pytest.raises(ConfigError, match=message):
        LongContextTrainer(model=tiny(), **{keyword: value})


def test_linear_attention_approximation_trains_the_windowed_rf_model():
    """The flag makes every layer Rational-Fourier attention (the window: exact softmax within it), recorded in
    the config, and a few steps on the embedded corpus lower the loss."""
    model = tiny()
    trainer = LongContextTrainer(model=model, max_length=64, use_linear_attention_approximation=True,
                                 attention_window_size=16, lr=3e-3, warmup_steps=0, eval_every=1000,
                                 progress=False)
    assert (model.config.attention_kind, model.config.attention_window) == ("rf", 16)
    assert all(layer.attn.block.attn.kernel == "gaussian" and layer.attn.block.window == 16 for layer in model.layers)
    trainer.fit(lm_data(stdlib_corpus(), 64, 4), steps=10)
    losses = [r["loss"] for r in trainer.history if r["kind"] == "train"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses


def test_bad_tensor_datasets_raise_clear_errors():
    """The rules are the core's (tests/core/test_data.py); here torch tensors of any dtype reach them."""
    trainer = LongContextTrainer(model=tiny(), progress=False)
    with pytest.raises(InputError, match="empty"):
        trainer.train(train_dataset=["", "a"], num_epochs=1)
    for floats in (torch.randn(10), torch.randn(10, requires_grad=True), torch.randn(10).bfloat16()):
        with pytest.raises(InputError, match="integer token ids"):
            trainer.train(train_dataset=[floats], num_epochs=1)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        trainer.train(train_dataset=[torch.tensor([1, 2, 300])], num_epochs=1)


def test_sequence_longer_than_max_length_is_refused():
    trainer = LongContextTrainer(model=tiny(), max_length=32, progress=False)
    with pytest.raises(InputError, match="seq_len=48 exceeds max_length=32"):
        trainer.fit(lm_data(stdlib_corpus(), 48, 1), steps=1)


# --- the loop's mechanics ------------------------------------------------------------------------------
def capture_grads(trainer, into):
    """Record the gradients each optimizer step sees (after accumulation and clipping)."""
    setup = trainer._setup_optimizer

    def wrapped(steps):
        setup(steps)
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: into.append([p.grad.detach().clone() for p in trainer.model.parameters()]))

    trainer._setup_optimizer = wrapped


def test_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 sequences make the same step as one batch of 4 (token-mean loss over the step)."""
    seqs = [torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        grads = []
        trainer = LongContextTrainer(model=tiny().double(), max_length=24, gradient_accumulation_steps=accum,
                                     max_grad_norm=None, progress=False)
        capture_grads(trainer, grads)
        trainer.train(train_dataset=seqs, num_epochs=1, batch_size=batch)
        results.append((trainer.history[1]["loss"], grads[0]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)  # the loss head works in fp32
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_gradients_are_clipped_before_the_optimizer_step():
    grads = []
    trainer = LongContextTrainer(model=tiny(), max_length=64, max_grad_norm=0.05, progress=False)
    capture_grads(trainer, grads)
    trainer.train(train_dataset=TEXTS[:4], num_epochs=1, batch_size=2)
    logged = [r["grad_norm"] for r in trainer.history if r["kind"] == "train"]
    assert len(grads) == len(logged) >= 2
    assert all(n > 0.05 for n in logged)  # the log shows the norm before clipping
    assert all(torch.nn.utils.get_total_norm(g).item() <= 0.05 * (1 + 1e-5) for g in grads)


# --- through the CLI: log, plot, checkpoint, the corpus record ----------------------------------------------
def test_cli_train_writes_log_plot_checkpoint_and_result(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--size", "tiny", "--layers", "2", "--d-model", "32", "--seq-len", "32", "--steps", "6",
                 "--batch-size", "2", "--eval-every", "3", "--eval-windows", "4", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bits per byte" in captured.out and "checkpoint" in captured.out
    log = read_log(out / "log.jsonl")
    header = log[0]
    assert header["kind"] == "run"
    assert header["data"]["source"] == "python-stdlib" and len(header["data"]["sha256"]) == 64
    assert header["data"]["python_version"] == header["environment"]["python"]
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes"} <= set(train[0])
    assert [r["step"] for r in log if r["kind"] == "eval"] == [3, 6]
    assert (out / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").stat().st_size > 0
    result = json.loads((out / "run.json").read_text())
    assert result["data"]["sha256"] == stdlib_corpus().sha256
    assert result["environment"]["python"] and result["eval"]["eval_bits_per_byte"] > 0


def test_cli_scheduler_strategy_picks_the_policies(tmp_path, capsys):
    """--scheduler overrides --policy: 'aggressive' reverses every layer although --policy asks to store."""
    out = tmp_path / "run"
    code = main(["train", "--size", "tiny", "--layers", "3", "--d-model", "32", "--seq-len", "32", "--steps", "2",
                 "--batch-size", "2", "--eval-windows", "2", "--out", str(out), "--no-progress", "--no-plot",
                 "--policy", "store", "--scheduler", "aggressive"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["policies"] == ["reverse"] * 3
    assert main(["train", "--scheduler", "greedy"]) == 2
    assert "scheduler" in capsys.readouterr().err


def test_cli_passkey_task_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "pk"
    code = main(["train", "--task", "passkey", "--size", "tiny", "--seq-len", "128", "--steps", "3",
                 "--batch-size", "2", "--eval-windows", "4", "--out", str(out), "--no-progress", "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "passkey accuracy" in captured.out
    ev = json.loads((out / "run.json").read_text())["eval"]
    assert 0.0 <= ev["eval_accuracy"] <= 1.0 and 0.0 <= ev["eval_token_accuracy"] <= 1.0
    assert ev["eval_loss"] > 0


def test_cli_config_file_and_policy_list(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nsize = "tiny"\nseq_len = 32\nsteps = 2\nbatch_size = 2\neval_windows = 2\n'
                   'policy = "reverse,store"\nprogress = false\nplot = false\n')
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    header = read_log(tmp_path / "r" / "log.jsonl")[0]
    assert header["config"]["num_layers"] == 2 and header["config"]["max_seq_len"] == 32


def test_cli_bf16_on_cpu(tmp_path, capsys):
    code = main(["train", "--size", "tiny", "--seq-len", "32", "--steps", "2", "--batch-size", "2",
                 "--eval-windows", "2", "--precision", "bf16", "--out", str(tmp_path / "r"), "--no-progress",
                 "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bf16" in captured.out


# --- accuracy parity: the CPU smoke of benchmarks/parity.py (no tolerance claim from tiny runs) --------------
def test_parity_smoke_trains_both_models_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    out = tmp_path / "parity.json"
    assert parity.main(["--tiny", "--in-process", "--seeds", "0", "1", "--steps", "25", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["python"] and len(env["corpus"]["sha256"]) == 64 and "parity.py" in env["command"]
    runs = result["runs"]
    assert sorted((r["model"], r["seed"]) for r in runs) == [("plain", 0), ("plain", 1), ("reversible", 0),
                                                             ("reversible", 1)]
    assert len({r["params"] for r in runs}) == 1  # same parameter count
    for r in runs:
        assert r["train_loss_last10"] < r["train_loss_first10"] - 0.3, r  # both train
    summary = result["summary"]
    assert set(summary["heldout_bpb"]) == {"reversible", "plain"}
    assert summary["no_worse_than_1_percent"] is None and "no tolerance claim" in summary["note"]

    # One seed per command, merged afterwards: the same summary as one command with both seeds.
    halves = []
    for seed in (0, 1):
        part = {**result, "runs": [r for r in runs if r["seed"] == seed]}
        halves.append(tmp_path / f"seed{seed}.json")
        halves[-1].write_text(json.dumps(part))
    merged = tmp_path / "merged.json"
    assert parity.main(["--merge", *map(str, halves), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["summary"] == summary
    assert parity.main(["--merge", str(halves[0]), str(halves[0]), "--out", str(merged)]) == 2


# --- docs/training.md: every code block runs ------------------------------------------------------------------
def doc_blocks(path):
    """(language, text) of every fenced block of a markdown file."""
    blocks, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(lines)))
                lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"unclosed code block in {path}"
    return blocks


def test_every_code_block_of_the_training_doc_runs(tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_texts").mkdir()
    for i in range(3):
        (tmp_path / "my_texts" / f"{i}.txt").write_text(f"my text {i}. " + "all work and no play. " * 60)
    blocks = doc_blocks(ROOT / "docs" / "training.md")
    assert {lang for lang, _ in blocks} == {"bash", "toml", "python"}
    for lang, text in blocks:
        if lang == "bash":
            for line in filter(None, (ln.strip() for ln in text.splitlines())):
                argv = shlex.split(line)
                if argv[:3] == ["python", "-m", "revnet_core.token_file"]:  # making a token file
                    from revnet_core.token_file import main as token_file_main

                    assert token_file_main(argv[3:]) in (0, None), line
                    continue
                assert argv[0] == "revnet", line
                code = main(argv[1:])
                assert code == 0, (line, capsys.readouterr().err)
        elif lang == "toml":
            (tmp_path / "doc.toml").write_text(text)
            code = main(["train", "--config", "doc.toml", "--out", "runs/toml", "--no-progress"])
            assert code == 0, capsys.readouterr().err
        else:
            exec(compile(text, "docs/training.md", "exec"), {"__name__": "__doc__"})
    assert (tmp_path / "runs" / "resumable" / "checkpoint.pt").exists()
    steps = [r["step"] for r in read_log(tmp_path / "runs" / "resumable" / "log.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 21))


def test_attention_window_size_sets_a_sliding_window_that_changes_the_model():
    ids = torch.randint(0, 256, (1, 48))
    full = tiny()
    windowed = tiny()
    windowed.load_state_dict(full.state_dict())
    trainer = LongContextTrainer(model=windowed, max_length=48, attention_window_size=8, progress=False)
    assert trainer.config.attention_window == 8 == windowed.config.attention_window
    assert all(layer.attn.block.window == 8 for layer in windowed.layers)
    assert not torch.allclose(full(ids).loss, windowed(ids).loss)
    summary = trainer.train(train_dataset=TEXTS[:2], num_epochs=1, batch_size=1)
    assert torch.isfinite(torch.tensor(summary["loss"]))


# --- fp16 with a dynamic loss scaler (issue 24), on CPU --------------------------------------------------
def corpus_data(seed=0):
    return lm_data(stdlib_corpus(), seq_len=32, batch_size=4, seed=seed, eval_windows_max=4)


def test_fp16_trains_with_fp32_streams_and_a_scaler():
    from revnet_zero.training import ReversibleAMPTrainer

    trainer = ReversibleAMPTrainer(tiny(), fp16=True, loss_scale="dynamic", keep_batchnorm_fp32=True, lr=3e-3,
                                   warmup_steps=2, progress=False, device="cpu")
    summary = trainer.fit(corpus_data(), steps=24)
    losses = [r["loss"] for r in trainer.history if r["kind"] == "train"]
    assert summary["precision"] == "fp16" and trainer.amp_dtype == torch.float16
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # it learns
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert {"loss_scale", "overflow", "overflow_steps"} <= set(next(r for r in trainer.history[::-1] if r["kind"] == "train"))


def test_fp16_logs_the_mean_loss_per_target_not_the_scaled_one():
    # The first step's loss of the same weights on the same batch: fp16 autocast may round, not rescale.
    first = {}
    for precision in ("fp32", "fp16"):
        trainer = LongContextTrainer(tiny(), precision=precision, lr=3e-3, progress=False, device="cpu")
        trainer.fit(corpus_data(), steps=1)
        first[precision] = next(r["loss"] for r in trainer.history if r["kind"] == "train")
    assert first["fp16"] == pytest.approx(first["fp32"], rel=2e-2)


def test_an_overflow_step_is_skipped_and_counted():
    trainer = LongContextTrainer(tiny(), precision="fp16", lr=3e-3, progress=False, device="cpu")
    weights = {}

    def before_and_after(t, record):
        weights[record["step"]] = [p.detach().clone() for p in t.model.parameters()]

    trainer.callbacks.append(before_and_after)
    param = trainer.model.embed.weight
    # An inf gradient in step 3 only (trainer.step is still 2 during it).
    param.register_hook(lambda g: g * math.inf if trainer.step == 2 else g)
    summary = trainer.fit(corpus_data(), steps=5)
    records = {r["step"]: r for r in trainer.history if r["kind"] == "train"}
    assert records[3]["overflow"] and not records[2]["overflow"] and not records[4]["overflow"]
    assert records[3]["loss_scale"] == records[2]["loss_scale"] / 2  # backed off
    assert records[5]["overflow_steps"] == summary["overflow_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # the step was skipped
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))


def test_fp16_resume_restores_the_scaler_bit_for_bit(tmp_path):
    from revnet_torch import checkpoint as ckpt

    def trainer(out, seed=0, **kw):
        return LongContextTrainer(tiny(seed), precision="fp16", lr=3e-3, warmup_steps=2, out_dir=out,
                                  progress=False, plot=False, device="cpu", **kw)

    full = trainer(tmp_path / "full")
    full.fit(corpus_data(), steps=8)
    stop = trainer(tmp_path / "cut", callbacks=[lambda t, r: r["step"] == 4 and t.request_stop()])
    stop.fit(corpus_data(), steps=8)
    saved = ckpt.load_checkpoint(tmp_path / "cut")["amp"]
    assert saved["scaler"] == stop.scaler.state_dict()
    resumed = trainer(tmp_path / "cut", seed=5)
    resumed.fit(corpus_data(), steps=8, resume=tmp_path / "cut")
    expected = {r["step"]: (r["loss"], r["loss_scale"]) for r in full.history if r["kind"] == "train"}
    got = {r["step"]: (r["loss"], r["loss_scale"]) for r in resumed.history if r["kind"] == "train"}
    assert got == {s: expected[s] for s in range(5, 9)}
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))


def test_amp_trainer_refuses_what_it_cannot_honour():
    from revnet_zero.training import ReversibleAMPTrainer

    with pytest.raises(ConfigError, match="keep_batchnorm_fp32=False"):
        ReversibleAMPTrainer(tiny(), keep_batchnorm_fp32=False)
    with pytest.raises(ConfigError, match="loss_scale='static'"):
        ReversibleAMPTrainer(tiny(), loss_scale="static")


def test_cli_fp16_run_reports_overflow_count(tmp_path, capsys):
    code = main(["train", "--size", "tiny", "--seq-len", "32", "--steps", "3", "--batch-size", "2", "--eval-windows",
                 "2", "--precision", "fp16", "--device", "cpu", "--no-progress", "--no-plot", "--out",
                 str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "fp16" in out.out and "overflow steps skipped" in out.out


# --- what the CLI shows -----------------------------------------------------------------------------------
def test_cli_no_progress_keeps_eval_lines_and_a_resume_says_so(tmp_path, capsys):
    from revnet_core.runlog import log_figure

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    flags = ["train", "--size", "tiny", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2", "--eval-every",
             "2", "--data", str(text), "--no-progress", "--no-plot"]
    assert main([*flags, "--steps", "3", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert "step 2: eval loss" in out.err and "step 3: eval loss" in out.err  # --no-progress hides the bar only
    assert "held-out loss" in out.out and "(step 3)" in out.out
    assert main([*flags, "--steps", "5", "--resume", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert f"revnet train: resuming {tmp_path / 'run'}" in out.err
    assert "resumed from step 3 of" in out.err and "(resumed from step 3)" in out.out
    fig = log_figure(read_log(tmp_path / "run" / "log.jsonl"))
    marks = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in marks] == [3] and marks[0].get_label() == "resumed"


def test_summary_after_a_stop_says_which_step_the_held_out_loss_is_from(capsys):
    from revnet_zero.cli import _print_summary

    trainer = LongContextTrainer(tiny(), eval_every=2, progress=False,
                                 callbacks=[lambda t, r: r["step"] == 3 and t.request_stop()])
    summary = trainer.fit(lm_data(stdlib_corpus(), seq_len=32, batch_size=2, eval_windows_max=2), steps=10)
    assert summary["stopped"] and summary["step"] == 3 and summary["eval"]["step"] == 2
    _print_summary(None, summary)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "held-out loss" in x]
    assert "(step 2)" in line
