"""The `revnet` command: flags, config files, listings, and one-line errors with exit code 2 (no traceback).

Everything here fails before a framework is needed; training itself is tested in tests/torch.
"""

import subprocess
import sys
from importlib import metadata

import pytest

from revnet_core import hookimpl
from revnet_core.settings import PRESETS
from revnet_zero.cli_settings import build_settings
from revnet_zero.cli import build_parser, main
from revnet_core import registry as registry_module
from revnet_core.registry import register_plugin, unregister_plugin


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


def test_cli_imports_no_framework_even_when_it_rejects_bad_input():
    code = ("import sys; from revnet_zero.cli import main; rc = main(['train', '--data', '/no/such/path']); "
            "print(rc, sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[0] == "2 []"
    assert "data path '/no/such/path' does not exist" in proc.stderr


def test_console_script_and_module_entry_points():
    (ep,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "revnet"]
    assert ep.value == "revnet_zero.cli:main"
    proc = subprocess.run([sys.executable, "-m", "revnet_zero", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("revnet-zero ")


def test_no_subcommand_prints_help_and_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "train" in err and "bench" in err and "info" in err and "plugins" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--steps", "many"], "invalid int value: 'many'"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--backend", "nope"], "unknown backend 'nope'; installed backends: "),
    (["train", "--data", "/no/such/path"], "data path '/no/such/path' does not exist"),
    (["train", "--seq-len", "512", "--max-seq-len", "256"], "seq_len=512 is larger than max_seq_len=256"),
    (["train", "--task", "passkey", "--seq-len", "64"], "the passkey task needs seq_len >="),
    (["train", "--task", "passkey", "--data", "x.txt"], "--data is for --task lm"),
    (["train", "--policy", "reverse,store"], "got 2 policies for 4 layers"),
    (["train", "--policy", "sometimes"], "policy='sometimes' is not one of"),
    (["train", "--d-model", "100", "--heads", "3"], "d_model=100 must be divisible by num_heads=3"),
    (["train", "--steps", "0"], "steps=0 must be a positive integer"),
    (["train", "--resume"], "--resume without a path needs --out DIR"),
    (["train", "--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
])
def test_bad_flags_give_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


# --- bench (its end-to-end run is in tests/torch/test_bench.py) ---------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["bench", "--models", "plain,transformer"], "--models: unknown name 'transformer'; choose from plain, checkpoint"),
    (["bench", "--models", "plain,plain"], "names a model twice"),
    (["bench", "--seq", "1024,abc"], "--seq '1024,abc': 'abc' is not an integer >= 2"),
    (["bench", "--seq", "1"], "'1' is not an integer >= 2"),
    (["bench", "--seq", "-5"], "'-5' is not an integer >= 2"),
    (["bench", "--seq", "64,128", "--batch", "1,2,3"], "--batch gives 3 sizes for 2 lengths"),
    (["bench", "--batch", "0"], "--batch '0': '0' is not an integer >= 1"),
    (["bench", "--metrics", "memory,joules"], "--metrics: unknown name 'joules'"),
    (["bench", "--steps", "0"], "--steps=0 must be >= 1"),
    (["bench", "--d-model", "30", "--heads", "4"], "d_model=30 must be divisible by num_heads=4"),
    (["bench", "--device", "tpu"], "--device 'tpu' is not auto, cpu, cuda or cuda:N"),
    (["bench", "--backend", "nope"], "unknown backend 'nope'"),
    (["bench", "--optimizer", "lion"], "invalid choice: 'lion'"),
])
def test_bench_bad_flags_give_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and out == ""


def test_bench_rejects_bad_input_without_importing_a_framework():
    code = ("import sys; from revnet_zero.cli import main; rc = main(['bench', '--models', 'gpt']); "
            "print(rc, sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[0] == "2 []"
    assert proc.stderr.startswith("revnet: error: --models: unknown name 'gpt'")


def test_bench_is_listed_with_its_flags():
    proc = subprocess.run([sys.executable, "-m", "revnet_zero", "bench", "--help"], capture_output=True, text=True,
                          check=True)
    for flag in ("--models", "--seq", "--layers", "--d-model", "--heads", "--vocab", "--steps", "--out"):
        assert flag in proc.stdout


def data_file(tmp_path, text="some plain text for training. " * 30):
    path = tmp_path / "data.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("binary", b"\x89PNG\r\n\x1a\n\0\0\0", "is not a text file (it contains NUL bytes)"),
    ("latin1", "na\xefve caf\xe9 ".encode("latin-1") * 50, "is not UTF-8 text"),
    ("empty", b"", "the data is empty"),
])
def test_bad_data_files_through_the_cli(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run(capsys, "train", "--data", str(path))
    assert code == 2 and message in err and name in err


def test_empty_folder_through_the_cli(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "nothing"))
    assert code == 2 and "contains no files" in err


