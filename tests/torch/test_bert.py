"""ReversibleBERT: bidirectional attention, padding, the masked-LM objective, reversible gradients, saving."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from revnet_core import policies as policy_table
from revnet_core.config import ModelConfig
from revnet_core.errors import (BackendFeatureError, CheckpointCorruptError, CheckpointIncompatibleError,
                                CheckpointTruncatedError, ConfigError, InputError)
from revnet_torch.bert import MASK_ID, PAD_ID, VOCAB_SIZE, ReversibleBERT, mask_tokens
from revnet_torch.gpt import CheckpointNotFoundError, ReversibleGPT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and CPU is shared
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24, max_seq_len=64)


def bert(seed=0, **fields):
    torch.manual_seed(seed)
    return ReversibleBERT(**{**TINY, **fields}).double()


def perturb(model, seed=7, scale=0.5):
    """Trained-like weights: every parameter scaled by (1 + scale * noise), norms included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def padded_batch(seed=3, B=3, T=14):
    """ids (B, T) with right padding in rows 1 and 2, masked-LM inputs and labels, and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    lengths = [T, T - 5, 4][:B]
    attention = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
        ids[i, n:] = PAD_ID
    inputs, labels = mask_tokens(ids, mlm_probability=0.4, generator=g)
    return inputs, labels, attention


def grads(model, policy, *args, **kw):
    model.zero_grad(set_to_none=True)
    model.set_policy(policy)
    torch.manual_seed(1234)  # dropout draws start alike under every policy
    loss = model(*args, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# --- reversible gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [p for p in policy_table.NAMES if p != "store"])
@pytest.mark.parametrize("fields", [{}, {"attn_head_chunk": 1}, {"coupling": "affine"}, {"dropout": 0.1}],
                         ids=["plain", "head_chunks", "affine", "dropout"])
def test_every_policy_gives_the_stored_gradients_with_padding_and_trained_weights(policy, fields):
    model = perturb(bert(**fields))
    inputs, labels, attention = padded_batch()
    if policy in policy_table.KEEPING_ATTENTION:  # refused by name with a padding mask (its kernels take none)
        with pytest.raises(ConfigError, match="padding mask|not additive|random numbers"):
            grads(model, policy, inputs, labels=labels, attention_mask=attention)
        return
    loss_s, g_s = grads(model, "store", inputs, labels=labels, attention_mask=attention)
    loss_p, g_p = grads(model, policy, inputs, labels=labels, attention_mask=attention)
    assert torch.isfinite(loss_s) and abs(float(loss_p - loss_s)) < 1e-12
    assert set(g_s) == set(g_p)
    for name in g_s:
        assert torch.allclose(g_p[name], g_s[name], atol=1e-10, rtol=0), name
    assert any(float(g.abs().max()) > 1e-3 for g in g_s.values())


def test_reverse_gradients_equal_stored_ones_without_padding():
    model = bert()
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(torch.randint(0, 256, (2, 12), generator=g), generator=g)
    assert bool((inputs != PAD_ID).all())
    _, g_s = grads(model, "store", inputs, labels=labels)
    _, g_r = grads(model, "reverse", inputs, labels=labels)
    for name in g_s:
        assert torch.allclose(g_r[name], g_s[name], atol=1e-10, rtol=0), name


@pytest.mark.parametrize("policy", ["reverse", "checkpoint", "recompute_attention"])
def test_two_forwards_then_two_backwards_keep_each_forwards_padding(policy):
    """The mask is bound per forward: a second forward with other padding does not change the first's backward."""
    model = bert()
    model.set_policy(policy)
    inputs, labels, attention = padded_batch()
    other = attention.clone()
    other[0, 8:] = 0
    expected = []
    for mask in (attention, other):
        model.zero_grad(set_to_none=True)
        model(inputs, labels=labels, attention_mask=mask).loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert any(not torch.allclose(expected[0][n], expected[1][n]) for n in expected[0])
    model.zero_grad(set_to_none=True)
    first = model(inputs, labels=labels, attention_mask=attention).loss
    second = model(inputs, labels=labels, attention_mask=other).loss
    first.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    second.backward()
    for name in expected[0]:
        assert torch.allclose(got[name], expected[0][name], atol=1e-10, rtol=0), name
        assert torch.allclose(model.get_parameter(name).grad, expected[1][name], atol=1e-10, rtol=0), name


