"""LongContextPretraining: the README's recipe at tiny sizes, checkpoints every save_every steps, an exact
resume, token files, and named errors for data it cannot load and models that cannot fit."""

import numpy as np
import pytest
import torch

from revnet_core import token_file
from revnet_core.errors import ConfigError, DatasetUnavailableError, InputError, TrainingError
from revnet_core.presets import preset_config
from revnet_torch import checkpoint as ckpt
from revnet_torch.pretraining import LongContextPretraining, predicted_peak_bytes
from revnet_torch.trainer import read_log
from revnet_zero.examples import LongContextPretraining as Exported

QUIET = dict(progress=False, plot=False, eval_windows=2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only cost on a busy machine
    yield
    torch.set_num_threads(before)


def tiny(out, **kw):
    return LongContextPretraining("tiny", context_length=64, batch_size=2, gradient_accumulation=2, out_dir=out,
                                  **{**QUIET, **kw})


def test_readme_example_as_written_at_tiny_size_checkpoints_every_save_every(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out_dir, runs/pretrain, lands here
    seen = {}

    def look(trainer, record):  # the trainer saves after its callbacks: at step 4 the file holds step 3
        if record["step"] == 4:
            seen[4] = ckpt.load_checkpoint("runs/pretrain")["step"]

    assert Exported is LongContextPretraining
    pretrainer = Exported(
        model_size='tiny',
        context_length=64,
        batch_size=2,
        gradient_accumulation=2,
        callbacks=[look], **QUIET,
    )
    summary = pretrainer.run(
        dataset='embedded',
        num_steps=6,
        save_every=3
    )
    assert seen == {4: 3}
    assert summary["steps"] == 6 and summary["resumed_from"] is None and not summary["stopped"]
    assert ckpt.load_checkpoint(summary["checkpoint"])["step"] == 6
    assert summary["heldout_bits_per_byte"] > 0 and np.isfinite(summary["loss"]) and summary["peak_mem_bytes"] > 0
    assert summary["params"] == sum(p.numel() for p in pretrainer.model.parameters())
    assert pretrainer.model.config.num_layers == preset_config("tiny").num_layers
    assert summary["trainer"]["data"]["source"] == "python-stdlib"
    train = [r for r in read_log(tmp_path / "runs" / "pretrain" / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["tokens"] == 2 * 2 * 64 for r in train)


def test_a_crashed_run_resumes_from_its_last_checkpoint_bit_for_bit(tmp_path, capsys):
    full = tiny(tmp_path / "full")
    full.run(dataset="embedded", num_steps=6, save_every=3)

    def crash(trainer, record):
        if record["step"] == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        tiny(tmp_path / "cut", callbacks=[crash]).run(dataset="embedded", num_steps=6, save_every=3)
    assert ckpt.load_checkpoint(tmp_path / "cut")["step"] == 3  # step 4 and 5 were lost with the crash
    capsys.readouterr()
    torch.manual_seed(77)  # another global RNG state: the resume must take everything from the checkpoint
    again = tiny(tmp_path / "cut", seed=0)
    summary = again.run(dataset="embedded", num_steps=6, save_every=3)
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    assert "resumed from step 3" in capsys.readouterr().err
    for (name, a), (_, b) in zip(full.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name
    losses = lambda run: {r["step"]: r["loss"] for r in read_log(tmp_path / run / "log.jsonl")  # noqa: E731
                          if r["kind"] == "train"}
    assert losses("cut") == losses("full")  # every step 1..6, exactly


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    tiny(tmp_path / "r").run(dataset="embedded", num_steps=2)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        tiny(tmp_path / "r").run(dataset="embedded", num_steps=4, resume=False)
    summary = tiny(tmp_path / "r").run(dataset="embedded", num_steps=3)
    assert summary["resumed_from"] == 2 and summary["steps"] == 3


def test_a_token_file_trains_with_its_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.bin"
    token_file.write_tokens(path, (rng.integers(0, 300, size=2000) for _ in range(3)), vocab_size=300)
    pre = tiny(tmp_path / "run")
    summary = pre.run(dataset=path, num_steps=2, save_every=1)
    assert pre.model.config.vocab_size == 300 and summary["steps"] == 2
    assert summary["heldout_bits_per_token"] > 0  # not bytes: bits per token
    assert summary["trainer"]["data"]["source"] == "token-file"
    assert summary["trainer"]["data"]["sha256"] == token_file.open_tokens(path).sha256


def test_text_folders_train_and_a_byte_token_file_reports_bits_per_byte(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("a line of text about reversible layers\n" * 40)
    assert tiny(tmp_path / "a").run(dataset=folder, num_steps=1)["trainer"]["data"]["source"] == "files"
    token_file.text_to_token_file([folder], tmp_path / "t.bin")
    assert tiny(tmp_path / "b").run(dataset=str(tmp_path / "t.bin"), num_steps=1)["heldout_bits_per_byte"] > 0


@pytest.mark.parametrize("name", ["openwebtext", "the_pile", "data/missing.bin"])
def test_a_dataset_it_cannot_load_names_the_local_recipe(tmp_path, name):
    with pytest.raises(DatasetUnavailableError, match="python -m revnet_core.token_file") as info:
        tiny(tmp_path / "r").run(dataset=name, num_steps=3)
    assert name in str(info.value) and isinstance(info.value, ConfigError)
    assert not (tmp_path / "r").exists()  # refused before anything was built or written


def test_a_model_that_cannot_fit_is_refused_with_its_predicted_peak(tmp_path):
    budget = 24 * 2**30
    expected = predicted_peak_bytes(preset_config("1B", max_seq_len=262144), 1, 262144, "auto", torch.device("cpu"))
    assert expected > budget  # the cost model's own verdict, not a guess of the test's
    with pytest.raises(TrainingError, match="does not fit") as info:
        LongContextPretraining(model_size='1B', context_length=262144, batch_size=1, gradient_accumulation=64,
                               device="cpu", memory_budget=budget, out_dir=tmp_path)
    message = str(info.value)
    assert f"{expected / 2**30:.2f} GiB" in message and "24.00 GiB" in message
    with pytest.warns(ResourceWarning, match="not expected to fit"):
        pre = LongContextPretraining("1B", context_length=262144, device="cpu", memory_budget=budget,
                                     memory_check="warn", out_dir=tmp_path)
    assert pre.model is None and pre.predicted_peak == expected  # nothing was allocated yet


def test_near_the_budget_warns_and_off_skips_the_check(tmp_path):
    peak = predicted_peak_bytes(preset_config("tiny", max_seq_len=64), 2, 64, "auto", torch.device("cpu"))
    with pytest.warns(ResourceWarning, match="close to the limit"):
        tiny(tmp_path, memory_budget=int(peak / 0.9))
    assert tiny(tmp_path, memory_budget=1, memory_check="off").predicted_peak is None


@pytest.mark.parametrize("kw,message", [
    (dict(model_size="huge"), "model size 'huge'"),
    (dict(context_length=1), "context_length"),
    (dict(batch_size=0), "batch_size"),
    (dict(gradient_accumulation=1.5), "gradient_accumulation"),
    (dict(memory_check="maybe"), "memory_check"),
    (dict(precision="fp8"), "precision"),
])
def test_bad_settings_are_named(kw, message, tmp_path):
    args = dict(model_size="tiny", context_length=64, batch_size=2, out_dir=tmp_path, **QUIET)
    with pytest.raises(ConfigError, match=message):
        LongContextPretraining(**{**args, **kw})


@pytest.mark.parametrize("kw,message", [(dict(num_steps=0), "num_steps"), (dict(save_every=0), "save_every"),
                                        (dict(dataset=[]), "dataset")])
def test_bad_run_arguments_are_named(kw, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path).run(**{"dataset": "embedded", "num_steps": 2, **kw})


def test_a_bin_file_without_its_header_is_named_not_read_as_text(tmp_path):
    (tmp_path / "lost.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="has no header"):
        tiny(tmp_path / "r").run(dataset=tmp_path / "lost.bin", num_steps=1)