def test_sequence_longer_than_the_data_through_the_cli(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(data_file(tmp_path)), "--seq-len", "4096")
    assert code == 2 and "seq_len=4096 is larger than the training data" in err


# --- config files ------------------------------------------------------------------------------------------
def settings(*argv):
    return build_settings(build_parser().parse_args(["train", *argv]))


def test_config_file_values_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('size = "base"\nseq-len = 128\nlr = 1\ndata = "corpus.txt"\nprogress = false\n')
    s = settings("--config", str(cfg), "--seq-len", "64")
    assert s.seq_len == 64  # the flag wins
    assert s.size == "base" and s.lr == 1.0 and isinstance(s.lr, float) and s.data == ["corpus.txt"]
    assert s.progress is False
    config = s.model_config()
    assert (config.num_layers, config.d_model, config.num_heads) == tuple(PRESETS["base"].values())
    assert config.max_seq_len == 64 and config.vocab_size == 256


def test_defaults_are_the_small_embedded_run():
    s = settings()
    assert (s.size, s.seq_len, s.steps, s.task, s.data, s.backend) == ("small", 256, 200, "lm", None, "torch")
    assert s.max_grad_norm == 1.0 and s.clip_norm == 1.0  # clipping is on by default
    assert settings("--max-grad-norm", "0").clip_norm is None