# --- attention ------------------------------------------------------------------------------------------
def test_a_later_token_changes_earlier_logits_in_bert_not_in_gpt():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 256
    b = bert().eval()
    with torch.no_grad():
        before, after = b(ids).logits, b(changed).logits
    assert float((before[0, :12] - after[0, :12]).abs().max()) > 1e-6
    torch.manual_seed(0)
    g = ReversibleGPT(**TINY).double().eval()
    with torch.no_grad():
        before = g(ids, return_logits=True, compute_loss=False).logits
        after = g(changed, return_logits=True, compute_loss=False).logits
    assert float((before[0, :12] - after[0, :12]).abs().max()) == 0.0
    assert float((before[0, 12:] - after[0, 12:]).abs().max()) > 1e-6


@pytest.mark.parametrize("fields", [{}, {"attn_head_chunk": 1}, {"attention": "reference"},
                                    {"use_flash_attention": False}], ids=["sdpa", "chunks", "reference", "math"])
def test_bidirectional_block_is_full_softmax_attention(fields):
    """Each kernel path against attention written out: softmax(q k^T / sqrt(hd)) v over every key."""
    model = bert(**fields).eval()
    block = model.layers[0].attn.block
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        q, k, v = block._heads(block.qkv(block.norm(x)), block.num_heads)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        want = block.proj((w @ v).transpose(1, 2).reshape(2, 9, 16))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_padding_gives_the_unpadded_sequences_outputs():
    model = perturb(bert()).eval()
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, 256, (1, 9), generator=g)
    padded = torch.cat([real, torch.full((1, 5), PAD_ID)], dim=1)
    attention = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model(real).logits
        explicit = model(padded, attention_mask=attention).logits
        derived = model(padded).logits  # default mask: the positions that are not [PAD]
        as_bool = model(padded, attention_mask=attention.bool()).logits
        unmasked = model(padded, attention_mask=torch.ones_like(attention)).logits
    for out in (explicit, derived, as_bool):
        assert torch.allclose(out[:, :9], alone, atol=1e-10, rtol=0)
    assert float((unmasked[:, :9] - alone).abs().max()) > 1e-6  # attending to the pads does change them


@pytest.mark.parametrize("mask, message", [
    (torch.ones(1, 5), "0/1 integers or bools"),
    (torch.ones(1, 4, dtype=torch.long), "must match input_ids"),
    (torch.full((1, 5), 2), "only 0"),
    (torch.zeros(1, 5, dtype=torch.long), "all padding"),
    ([1, 1, 1, 1, 1], "torch.Tensor"),
])
def test_bad_attention_masks_get_named_errors(mask, message):
    with pytest.raises(InputError, match=message):
        bert()(torch.randint(0, 256, (1, 5)), attention_mask=mask)


def test_reference_attention_and_causal_blocks_refuse_a_padding_mask_by_name():
    model = bert(attention="reference")
    inputs, labels, attention = padded_batch()
    with pytest.raises(ConfigError, match="attention='sdpa'"):
        model(inputs, labels=labels, attention_mask=attention)
    block = ReversibleGPT(**TINY).layers[0].attn.block
    with pytest.raises(InputError, match="causal=False"):
        block(torch.randn(3, 14, 16), key_mask=attention.bool())


# --- config ---------------------------------------------------------------------------------------------
def test_config_causal_field_is_validated():
    assert ModelConfig().causal is True
    assert ModelConfig(causal=False).causal is False
    with pytest.raises(ConfigError, match="causal=1"):
        ModelConfig(causal=1)
    with pytest.raises(ConfigError, match="attention_window=8 with causal=False"):
        ModelConfig(causal=False, attention_window=8)
    with pytest.raises(ConfigError, match="looks back only"):
        bert().set_attention_window(4)
    assert ModelConfig.from_saved({k: v for k, v in ModelConfig().to_dict().items() if k != "causal"}).causal


