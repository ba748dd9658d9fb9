"""convert_to_reversible: outputs equal to the original's, gradients of the reversible path equal to the
construction's stored-activation gradients, shared weights, save/load, generate, named errors."""

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from revnet_core.errors import ConfigError
from revnet_torch.hf import UnsupportedModelError, convert_to_reversible
from revnet_torch.hf.convert import ReversibleStack

from .conftest import CLASSES, gpt2_config, ids

pytestmark = pytest.mark.usefixtures("one_thread")
LM = ("GPT2LMHeadModel", "LlamaForCausalLM")


def outputs(model, x, **kw):
    with torch.no_grad():
        out = model(x, **kw)
    return {k: v for k, v in out.items() if k in ("last_hidden_state", "logits", "loss")}


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_outputs_equal_the_original(make, name, dtype, atol):
    model = make(name, dtype)
    rev = convert_to_reversible(model, coupling="additive", checkpoint_segments=2)
    x = ids()
    kw = {"labels": x} if name in LM else {}
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding: the mask reaches every layer unchanged
    for extra in ({}, {"attention_mask": mask}):
        a, b = outputs(model, x, **kw, **extra), outputs(rev, x, **kw, **extra)
        assert set(a) == set(b) == ({"logits", "loss"} if kw else {"last_hidden_state"})
        for k in a:
            assert b[k].dtype == a[k].dtype and torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def grads(model, x, seed=7):
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)  # the same gamma draws for both policies
    out = model(x, labels=x) if hasattr(model, "lm_head") else model(x)
    loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,layers", [("GPT2LMHeadModel", 3), ("GPT2Model", 4), ("LlamaForCausalLM", 4),
                                         ("LlamaModel", 5)])
@pytest.mark.parametrize("gamma", [0.5, 0.125])
def test_reversible_gradients_equal_stored_activations(make, name, layers, gamma):
    """fp64, trained-like weights: the reverse policy (inputs rebuilt) gives the construction's gradients."""
    model = make(name, layers=layers)
    x = ids()
    l_rev, g_rev = grads(convert_to_reversible(model, gamma=gamma, policy="reverse"), x)
    l_ref, g_ref = grads(convert_to_reversible(model, gamma=gamma, policy="store"), x)
    assert l_rev == l_ref
    assert set(g_rev) == set(g_ref) and len(g_ref) == len(list(model.parameters()))
    for n in g_ref:
        assert torch.allclose(g_rev[n], g_ref[n], atol=1e-10, rtol=0), n
    # BDIA trains another function than the original (gamma != 0): the losses differ, but not by much
    l_orig, _ = grads(model, x)
    assert l_orig != l_rev and abs(l_orig - l_rev) < 0.2 * l_orig


@pytest.mark.parametrize("name", LM)
def test_gamma_zero_trains_the_original(make, name):
    """gamma=0 is the original's function: its gradients (checkpointed segments) equal the original's."""
    model = make(name, layers=4)
    x = ids()
    l0, g0 = grads(model, x)
    for segments in (None, 2):
        l1, g1 = grads(convert_to_reversible(model, gamma=0, checkpoint_segments=segments), x)
        assert torch.allclose(l0, l1, atol=1e-12, rtol=0)
        for n in g0:
            assert torch.allclose(g0[n], g1[n], atol=1e-10, rtol=0), n


def _saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the forward's, not the recompute's
        out = model(x).last_hidden_state.sum()
    out.backward()
    return total


@pytest.mark.parametrize("name", ["GPT2Model", "LlamaModel"])
def test_nothing_stored_per_layer(make, name):
    """Autograd keeps the same bytes at 2 and 6 layers under reverse (the side bits live outside autograd
    and are 1/64 of a fp64 stream per layer), and more at 6 under store."""
    x = ids(seq=16)
    saved = {(p, L): _saved_bytes(convert_to_reversible(make(name, layers=L), policy=p), x)
             for p in ("reverse", "store") for L in (2, 6)}
    assert saved["reverse", 6] == saved["reverse", 2]
    per_layer_stored = saved["store", 2] - saved["reverse", 2]
    assert per_layer_stored > 10 * saved["reverse", 2]
    assert saved["store", 6] - saved["reverse", 6] > 2.5 * per_layer_stored