@pytest.mark.parametrize("content, message", [
    ("stepz = 3\n", "unknown key 'stepz'"),
    ("steps = 'three'\n", "steps='three' must be of type int"),
    ("steps = = 3\n", "is not valid TOML"),
    ("[train]\nsteps = 3\n[other]\nx = 1\n", "lie outside the [train] table"),
    ("task = 'translate'\n", "task='translate' is not one of"),
])
def test_bad_config_files_exit_2(tmp_path, capsys, content, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    code, _, err = run(capsys, "train", "--config", str(cfg))
    assert code == 2 and message in err


# --- info and plugins -------------------------------------------------------------------------------------
def test_info_lists_backends_couplings_kernels_plugins_versions_and_device(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    for text in ("versions: revnet-zero", "python", "torch", "devices:", "  torch: ", "backends: ", "torch (revnet-zero",
                 "couplings: ", "additive", "affine", "kernels by device:", "plugins:"):
        assert text in out, text


def test_plugins_lists_distribution_and_failures(capsys):
    class Broken:
        @hookimpl
        def register_couplings(self, register):
            raise RuntimeError("boom")

    name = register_plugin(Broken(), name="test-cli-broken")
    try:
        with pytest.warns(UserWarning, match="boom"):
            code, out, _ = run(capsys, "plugins")
    finally:
        unregister_plugin(name)
    assert code == 0
    assert "backend" in out and "torch" in out and "revnet-zero" in out
    assert "test-cli-broken" in out and "boom" in out
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0 and '"kind": "coupling"' in out


# --- backend records --------------------------------------------------------------------------------------
def test_a_backend_without_a_trainer_is_named_before_any_data_is_read(capsys):
    from revnet_core.hookspecs import hookimpl
    from revnet_core.registry import BackendRecord, backends_with, register_plugin, unregister_plugin

    class Bare:  # a backend record with no parts: every command that needs one says which
        @hookimpl
        def register_backends(self, register):
            register(BackendRecord("bare", lambda config, *, weights=None: None))

    name = register_plugin(Bare(), name="test-cli-bare-backend")
    try:
        code, _, err = run(capsys, "train", "--backend", "bare", "--data", "/no/such/path")
        assert code == 2
        assert f"the bare backend has no trainer yet; backends with one: {', '.join(backends_with('trainer'))}" in err
        assert {"torch", "jax", "numba"} <= set(backends_with("trainer"))
        code, _, err = run(capsys, "bench", "--backend", "jax")
        assert code == 2 and "the jax backend has no bench yet" in err
    finally:
        unregister_plugin(name)


def test_train_reaches_the_trainer_through_the_record(tmp_path, capsys, monkeypatch):
    """A backend registered in-process with a trainer loader: `revnet train --backend` finds it by the record,
    whatever module registered it."""
    import types

    calls = []
    fake = types.ModuleType("fake_revnet_trainer")

    def fake_run(settings, data):
        calls.append((settings.backend, settings.seq_len, len(data.eval_batches)))
        return {"step": 1, "steps": 1, "loss": 1.0, "device": "cpu", "precision": "fp32", "paths": {}}

    fake.run = fake_run
    monkeypatch.setitem(sys.modules, "fake_revnet_trainer", fake)
    from revnet_core.registry import BackendRecord

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(BackendRecord("fake", lambda config, weights=None: None, trainer="fake_revnet_trainer"))

    name = register_plugin(Plugin(), name="test-cli-fake-backend")
    try:
        code, out, err = run(capsys, "train", "--backend", "fake", "--seq-len", "32", "--steps", "1",
                             "--out", str(tmp_path / "run"))
    finally:
        unregister_plugin(name)
    assert code == 0, err
    assert calls and calls[0][:2] == ("fake", 32)
    assert "step 1/1" in out


def test_plugins_lists_a_refused_backend_and_the_opt_in(capsys, monkeypatch):
    from revnet_core.registry import BackendRecord

    class Hijack:
        @hookimpl
        def register_backends(self, register):
            register(BackendRecord("torch", lambda config, weights=None: "hijacked"))

    name = register_plugin(Hijack(), name="test-cli-hijack")
    try:
        with pytest.warns(UserWarning, match="backend 'torch' refused"):
            code, out, _ = run(capsys, "plugins")
        assert code == 0
        row = next(line for line in out.splitlines() if "test-cli-hijack" in line)
        assert row.split()[:2] == ["failed", "test-cli-hijack"] and "in-process" in row
        assert "backend 'torch' refused" in row and "REVNET_ALLOW_OVERRIDE=torch" in row
        torch_row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["backend", "torch"])
        assert torch_row[2:4] == ["torch", "revnet-zero"]  # the built-in, with its distribution and version
        monkeypatch.setenv("REVNET_ALLOW_OVERRIDE", "torch")
        registry_module.reset()
        with pytest.warns(UserWarning, match="replaces backend 'torch'"):
            code, out, _ = run(capsys, "plugins")
        torch_row = next(line for line in out.splitlines() if line.split()[:2] == ["backend", "torch"])
        assert "test-cli-hijack" in torch_row and "replaces 'torch' (REVNET_ALLOW_OVERRIDE)" in torch_row
    finally:
        unregister_plugin(name)


# --- --tokens: a token file instead of the embedded corpus (issue #21) -------------------------------------
def token_file(tmp_path, vocab=1000, n=6000):
    import numpy as np

    from revnet_core.token_file import write_tokens

    path = tmp_path / f"ids{vocab}.bin"
    write_tokens(path, np.random.default_rng(0).integers(0, vocab, n), vocab_size=vocab)
    return str(path)


def test_tokens_flag_takes_the_vocabulary_from_the_header(tmp_path):
    from revnet_core.settings import make_data

    s = settings("--tokens", token_file(tmp_path, vocab=1000), "--seq-len", "32")
    assert s.model_config().vocab_size == 1000
    data = make_data(s)
    assert data.units == "tokens" and data.identity["source"] == "token-file" and data.identity["vocab_size"] == 1000
    assert settings().model_config().vocab_size == 256  # without it: bytes, as before


@pytest.mark.parametrize("extra, message", [
    (["--data", "x.txt"], "--tokens is a corpus for --task lm, instead of --data"),
    (["--task", "passkey"], "--tokens is for --task lm"),
])
def test_tokens_flag_refusals(tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "train", "--tokens", token_file(tmp_path), *extra, "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_missing_token_file_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--tokens", str(tmp_path / "none.bin"), "--out", str(tmp_path / "r"))
    assert code == 2 and "none.bin" in err and len(err.strip().splitlines()) == 1


TINY_RUN = ("--size", "tiny", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2",
            "--no-progress", "--no-plot")


def test_train_on_a_token_file_reports_loss_per_token(tmp_path, capsys):
    import json

    code, out, err = run(capsys, "train", "--tokens", token_file(tmp_path, vocab=1000), *TINY_RUN,
                         "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "held-out loss per token" in out and "bits per token" in out and "bits per byte" not in out
    assert "token file" in err and "vocab 1000" in err
    result = json.loads((tmp_path / "run" / "run.json").read_text())
    assert result["config"]["vocab_size"] == 1000 and result["data"]["source"] == "token-file"
    assert "eval_bits_per_token" in result["eval"] and "eval_bits_per_byte" not in result["eval"]


def test_train_on_a_byte_token_file_reports_bits_per_byte(tmp_path, capsys):
    from revnet_core.token_file import text_to_token_file

    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 300)
    path = tmp_path / "bytes.bin"
    text_to_token_file([text], path)
    code, out, err = run(capsys, "train", "--tokens", str(path), *TINY_RUN, "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "bits per byte" in out and "per token" not in out


def test_the_trainer_refuses_data_with_a_larger_vocabulary(tmp_path):
    import revnet_core
    from revnet_core import InputError
    from revnet_core.token_file import token_data
    from revnet_torch.trainer import LongContextTrainer

    model = revnet_core.build("torch", num_layers=1, d_model=16, num_heads=2, vocab_size=256, max_seq_len=32)
    trainer = LongContextTrainer(model, progress=False, plot=False, drift_every=None)
    with pytest.raises(InputError, match=r"vocabulary \(1000.*exceeds the model's vocab_size=256"):
        trainer.fit(token_data(token_file(tmp_path), 16, 2), steps=1)
