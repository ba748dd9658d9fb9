"""Generation with a cache: every cached step's logits equal the full forward's last-token logits."""

import dataclasses

import pytest
import torch

import revnet_core
from revnet_core.config import ModelConfig
from revnet_core.errors import InputError
from revnet_torch.generate import Decoder, generate

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def trained_like(model):
    """Weights ~ N(0, 1/fan_in) (norm gains/biases perturbed too): far from init, like a trained model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make(dtype, seed=0, **fields):
    torch.manual_seed(seed)
    cfg = dict(num_layers=3, d_model=32, num_heads=4, d_ff=48, vocab_size=41, max_seq_len=64)
    cfg.update(fields)
    return trained_like(revnet_core.build("torch", **cfg).to(dtype)).eval()


def full_last_logits(model, ids):
    with torch.no_grad():
        return model(ids, return_logits=True, compute_loss=False).logits[:, -1]


CASES = {"additive": {}, "affine": {"coupling": "affine"}, "window": {"attention_window": 5},
         "affine-window-rms": {"coupling": "affine", "attention_window": 3, "norm": "rmsnorm"}}
if "stream_merge" in {f.name for f in dataclasses.fields(ModelConfig)}:  # every merge the config offers
    CASES["merge-sum"] = {"stream_merge": "sum"}
    CASES["merge-mean"] = {"stream_merge": "mean"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fields", list(CASES.values()), ids=list(CASES))
def test_cached_logits_equal_the_full_forward_at_every_step(dtype, fields):
    model = make(dtype, **fields)
    torch.manual_seed(1)
    B, prompt, total = 2, 7, 19
    ids = torch.randint(0, model.config.vocab_size, (B, total))
    dec = Decoder(model, B, total)
    got = dec.feed(ids[:, :prompt])
    worst = 0.0
    for t in range(prompt, total + 1):
        want = full_last_logits(model, ids[:, :t])
        worst = max(worst, (got - want).abs().max().item())
        if t < total:
            got = dec.feed(ids[:, t:t + 1])
    assert worst <= TOL[dtype], worst
    assert dec.length == total


def test_feeding_in_pieces_crosses_the_window_correctly():
    """A multi-token feed after the ring buffer has wrapped sees exactly the window (mask from positions)."""
    model = make(torch.float64, attention_window=4)
    torch.manual_seed(2)
    ids = torch.randint(0, 41, (1, 20))
    dec = Decoder(model, 1, 20)
    for a, b in [(0, 6), (6, 7), (7, 12), (12, 13), (13, 20)]:
        got = dec.feed(ids[:, a:b])
        torch.testing.assert_close(got, full_last_logits(model, ids[:, :b]), rtol=0, atol=1e-10)
    assert dec.caches[0].k.shape[2] == 4  # the window, not the sequence


def test_greedy_is_deterministic_and_matches_argmax_of_the_full_forward():
    model = make(torch.float64)
    prompt = torch.randint(0, 41, (3, 5))
    a = model.generate(prompt, 8, temperature=0)
    b = generate(model, prompt, 8, temperature=0)
    assert a.shape == (3, 13) and a.dtype == torch.int64 and a.equal(b) and a[:, :5].equal(prompt)
    for t in range(5, 13):  # each greedy token is the full forward's argmax over what came before
        assert a[:, t].equal(full_last_logits(model, a[:, :t]).argmax(-1))


def test_sampling_is_seeded_and_top_k_restricts_the_draw():
    model = make(torch.float32)
    prompt = torch.randint(0, 41, (4, 3))
    draw = lambda seed, **kw: model.generate(prompt, 6, generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(5, temperature=0.8).equal(draw(5, temperature=0.8))
    assert not draw(5, temperature=5.0).equal(draw(6, temperature=5.0))
    out = draw(3, temperature=1.0, top_k=1)  # top_k=1 is greedy at any temperature
    assert out.equal(model.generate(prompt, 6, temperature=0))
    # top_k=2: every drawn token is one of the two most likely given its prefix
    out = draw(4, temperature=10.0, top_k=2)
    for t in range(3, 9):
        top2 = torch.topk(full_last_logits(model, out[:, :t]), 2, dim=-1).indices
        assert (out[:, t:t + 1] == top2).any(-1).all()


def test_one_dimensional_prompt_and_training_mode_restored():
    model = make(torch.float32, dropout=0.1)
    model.train()
    out = model.generate(torch.tensor([1, 2, 3]), 4, temperature=0)
    assert out.shape == (7,) and model.training
    assert model.generate(torch.tensor([1, 2, 3]), 0).equal(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature=-1.0 must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_k": 0}, "top_k=0 must be None or an integer >= 1"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1 must be an integer >= 0"),
    ({"max_new_tokens": 62}, "generation needs 65 positions but the model has max_seq_len=64"),
])
def test_bad_arguments_raise_named_errors(kwargs, message):
    model = make(torch.float32)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        model.generate(torch.tensor([[1, 2, 3]]), **args)


def test_bad_ids_raise_named_errors():
    model = make(torch.float32)
    with pytest.raises(InputError, match="out of range"):
        model.generate(torch.tensor([[1, 99]]), 2)
    with pytest.raises(InputError, match="integer token ids"):
        model.generate(torch.tensor([[1.0, 2.0]]), 2)
    dec = Decoder(model, 2, 8)
    with pytest.raises(InputError, match=r"feed takes ids of shape \(2, t >= 1\)"):
        dec.feed(torch.tensor([[1, 2]]))