@pytest.mark.parametrize("name", list(CLASSES))
def test_weights_are_shared_and_the_original_untouched(make, name):
    model = make(name, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rev = convert_to_reversible(model)
    assert type(rev) is type(model) and rev is not model
    orig = dict(model.named_parameters())
    conv = dict(rev.named_parameters())
    assert list(orig) == list(conv) and all(conv[n] is orig[n] for n in orig)
    assert list(model.state_dict()) == list(rev.state_dict())
    stacks = [m for m in rev.modules() if isinstance(m, ReversibleStack)]
    assert len(stacks) == 1 and not any(isinstance(m, ReversibleStack) for m in model.modules())
    # training the twin moves the original's weights: they are the same tensors
    rev.train()
    x = ids()
    out = rev(x, labels=x) if name in LM else rev(x)
    (out.loss if name in LM else out.last_hidden_state.sum()).backward()
    with torch.no_grad():
        for p in rev.parameters():
            p.add_(p.grad, alpha=-1e-2)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls_name", LM)
def test_save_load_round_trip_and_generate(make, tmp_path, cls_name):
    model = make(cls_name, torch.float32)
    rev = convert_to_reversible(model)
    rev.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cls = CLASSES[cls_name][0]
    loaded = cls.from_pretrained(tmp_path).eval()
    sd, ld = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(ld) and all(torch.equal(sd[k], ld[k]) for k in sd)
    again = convert_to_reversible(loaded)
    x = ids(batch=1, seq=6)
    assert torch.equal(outputs(model, x)["logits"], outputs(again, x)["logits"])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(x, **kw), rev.generate(x, **kw))


def test_refuses_unsupported_models(make):
    with pytest.raises(UnsupportedModelError, match="GPT2Model, GPT2LMHeadModel, LlamaModel, LlamaForCausalLM"):
        convert_to_reversible(GPT2ForSequenceClassification(gpt2_config()))

    class MyGPT2(GPT2LMHeadModel):
        pass

    with pytest.raises(UnsupportedModelError, match="not subclasses"):
        convert_to_reversible(MyGPT2(gpt2_config()))
    with pytest.raises(UnsupportedModelError, match="supported"):
        convert_to_reversible(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="add_cross_attention"):
        convert_to_reversible(GPT2LMHeadModel(gpt2_config(add_cross_attention=True)))
    model = make("LlamaForCausalLM")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flash_attention_2'"):
        convert_to_reversible(model)
    with pytest.raises(UnsupportedModelError, match="already converted"):
        convert_to_reversible(convert_to_reversible(make("GPT2Model")))


class CustomAttention(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **k):
        return self.inner(*a, **k)


def test_refuses_unknown_modules_unless_vouched_for(make):
    model = make("LlamaForCausalLM")
    model.model.layers[1].self_attn = CustomAttention(model.model.layers[1].self_attn)
    with pytest.raises(UnsupportedModelError, match=r"layer 1\.self_attn is a .*CustomAttention"):
        convert_to_reversible(model)
    rev = convert_to_reversible(model, allow_modules=(CustomAttention,))
    x = ids()
    assert torch.equal(outputs(model, x)["logits"], outputs(rev, x)["logits"])
    model = make("GPT2Model")
    model.h[0].mlp.forward = lambda h: h
    with pytest.raises(UnsupportedModelError, match="forward replaced"):
        convert_to_reversible(model)


@pytest.mark.parametrize("kw,match", [({"coupling": "affine"}, "no construction equal"),
                                      ({"coupling": "bogus"}, "supported: 'additive'"),
                                      ({"gamma": 0.3}, "2\\*\\*-m"), ({"gamma": -0.5}, "2\\*\\*-m"),
                                      ({"checkpoint_segments": 0}, "1..3"), ({"checkpoint_segments": True}, "1..3"),
                                      ({"policy": "checkpoint"}, "one of")])
def test_bad_arguments(make, kw, match):
    with pytest.raises(ConfigError, match=match):
        convert_to_reversible(make("GPT2Model"), **kw)


@pytest.mark.parametrize("name,cfg", [("GPT2LMHeadModel", dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)),
                                      ("LlamaForCausalLM", dict(attention_dropout=0.1))])
def test_dropout_is_replayed(make, name, cfg):
    """With dropout on, the backward's recompute replays the forward's draws: reverse equals store."""
    model = make(name, layers=4, **cfg)
    x = ids()
    l_rev, g_rev = grads(convert_to_reversible(model, policy="reverse"), x)
    l_ref, g_ref = grads(convert_to_reversible(model, policy="store"), x)
    l_other, _ = grads(convert_to_reversible(model, policy="store"), x, seed=8)
    assert l_rev == l_ref and l_other != l_ref  # the draws matter, and both policies drew the same
    for n in g_ref:
        assert torch.allclose(g_rev[n], g_ref[n], atol=1e-10, rtol=0), n


def test_padding_mask_in_training(make):
    """A left-padded batch trains through the same mask in both policies."""
    model = make("LlamaForCausalLM", layers=3)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    res = []
    for policy in ("reverse", "store"):
        rev = convert_to_reversible(model, policy=policy).train()
        rev.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        rev(x, attention_mask=mask, labels=x).loss.backward()
        res.append([p.grad.clone() for p in rev.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(*res))


class TupleLayer(torch.nn.Module):
    """A layer in the style of older transformers: returns (hidden_states,)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden, *a, **k):
        return (self.inner(hidden, *a, **k),)


def test_refuses_layers_that_return_tuples(make):
    model = make("LlamaModel", layers=2)
    model.layers[0] = TupleLayer(model.layers[0])
    rev = convert_to_reversible(model, allow_modules=(TupleLayer,)).train()
    with pytest.raises(UnsupportedModelError, match="returned a tuple"):
        rev(ids())
