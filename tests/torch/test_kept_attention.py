"""Policy ``reverse_keep_attention``: reverse layers that keep the attention kernel's output and log-sum-exp,
so their backward runs the kernel's backward without its forward. Gradients equal plain autograd's (fp64,
at init and with trained-like weights), the kernel's forward runs once per layer, bad layers are refused by
name, the cost model follows the allocator, and the planner offers it only where a layer can take it."""

import pytest
import torch
import torch.nn.functional as F

import revnet_core
from revnet_core.errors import ConfigError
from revnet_core.memory import Workload
from revnet_core.planner import layer_options, plan_layers
from revnet_torch import engine, kept_attention
from revnet_torch.cost import CostModel
from revnet_torch.scheduler import MemoryScheduler, keepable_layers

from .conftest import step_peak
from .test_drift import trained_like
from .test_profiler import small

KEEP = "reverse_keep_attention"


def model_grads(model, ids, policy, autocast=False):
    model.set_policy(policy)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, ids, plan, tol=1e-12):
    loss0, g0 = model_grads(model, ids, "store")
    loss, g = model_grads(model, ids, plan)
    assert torch.equal(loss, loss0) or abs(float(loss - loss0)) < tol
    assert g.keys() == g0.keys()
    for name in g0:
        scale = float(g0[name].abs().max()) or 1.0
        assert float((g[name] - g0[name]).abs().max()) <= tol * max(scale, 1.0), name


@pytest.mark.parametrize("fields", [
    dict(attn_head_chunk=2),  # two head chunks
    dict(attn_head_chunk=1, norm="rmsnorm", activation="swiglu"),  # one head a chunk
    dict(),  # one chunk of all heads
    dict(attn_head_chunk=2, causal=False, encoder=True),
])
@pytest.mark.parametrize("plan", [[KEEP] * 3, [KEEP, "reverse", "store"], ["store", KEEP, KEEP]])
def test_fp64_gradients_equal_plain_autograd(fields, plan):
    fields = dict(fields)
    if fields.pop("encoder", False):
        from revnet_torch.bert import ReversibleBERT

        torch.manual_seed(0)
        fields.pop("causal")
        model = ReversibleBERT(vocab_size=260, num_layers=3, d_model=32, num_heads=4, max_seq_len=64, **fields)
        model = model.double()
        ids = torch.randint(0, 256, (2, 29))
        _, g0 = bert_grads(model, ids, "store")
        _, g = bert_grads(model, ids, plan)
        for name in g0:
            assert torch.allclose(g[name], g0[name], rtol=0, atol=1e-12), name
        return
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=3, d_model=32, num_heads=4, vocab_size=50, max_seq_len=64,
                              **fields).double()
    assert_same_grads(model, torch.randint(0, 50, (2, 37)), plan)


def bert_grads(model, ids, policy):
    model.set_policy(policy)
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()  # every token labelled: the bidirectional loss over all of them
    return None, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fp64_gradients_with_trained_like_weights_at_depth():
    """Every matrix N(0, 1/fan_in): the block outputs are as large as the streams, where a wrong rebuild
    would show; 12 kept layers still give plain autograd's gradients."""
    model = trained_like(12, d_model=32, heads=4, seq=32, attn_head_chunk=2).double()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))
    assert_same_grads(model, ids, KEEP, tol=1e-11)


def test_the_backward_runs_no_attention_forward(monkeypatch):
    """Reverse layers run the attention kernel twice (forward, recompute); kept layers once, and their
    backward calls the kept kernel's backward once per head chunk."""
    model = small(attn_head_chunk=2).double()
    ids = torch.randint(0, 128, (1, 33))
    calls = {"sdpa": 0, "kept_fwd": 0, "kept_bwd": 0}
    sdpa, fwd, bwd = F.scaled_dot_product_attention, kept_attention.forward, kept_attention.backward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(F, "scaled_dot_product_attention", count("sdpa", sdpa))
    monkeypatch.setattr(kept_attention, "forward", count("kept_fwd", fwd))
    monkeypatch.setattr(kept_attention, "backward", count("kept_bwd", bwd))
    chunks = len(model.layers[0].attn.block.head_chunks(1, 33))
    assert chunks == 2
    model_grads(model, ids, "reverse")
    assert calls == {"sdpa": 2 * 3 * chunks, "kept_fwd": 0, "kept_bwd": 0}
    calls.update(sdpa=0)
    model_grads(model, ids, KEEP)
    assert calls == {"sdpa": 0, "kept_fwd": 3 * chunks, "kept_bwd": 3 * chunks}


def test_bf16_autocast_matches_reverse():
    """Under CPU bf16 autocast with exact streams the kept layers compute the reverse layers' function: the
    same loss bit for bit (the same CPU flash kernel), gradients within bf16 noise."""
    model = small(attn_head_chunk=2)
    ids = torch.randint(0, 128, (2, 64))
    loss_r, g_r = model_grads(model, ids, "reverse", autocast=True)
    loss_k, g_k = model_grads(model, ids, KEEP, autocast=True)
    assert torch.equal(loss_r, loss_k)
    for name in g_r:
        err = float((g_k[name] - g_r[name]).norm() / g_r[name].norm().clamp_min(1e-30))
        assert err < 1e-2, (name, err)
        assert torch.isfinite(g_k[name]).all()