def test_bert_refuses_causal_and_small_vocabularies():
    with pytest.raises(ConfigError, match="ReversibleGPT"):
        ReversibleBERT(causal=True, **TINY)
    with pytest.raises(ConfigError, match="at least 258"):
        ReversibleBERT(vocab_size=256, **TINY)
    model = ReversibleBERT(ModelConfig(vocab_size=300, **TINY))
    assert model.config.causal is False and model.config.vocab_size == 300
    assert ReversibleBERT(**TINY).config.vocab_size == VOCAB_SIZE


def test_cost_model_prices_the_full_score_matrix():
    from revnet_torch.cost import CostModel

    causal = ModelConfig(**TINY)
    both = causal.replace(causal=False)
    fc, fb = CostModel(causal, seq_len=64).block_flops(), CostModel(both, seq_len=64).block_flops()
    assert fb["attention_core"] == 2 * fc["attention_core"] == 4.0 * 64 * 64 * 16
    assert fb["attention_matmuls"] == fc["attention_matmuls"] and fb["ffn"] == fc["ffn"]
    # fused kernels keep the same tensors either way; the math and reference kernels build no causal mask
    assert CostModel(both, seq_len=64).simulate("store").peak == CostModel(causal, seq_len=64).simulate("store").peak
    for attention, mask in (("math", ".att.bias"), ("reference", ".att.causal")):
        tapes = [{name for _, name, *_ in CostModel(cfg, seq_len=64, attention=attention).simulate(
            "store", record=True).log} for cfg in (causal, both)]
        assert any(name.endswith(mask) for name in tapes[0])
        assert not any(name.endswith(mask) for name in tapes[1])
        assert tapes[1] == {name for name in tapes[0] if not name.endswith(mask)}


def bidirectional_lm(**fields):
    """The next-token step the cost model replays, with blocks that attend both ways (what it prices for
    causal=False: ReversibleBERT's step is this one with its labels)."""
    import revnet_core

    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=3, vocab_size=64, loss_chunk_size=16, max_seq_len=256, **fields)
    model.config = model.config.replace(causal=False)  # the constructor refuses this pairing; the test wants it
    for layer in model.layers:
        layer.attn.block.causal = False
    return model


KERNELS = [dict(d_model=32, num_heads=2, d_ff=48), dict(d_model=32, num_heads=2, d_ff=48, attention="reference"),
           dict(d_model=32, num_heads=2, d_ff=48, use_flash_attention=False),
           dict(d_model=48, num_heads=3, d_ff=48, attn_head_chunk=1, use_flash_attention=False)]


@pytest.mark.parametrize("fields", KERNELS, ids=["sdpa", "reference", "math", "math_chunks"])
@pytest.mark.parametrize("autocast", [False, True])
def test_cost_model_saved_bytes_match_measured_for_bidirectional_blocks(fields, autocast):
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel

    from .conftest import PLANS, plan_saved_bytes

    model = bidirectional_lm(**fields)
    ids = torch.randint(0, 64, (2, 40))
    cm = CostModel(model.config, Workload(batch=2, seq_len=40, autocast_dtype="bfloat16" if autocast else None,
                                          device="cpu"))
    for plan in PLANS:
        assert cm.saved_bytes(plan) == plan_saved_bytes(model, ids, plan, autocast), plan


@pytest.mark.parametrize("fields", KERNELS[1:3], ids=["reference", "math"])
def test_cost_model_step_peak_matches_the_allocator_for_bidirectional_blocks(fields):
    from .conftest import step_peak

    model = bidirectional_lm(**fields)
    model.set_policy(["store", "reverse", "checkpoint"])
    predicted, measured, _ = step_peak(model, torch.randint(0, 64, (1, 256)), autocast=False)
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)  # measured: within 24 bytes


