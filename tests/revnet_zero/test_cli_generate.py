"""`revnet generate`: a trained checkpoint continues a prompt, end to end through the console entry point."""

import subprocess
import sys

import pytest

from revnet_zero.cli import main


def revnet(*argv, check=True):
    proc = subprocess.run([sys.executable, "-m", "revnet_zero", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    revnet("train", "--size", "tiny", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32",
           "--steps", "3", "--batch-size", "2", "--eval-windows", "1", "--out", str(out), "--no-progress",
           "--no-plot")
    assert (out / "checkpoint.pt").is_file()
    return out


def test_generate_from_a_trained_checkpoint_in_a_subprocess(run_dir, capsys):
    proc = revnet("generate", "--checkpoint", str(run_dir / "checkpoint.pt"), "--prompt", "def main(",
                  "--max-new-tokens", "12", "--temperature", "0")
    text = proc.stdout[:-1]  # print's newline
    assert text.startswith("def main(") and len(text) > len("def main(")
    # the same continuation in process, from the run folder (not the file): greedy is deterministic
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def main(", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out[:-1] == text


def test_seeded_sampling_repeats_and_seeds_differ(run_dir, capsys):
    def sample(seed):
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--max-new-tokens", "24",
                     "--temperature", "1.5", "--top-k", "50", "--seed", str(seed)]) == 0
        return capsys.readouterr().out

    a = sample(1)
    assert a == sample(1) and a != sample(2)


def test_generated_bytes_are_the_models_greedy_tokens(run_dir):
    import torch

    from revnet_torch.generate import load_for_inference

    model = load_for_inference(run_dir, "cpu")
    out = model.generate(torch.tensor(list(b"import ")), 6, temperature=0)
    ids = out.clone()
    with torch.no_grad():  # token by token from the full forward, no cache
        for t in range(7, 13):
            ids[t] = model(ids[None, :t], return_logits=True, compute_loss=False).logits[0, -1].argmax()
    assert out.equal(ids)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens=-1 must be >= 0"),
    (["--temperature", "-0.5"], "--temperature=-0.5 must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature=nan must be"),
    (["--top-k", "0"], "--top-k=0 must be >= 1"),
])
def test_bad_flags_are_one_line_errors_before_torch(argv, message, tmp_path):
    code = ("import sys; from revnet_zero.cli import main; "
            f"rc = main(['generate', '--checkpoint', {str(tmp_path)!r}, '--prompt', 'a', *{argv!r}]); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[0] == "2 False"
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_and_damaged_checkpoints_are_named(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pt"), "--prompt", "a"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("revnet: error: ") and len(err.strip().splitlines()) == 1


def test_prompt_must_not_be_empty(run_dir, capsys):
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
