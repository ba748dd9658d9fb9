"""The reversible backward equals plain autograd of the same function (fp64, CPU)."""

import pytest
import torch

import revnet_core
from revnet_core import AdditiveCoupling, ReversibilityError
from revnet_torch import run_layers

from .conftest import grads_of

TOL = 1e-10


def assert_same_grads(a, b, tol=TOL):
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        scale = max(b[name].abs().max().item(), 1e-30)
        assert err <= tol * max(scale, 1.0), f"{name}: max abs diff {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("num_layers", [1, 3, 6])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reverse_gradients_equal_plain_autograd(tiny_model, num_layers, coupling, dropout):
    model, ids = tiny_model(num_layers=num_layers, coupling=coupling, dropout=dropout, attention_dropout=dropout)
    model.train()
    loss_store, g_store = grads_of(model, ids, "store")
    loss_rev, g_rev = grads_of(model, ids, "reverse")
    assert torch.isfinite(loss_rev)
    assert abs(loss_rev.item() - loss_store.item()) < TOL
    assert_same_grads(g_rev, g_store)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_chunked_ffn_gradients_equal_plain_autograd(tiny_model, coupling, dropout):
    """The FFN over 3 sequence chunks (12 tokens, chunks of 5): the backward walks the same chunks."""
    model, ids = tiny_model(num_layers=3, coupling=coupling, dropout=dropout, ffn_chunk_size=5)
    model.train()
    loss_store, g_store = grads_of(model, ids, "store")
    loss_rev, g_rev = grads_of(model, ids, "reverse")
    assert abs(loss_rev.item() - loss_store.item()) < TOL
    assert_same_grads(g_rev, g_store)


def test_ffn_chunks_do_not_change_the_function(tiny_model):
    model, ids = tiny_model(num_layers=2, ffn_chunk_size=0)
    whole = model(ids).loss
    for layer in model.layers:
        layer.ffn.block.chunk_size = 5
    torch.testing.assert_close(model(ids).loss, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("policies", [["checkpoint"] * 4, ["reverse", "store", "reverse", "reverse"],
                                      ["store", "reverse", "checkpoint", "reverse"]])
def test_mixed_policies_equal_plain_autograd(tiny_model, policies):
    model, ids = tiny_model(num_layers=4, coupling="affine", dropout=0.1)
    model.train()
    _, g_store = grads_of(model, ids, "store")
    _, g_mixed = grads_of(model, ids, policies)
    assert_same_grads(g_mixed, g_store)


def test_stream_input_gradients_equal_plain_autograd(tiny_model):
    model, _ = tiny_model(num_layers=3, coupling="affine")
    x1 = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, 16, dtype=torch.float64)
    grads = {}
    for policy in ("store", "reverse"):
        y1, y2 = run_layers(model.layers, [policy] * 3, x1, x2)
        grads[policy] = torch.autograd.grad(((y1 * w).sum() + (y2 * y2).sum()), (x1, x2))
    for a, b in zip(grads["reverse"], grads["store"]):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


class SkewedAdditive(AdditiveCoupling):
    """An inverse that is off by a small, non-uniform epsilon (a constant shift would vanish in the
    pre-norm): an engine that really inverts must notice."""

    def inverse(self, y, fx):
        return y - fx + 1e-3 * y.tanh()


def test_engine_really_uses_the_inverse(tiny_model):
    model, ids = tiny_model(num_layers=3)
    _, g_store = grads_of(model, ids, "store")
    for layer in model.layers:
        layer.attn.coupling = SkewedAdditive()
        layer.ffn.coupling = SkewedAdditive()
    _, g_skew = grads_of(model, ids, "reverse")
    worst = max((g_skew[n] - g_store[n]).abs().max().item() for n in g_store)
    assert worst > 1e-6, "gradients ignored the inverse: activations must have been stored"


def test_layer_inverse_rebuilds_inputs_fp64(tiny_model):
    model, _ = tiny_model(num_layers=6, coupling="affine")
    x1 = torch.randn(2, 11, 16, dtype=torch.float64)
    x2 = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        y1, y2 = x1, x2
        for layer in model.layers:
            y1, y2 = layer(y1, y2)
        for layer in reversed(model.layers):
            y1, y2 = layer.inverse(y1, y2)
    assert (y1 - x1).abs().max() < 1e-12 and (y2 - x2).abs().max() < 1e-12


def test_backward_twice_raises_clear_error(tiny_model):
    model, ids = tiny_model()
    loss = model(ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(ReversibilityError, match="retain_graph"):
        loss.backward()


def test_gradient_accumulation_sums(tiny_model):
    model, ids = tiny_model(seq=10)
    a, b = ids[:1], ids[1:]
    model.zero_grad()
    (model(a).loss + model(b).loss).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(a).loss.backward()
    model(b).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=0, atol=TOL)