@pytest.mark.parametrize("backend, module, cls", [("jax", "revnet_jax.model", "ReversibleTransformerJAX"),
                                                   ("numba", "revnet_numba.model", "ReversibleTransformerNumba")])
def test_jax_and_numba_refuse_bidirectional_models_naming_torch(backend, module, cls):
    import importlib

    pytest.importorskip(backend)
    model_class = getattr(importlib.import_module(module), cls)
    with pytest.raises(BackendFeatureError, match="torch backend"):
        model_class(ModelConfig(causal=False, **TINY))
    model_class(ModelConfig(**TINY))  # the causal model still builds


def test_generation_refuses_bidirectional_models():
    from revnet_torch.generate import Decoder, generate

    model = bert()
    ids = torch.randint(0, 256, (1, 4))
    for call in (lambda: generate(model, ids, 3), lambda: model.generate(ids, 3), lambda: Decoder(model, 1, 8)):
        with pytest.raises(ConfigError, match="bidirectional"):
            call()


# --- masking --------------------------------------------------------------------------------------------
def test_mask_tokens_follows_the_80_10_10_rule_and_never_touches_padding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (64, 512), generator=g)
    ids[:, 400:] = PAD_ID
    inputs, labels = mask_tokens(ids, mlm_probability=0.15, generator=g)
    real = ids != PAD_ID
    chosen = labels != -100
    n_real, n = int(real.sum()), int(chosen.sum())
    assert abs(n / n_real - 0.15) < 0.01  # 25,600 tokens: the rate's s.d. is 0.0022
    assert not bool((chosen & ~real).any()) and bool((inputs[~real] == PAD_ID).all())
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = chosen & (inputs == MASK_ID)
    changed = chosen & (inputs != MASK_ID) & (inputs != ids)
    kept = chosen & (inputs == ids)
    # a random draw equals the original 1 time in 256: those count as kept, 0.1/256 of the chosen
    for part, share in ((masked, 0.8), (changed, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)):
        assert abs(int(part.sum()) / n - share) < 0.015
    assert int(inputs[changed].max()) < 256  # random replacements are ordinary ids, never [MASK]/[PAD]


