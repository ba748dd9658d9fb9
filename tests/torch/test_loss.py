"""The torch loss head: ``chunked_lm_loss`` is revnet_kernels' chunked linear cross-entropy (one implementation),
exact in fp64, computing no gradient when none can be asked for, and keeping its gradients outside
``saved_tensors`` (what the cost model replays)."""

import pytest
import torch

import revnet_kernels.cross_entropy as ce
from revnet_torch.loss import IGNORE_INDEX, chunked_lm_loss, lm_loss, shift_targets
from revnet_torch.memory import saved_tensor_bytes


def data(dtype=torch.float64, B=2, T=13, d=7, V=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, dtype=dtype, generator=gen)
    w = torch.randn(V, d, dtype=dtype, generator=gen) * 0.5
    t = shift_targets(torch.randint(0, V, (B, T), generator=gen))
    t[0, 2:6] = IGNORE_INDEX
    return h, w, t


def loss_and_grads(fn, h, w):
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(a, b)
    (0.7 * loss).backward()
    return loss.detach(), a.grad, b.grad


def test_is_the_kernels_chunked_implementation_bit_for_bit():
    h, w, t = data(torch.float32)
    ours = loss_and_grads(lambda a, b: chunked_lm_loss(a, b, t, 5), h, w)
    kernels = loss_and_grads(lambda a, b: ce.chunked_impl(a.reshape(-1, 7), b, t.reshape(-1), chunk_size=5), h, w)
    assert all(torch.equal(x, y) for x, y in zip(ours, kernels))


@pytest.mark.parametrize("chunk", [1, 4, 26, 1024])
def test_fp64_matches_full_logits_to_rounding(chunk):
    h, w, t = data()
    ours = loss_and_grads(lambda a, b: chunked_lm_loss(a, b, t, chunk), h, w)
    ref = loss_and_grads(lambda a, b: ce.reference_linear_cross_entropy(a, b, t), h, w)
    assert ours[0].dtype == torch.float64
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_autocast_runs_matmuls_in_bf16_and_sums_in_fp32():
    h, w, t = data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh, dw = loss_and_grads(lambda a, b: chunked_lm_loss(a, b, t, 8), h, w)
    ref = loss_and_grads(lambda a, b: ce.reference_linear_cross_entropy(a.bfloat16(), b.bfloat16(), t), h, w)
    assert loss.dtype == dh.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dw, ref[2], rtol=2e-2, atol=2e-3)


def test_no_gradient_is_computed_under_no_grad(monkeypatch):
    passes = []
    original = ce._chunk_pass
    monkeypatch.setattr(ce, "_chunk_pass", lambda *a: passes.append((a[5] is not None, a[6] is not None))
                        or original(*a))
    h, w, t = data()
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = chunked_lm_loss(a, b, t, 8)
    assert passes == [(False, False)] * 4 and loss.grad_fn is None
    torch.testing.assert_close(loss, ce.reference_linear_cross_entropy(h, w, t), rtol=1e-12, atol=1e-12)
    passes.clear()
    chunked_lm_loss(a, b, t, 8).backward()
    assert passes == [(True, True)] * 4


def test_gradients_live_on_the_node_not_in_saved_tensors():
    """dh and dW are computed in the forward and kept on the autograd node: saved_tensors_hooks see nothing
    (the cost model's loss head counts them as the node's, not as saved bytes)."""
    h, w, t = data(torch.float32)
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    with saved_tensor_bytes() as saved:
        loss = chunked_lm_loss(a, b, t, 8)
    assert saved["bytes"] == 0
    loss.backward()
    assert a.grad is not None and b.grad is not None


def test_lm_loss_off_cuda_is_the_chunked_head_for_auto_and_chunked():
    h, w, t = data(torch.float32)
    want = chunked_lm_loss(h, w, t, 6)
    assert torch.equal(lm_loss(h, w, t, 6, "auto"), want) and torch.equal(lm_loss(h, w, t, 6, "chunked"), want)