def test_each_parameter_gradient_is_produced_once(tiny_model):
    """DDP's contract: one accumulation per parameter per backward (no nested backward behind autograd)."""
    model, ids = tiny_model(num_layers=4)
    counts = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
             for n, p in model.named_parameters()]
    try:
        model(ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert set(counts) == {n for n, _ in model.named_parameters()}
    assert set(counts.values()) == {1}


def test_backward_leaves_global_rng_untouched(tiny_model):
    model, ids = tiny_model(dropout=0.2)
    model.train()
    loss = model(ids).loss
    before = torch.get_rng_state()
    loss.backward()
    assert torch.equal(before, torch.get_rng_state())


def test_recompute_replays_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=2, d_model=32, num_heads=2, vocab_size=40)
    seen = {"forward": [], "backward": []}
    phase = ["forward"]

    def record(mod, inp, out):
        seen[phase[0]].append((inp[0].dtype, out.dtype))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, 40, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).loss
    phase[0] = "backward"
    loss.backward()
    for h in hooks:
        h.remove()
    assert seen["backward"], "the backward never recomputed the blocks"
    assert {o for _, o in seen["forward"]} == {torch.bfloat16}
    assert {o for _, o in seen["backward"]} == {torch.bfloat16}
    assert len(seen["backward"]) == len(seen["forward"]) - 0  # every block recomputed exactly once


def test_bf16_autocast_gradients_close_to_plain():
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=4, d_model=64, num_heads=4, vocab_size=64)
    ids = torch.randint(0, 64, (1, 32))
    out = {}
    for policy in ("store", "reverse"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, out[policy] = grads_of(model, ids, policy)
    for n in out["store"]:
        a, b = out["reverse"][n], out["store"][n]
        rel = (a - b).norm() / b.norm().clamp(min=1e-12)
        assert rel < 2e-2, f"{n}: relative gradient error {rel:.2e}"


def test_outputs_held_by_the_caller_are_not_overwritten(tiny_model):
    """The backward rebuilds streams in place only in memory the engine owns (PEERS: freed inputs)."""
    model, _ = tiny_model(num_layers=3)
    x = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    y1, y2 = run_layers(model.layers, ["reverse"] * 3, x, x)
    kept = (y1.detach().clone(), y2.detach().clone())
    (y1.sum() + (y2 * 2).sum()).backward()
    assert torch.equal(y1.detach(), kept[0]) and torch.equal(y2.detach(), kept[1])


@pytest.mark.parametrize("policy, block", [("recompute_attention", "attn"), ("recompute_ffn", "ffn")])
def test_run_layers_implements_block_recomputes(tiny_model, policy, block):
    """run_layers itself runs a stored layer with one block under torch.utils.checkpoint: plain autograd's
    gradients, fewer saved bytes than ``store``, that block run again in the backward and no forward patched."""
    from revnet_torch.memory import saved_tensor_bytes

    model, ids = tiny_model(num_layers=2, dropout=0.1, attention_dropout=0.1)
    model.train()
    _, plain = grads_of(model, ids, "store")
    calls = {"attn": 0, "ffn": 0}
    hooks = [getattr(layer, name).block.register_forward_pre_hook(  # a pre-hook: the recompute stops early
        lambda *a, _n=name: calls.__setitem__(_n, calls[_n] + 1)) for layer in model.layers for name in calls]
    try:
        model.set_policy("store")
        with saved_tensor_bytes(exclude=list(model.parameters())) as stored:
            model(ids).loss.backward()
        for k in calls:
            calls[k] = 0
        with saved_tensor_bytes(exclude=list(model.parameters())) as recomputed:
            _, grads = grads_of(model, ids, policy)
    finally:
        for h in hooks:
            h.remove()
    assert_same_grads(grads, plain)
    assert recomputed["bytes"] < stored["bytes"]
    other = "ffn" if block == "attn" else "attn"
    assert calls[block] == 4 and calls[other] == 2  # 2 layers: forward + recompute, forward only
    assert all("forward" not in getattr(layer, n).block.__dict__ for layer in model.layers for n in calls)
    with torch.no_grad():  # no grad: nothing to recompute, the same function
        model.set_policy(policy)
        torch.manual_seed(7)
        a = model(ids).loss
        model.set_policy("store")
        torch.manual_seed(7)
        assert torch.equal(a, model(ids).loss)


def test_block_recompute_needs_a_layer_with_blocks():
    from revnet_torch import PairCoupling

    class Swap(PairCoupling):
        def forward(self, x1, x2):
            return x2, x1

        def inverse(self, y1, y2):
            return y2, y1

    x = torch.randn(1, 4, 8, requires_grad=True)
    with pytest.raises(revnet_core.ConfigError, match="recompute_ffn"):
        run_layers([Swap()], ["recompute_ffn"], x, x)