def test_mask_tokens_is_reproducible_and_skips_special_ids_in_large_vocabularies():
    ids = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(2))
    ids[ids == MASK_ID] = 0
    a = mask_tokens(ids, 300, 0.5, torch.Generator().manual_seed(3))
    b = ReversibleBERT(vocab_size=300, **TINY).mask_tokens(ids, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    random = (a[1] != -100) & (a[0] != MASK_ID) & (a[0] != ids)
    assert bool(random.any()) and not bool(((a[0] == PAD_ID) & random).any())
    assert int(a[0].max()) < 300


@pytest.mark.parametrize("kwargs, error, message", [
    ({"mlm_probability": 0}, InputError, "mlm_probability"),
    ({"mlm_probability": 1.5}, InputError, "mlm_probability"),
    ({"vocab_size": 256}, ConfigError, ">= 258"),
])
def test_mask_tokens_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        mask_tokens(torch.zeros(2, 3, dtype=torch.long), **kwargs)
    with pytest.raises(InputError, match="integer token ids"):
        mask_tokens(torch.zeros(2, 3))
    with pytest.raises(InputError, match=r"\[0, 258\)"):
        mask_tokens(torch.full((2, 3), 258))


def test_loss_counts_only_the_labelled_positions():
    model = bert()
    inputs, labels, attention = padded_batch()
    out = model(inputs, labels=labels, attention_mask=attention)
    logp = torch.log_softmax(out.logits, dim=-1)
    sel = labels != -100
    want = -logp[sel].gather(-1, labels[sel][:, None]).mean()
    assert torch.allclose(out.loss, want, atol=1e-12, rtol=0)


# --- training -------------------------------------------------------------------------------------------
def heldout_loss(model, batches):
    model.eval()
    with torch.no_grad():
        total = sum(float(model(i, labels=l).loss) * int((l != -100).sum()) for i, l in batches)
    model.train()
    return total / sum(int((l != -100).sum()) for _, l in batches)


def test_bert_learns_the_masked_bytes_of_the_embedded_corpus():
    from revnet_core.data import stdlib_corpus

    corpus = stdlib_corpus()
    torch.manual_seed(0)
    model = ReversibleBERT(num_layers=2, d_model=64, num_heads=4, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def windows(tokens, n):
        starts = rng.integers(0, tokens.size - 64, n)
        return torch.from_numpy(np.stack([tokens[s:s + 64] for s in starts]).astype(np.int64))

    held = [mask_tokens(windows(corpus.heldout, 32), generator=g) for _ in range(2)]
    start = heldout_loss(model, held)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(60):
        inputs, labels = mask_tokens(windows(corpus.train, 8), generator=g)
        loss = model(inputs, labels=labels, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = heldout_loss(model, held)
    assert start > math.log(256) - 0.3  # a fresh model is near uniform
    assert end < start - 1.5 and end < math.log(256) - 1.5, (start, end)


# --- saving ---------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    model = perturb(ReversibleBERT(**TINY))
    inputs, labels, attention = padded_batch()
    model.save_pretrained(tmp_path / "bert")
    assert {p.name for p in (tmp_path / "bert").iterdir()} == {"config.json", "model.safetensors"}
    loaded = ReversibleBERT.from_pretrained(tmp_path / "bert")
    assert isinstance(loaded, ReversibleBERT) and not loaded.training and loaded.config == model.config
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs, attention_mask=attention).logits,
                           model(inputs, attention_mask=attention).logits)
    assert isinstance(ReversibleBERT.from_pretrained(tmp_path / "bert" / "config.json"), ReversibleBERT)


def test_bert_and_gpt_refuse_each_others_saves(tmp_path):
    ReversibleBERT(**TINY).save_pretrained(tmp_path / "bert")
    ReversibleGPT(**TINY).save_pretrained(tmp_path / "gpt")
    with pytest.raises(CheckpointIncompatibleError, match="ReversibleBERT.from_pretrained"):
        ReversibleGPT.from_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointIncompatibleError, match="ReversibleGPT.from_pretrained"):
        ReversibleBERT.from_pretrained(tmp_path / "gpt")


def test_load_errors_are_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no saved model"):
        ReversibleBERT.from_pretrained(tmp_path / "nothing")
    folder = ReversibleBERT(**TINY).save_pretrained(tmp_path / "bert")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointTruncatedError):
        ReversibleBERT.from_pretrained(folder)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        ReversibleBERT.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        ReversibleBERT.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="not readable JSON"):
        ReversibleBERT.from_pretrained(folder)
    (folder / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointIncompatibleError, match="not a RevNet-Zero pretrained config"):
        ReversibleBERT.from_pretrained(folder)


def test_from_pretrained_reads_a_bert_training_checkpoint(tmp_path):
    from revnet_torch import checkpoint as ckpt

    model = perturb(ReversibleBERT(**TINY))
    state = {"model_class": "ReversibleBERT", "model": model.state_dict(), "optimizer": {}, "scheduler": {},
             "rng": {}, "data": {}, "step": 1, "config": {}, "model_config": model.config.to_dict(), "run": {}}
    ckpt.save_checkpoint(tmp_path / ckpt.FILENAME, state)
    inputs, _, attention = padded_batch()
    loaded = ReversibleBERT.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs, attention_mask=attention).logits,
                           model(inputs, attention_mask=attention).logits)
    with pytest.raises(CheckpointIncompatibleError, match="ReversibleBERT.from_pretrained"):
        ReversibleGPT.from_pretrained(tmp_path / ckpt.FILENAME)


# --- docs -----------------------------------------------------------------------------------------------
def test_docs_models_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ROOT / "docs" / "models.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(path), "exec"), {"__name__": "__doc_example__"})
