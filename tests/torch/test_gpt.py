"""ReversibleGPT: the causal model under its README name, and one loader for saves and training checkpoints."""

import pytest
import torch

from revnet_core.config import ModelConfig
from revnet_core.data import lm_data, stdlib_corpus
from revnet_core.errors import (CheckpointCorruptError, CheckpointError, CheckpointIncompatibleError,
                                CheckpointTruncatedError, ConfigError)
from revnet_torch import checkpoint as ckpt
from revnet_torch.generate import load_for_inference
from revnet_torch.gpt import CheckpointNotFoundError, ReversibleGPT
from revnet_torch.model import ReversibleTransformer
from revnet_torch.trainer import LongContextTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(num_layers=2, d_model=16, num_heads=2, d_ff=24, max_seq_len=32)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, return_logits=True, compute_loss=False).logits


def perturbed(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as ``revnet train`` leaves it: LongContextTrainer.fit for 2 steps with an out_dir."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ReversibleTransformer(**TINY)
    data = lm_data(stdlib_corpus(), seq_len=16, batch_size=2, eval_windows_max=2)
    trainer = LongContextTrainer(model, max_length=16, out_dir=out, progress=False, plot=False, eval_every=None)
    summary = trainer.fit(data, steps=2)
    assert summary["step"] == 2 and (out / ckpt.FILENAME).is_file()
    return out, model


def test_gpt_is_the_causal_reversible_transformer():
    torch.manual_seed(0)
    gpt = ReversibleGPT(**TINY)
    torch.manual_seed(0)
    plain = ReversibleTransformer(**TINY)
    ids = torch.randint(0, 256, (2, 12))
    assert isinstance(gpt, ReversibleTransformer) and gpt.config.causal
    assert torch.equal(logits(gpt, ids), logits(plain, ids))
    assert ReversibleGPT(ModelConfig(**TINY)).config == ReversibleTransformer(ModelConfig(**TINY)).config


def test_gpt_reversible_gradients_equal_stored_ones_fp64():
    torch.manual_seed(0)
    model = perturbed(ReversibleGPT(**TINY).double())
    ids = torch.randint(0, 256, (2, 12))
    got = {}
    for policy in ("store", "reverse"):
        model.zero_grad(set_to_none=True)
        model.set_policy(policy)
        model(ids).loss.backward()
        got[policy] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in got["store"].items():
        assert torch.allclose(got["reverse"][name], g, atol=1e-10, rtol=0), name


def test_gpt_refuses_bidirectional_configs():
    with pytest.raises(ConfigError, match="ReversibleBERT"):
        ReversibleGPT(causal=False, **TINY)
    with pytest.raises(ConfigError, match="ReversibleBERT"):
        ReversibleGPT(ModelConfig(causal=False, **TINY))


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = perturbed(ReversibleGPT(**TINY, stream_merge="mean", coupling="affine"))
    folder = model.save_pretrained(tmp_path / "gpt")
    loaded = ReversibleGPT.from_pretrained(folder)
    assert type(loaded) is ReversibleGPT and not loaded.training and loaded.config == model.config
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    again = loaded.save_pretrained(folder)  # saving over a save replaces it
    assert torch.equal(logits(ReversibleGPT.from_pretrained(again / "model.safetensors"), ids), logits(model, ids))


def test_from_pretrained_reads_a_training_run_folder_and_its_checkpoint(run_dir):
    out, trained = run_dir
    ids = torch.randint(0, 256, (1, 10))
    want = logits(trained, ids)
    for path in (out, out / ckpt.FILENAME, str(out)):
        model = ReversibleGPT.from_pretrained(path)
        assert type(model) is ReversibleGPT and not model.training
        assert torch.equal(logits(model, ids), want)
    assert model.generate(ids, 3, temperature=0).shape == (1, 13)


def test_a_gpt_trained_as_itself_loads_everywhere(tmp_path):
    torch.manual_seed(1)
    model = ReversibleGPT(**TINY)
    data = lm_data(stdlib_corpus(), seq_len=16, batch_size=2, eval_windows_max=2)
    LongContextTrainer(model, max_length=16, out_dir=tmp_path, progress=False, plot=False).fit(data, steps=1)
    state = ckpt.load_checkpoint(tmp_path)
    assert state["model_class"] == "ReversibleGPT"
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(logits(ReversibleGPT.from_pretrained(tmp_path), ids), logits(model, ids))
    assert torch.equal(logits(load_for_inference(tmp_path), ids), logits(model, ids))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no saved model"):
        ReversibleGPT.from_pretrained(tmp_path / "absent")
    with pytest.raises(CheckpointNotFoundError, match="no saved model"):
        ReversibleGPT.from_pretrained(tmp_path)  # an empty folder
    assert issubclass(CheckpointNotFoundError, CheckpointError) and issubclass(CheckpointNotFoundError,
                                                                                 FileNotFoundError)


def test_a_bert_checkpoint_is_refused_by_name(run_dir, tmp_path):
    out, _ = run_dir
    state = ckpt.load_checkpoint(out)
    state = {k: v for k, v in state.items() if k not in ("format", "backend")}
    state["model_class"] = "ReversibleBERT"
    path = ckpt.save_checkpoint(tmp_path / "bert" / ckpt.FILENAME, state)
    with pytest.raises(CheckpointIncompatibleError, match="ReversibleBERT.from_pretrained"):
        ReversibleGPT.from_pretrained(path)
    with pytest.raises(CheckpointIncompatibleError, match="ReversibleBERT"):
        load_for_inference(path)
    state["model_class"] = "ReversibleTransformer"
    state["model_config"] = {**state["model_config"], "causal": False}
    path = ckpt.save_checkpoint(tmp_path / "both" / ckpt.FILENAME, state)
    with pytest.raises(CheckpointIncompatibleError, match="bidirectional"):
        ReversibleGPT.from_pretrained(path)


def test_damaged_checkpoints_are_named(run_dir, tmp_path):
    out, _ = run_dir
    data = (out / ckpt.FILENAME).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointTruncatedError):
        ReversibleGPT.from_pretrained(cut)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointCorruptError):
        ReversibleGPT.from_pretrained(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointCorruptError, match="corrupt"):
        ReversibleGPT.from_pretrained(junk)


def test_a_shape_mismatch_between_config_and_weights_is_named(tmp_path):
    folder = ReversibleGPT(**TINY).save_pretrained(tmp_path / "gpt")
    ReversibleGPT(**{**TINY, "d_ff": 32}).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(folder / "model.safetensors")
    with pytest.raises(CheckpointIncompatibleError, match="does not fit"):
        ReversibleGPT.from_pretrained(folder)
    with pytest.raises(ConfigError, match="needs a folder"):
        ReversibleGPT(**TINY).save_pretrained(folder / "config.json")