@pytest.mark.parametrize("fields, reason", [
    (dict(attention_window=8), "sliding window"),
    (dict(dropout=0.1), "random numbers"),
    (dict(coupling="affine"), "not additive"),
    (dict(attention="reference"), "no fused kernel"),
    (dict(use_flash_attention=False), "no fused kernel"),
])
def test_layers_that_cannot_keep_are_refused_by_name(fields, reason):
    model = small(**fields)
    model.train()
    assert keepable_layers(model) == [False] * 3
    assert reason in engine.keep_refusal(model.layers[0])
    model.set_policy(KEEP)
    with pytest.raises(ConfigError, match=reason):
        model(torch.randint(0, 128, (1, 16))).loss.backward()


def test_inference_needs_nothing_kept():
    """Without gradients the policy is a plain forward: no kept state, the same logits as reverse."""
    model = small(attn_head_chunk=2).eval()
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        model.set_policy("reverse")
        a = model(ids, return_logits=True).logits
        model.set_policy(KEEP)
        b = model(ids, return_logits=True).logits
    assert torch.equal(a, b)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("plan", [[KEEP] * 3, [KEEP, "store", "reverse"]])
@pytest.mark.parametrize("autocast", [False, True])
def test_step_peak_matches_the_allocator(plan, autocast):
    """The cost model's replay of the kept forward and backward: a CPU step's peak within 2% (the reverse
    layers' own tolerance here is 5%, see test_cost_measured.py), and more than the all-reverse step's."""
    model = small(d_model=256, num_heads=4, d_ff=512, attn_head_chunk=2)
    model.set_policy(plan)
    ids = torch.randint(0, 128, (1, 512))
    predicted, measured, cm = step_peak(model, ids, autocast)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)
    assert cm.peak_bytes(plan) >= cm.peak_bytes(["reverse"] * 3)


def test_cost_model_prices_memory_and_time():
    """Per kept layer: the output (compute dtype) and the log-sum-exp (fp32) a token, kept from forward to
    backward; the step costs less compute than reverse, more than store."""
    cfg = revnet_core.ModelConfig(num_layers=8, d_model=256, num_heads=4, vocab_size=256, max_seq_len=1 << 16)
    cm = CostModel(cfg, Workload(batch=1, seq_len=1 << 15, autocast_dtype="bfloat16", device="cuda"))
    L = cfg.num_layers
    base = cm.peak_bytes(["reverse"] * L)
    kept_one = cm.peak_bytes(["reverse"] * (L - 1) + [KEEP])
    kept_all = cm.peak_bytes([KEEP] * L)
    per_layer = (1 << 15) * (256 * 2 + 4 * 4)
    assert kept_all - base >= (L - 1) * per_layer  # the bottom layer's pair is freed before the peak
    assert kept_one > base
    t_store, t_keep, t_rev = (cm.step_time([p] * L) for p in ("store", KEEP, "reverse"))
    assert t_store < t_keep < t_rev


def test_planner_offers_it_only_where_a_layer_can_take_it():
    assert KEEP not in layer_options("layer")
    assert layer_options("layer", keepable=True) == ("store", KEEP, "reverse")
    assert layer_options("block", invertible=False, keepable=True)[-1] == "checkpoint"
    cfg = revnet_core.ModelConfig(num_layers=6, d_model=256, num_heads=4, vocab_size=256, max_seq_len=1 << 16)
    cm = CostModel(cfg, Workload(batch=1, seq_len=1 << 15, autocast_dtype="bfloat16", device="cuda"))
    least = cm.peak_bytes(["reverse"] * 6)
    # a budget with room for a few kept layers and no stored one: the plan keeps attention on the top layers
    budget = least + 3 * (1 << 15) * (256 * 2 + 16) + (1 << 20)
    plan = plan_layers(cm, 6, budget, strategy="adaptive", keepable=[True] * 6)
    assert plan.fits and KEEP in plan.policies and "store" not in plan.policies
    assert list(plan.policies) == sorted(plan.policies, key=lambda p: p == KEEP)  # kept on top
    assert KEEP not in plan_layers(cm, 6, budget, strategy="adaptive").policies  # not offered: not chosen


def test_balanced_scheduler_picks_it_for_a_keepable_model():
    model = small(num_layers=4, d_model=64, num_heads=4, max_seq_len=4096)
    ids = torch.randint(0, 128, (1, 2048))
    with MemoryScheduler(model, strategy="balanced", recompute_granularity="layer") as sched:
        model(ids).loss.backward()
    assert KEEP in sched.history[-1].plan.policies
    model = small(num_layers=4, d_model=64, num_heads=4, max_seq_len=4096, dropout=0.1)
    model.train()
    with MemoryScheduler(model, strategy="balanced", recompute_granularity="layer") as sched:
        model(ids).loss.backward()
    assert KEEP not in sched.history[-1].plan.policies
