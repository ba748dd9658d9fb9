"""Linear cross-entropy entry point: the references, the chunked PyTorch implementation (exact in fp64, no
gradients when none can be asked for), dispatch."""

import pytest
import torch
import torch.nn.functional as F

import revnet_kernels
import revnet_kernels.cross_entropy as ce
from revnet_kernels.cross_entropy import chunked_impl, default_chunk_rows, reference_linear_cross_entropy


def data(n=21, vocab=40, d=8):
    h, w = torch.randn(n, d, dtype=torch.float64), torch.randn(vocab, d, dtype=torch.float64)
    t = torch.randint(0, vocab, (n,))
    t[::3] = -100
    return h, w, t


def test_reference_is_torch_cross_entropy_on_full_logits():
    h, w, t = data()
    torch.testing.assert_close(reference_linear_cross_entropy(h, w, t).double(), F.cross_entropy(h @ w.T, t),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunked_matches_reference_with_gradients(chunk):
    h, w, t = data()
    out = []
    for fn in (lambda a, b: chunked_impl(a, b, t, chunk_size=chunk),
               lambda a, b: reference_linear_cross_entropy(a, b, t)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        (2.5 * loss).backward()
        out.append((loss, a.grad, b.grad))
    for x, y in zip(*out):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-6, atol=1e-7)


def test_entry_point_flattens_batch_and_dispatches():
    h, w, t = data(n=24)
    h3, t3 = h.float().view(2, 12, 8), t.view(2, 12)
    assert revnet_kernels.select("linear_cross_entropy", "cpu", torch.float32, {}).impl == "chunked"
    want = reference_linear_cross_entropy(h3.reshape(-1, 8), w.float(), t)
    for impl in (None, "chunked", "triton", "reference"):
        got = revnet_kernels.linear_cross_entropy(h3, w.float(), t3, chunk_size=5, impl=impl)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_chunk_keeps_one_chunk_of_logits_near_128_mib():
    assert default_chunk_rows(50257) == 1024
    assert default_chunk_rows(256) == 8192
    assert default_chunk_rows(10**9) == 16


@pytest.mark.parametrize("h,w,t,match", [
    (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long), r"weight must be \(V, d\)"),
    (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), "targets must be shaped like"),
    (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4), "targets must be integers"),
])
def test_checks(h, w, t, match):
    with pytest.raises(ValueError, match=match):
        revnet_kernels.linear_cross_entropy(h, w, t)


def odd_data(n, vocab, d, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, dtype=torch.float64, generator=gen)
    w = torch.randn(vocab, d, dtype=torch.float64, generator=gen) * 0.5
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.3] = -100
    return h, w, t


@pytest.mark.parametrize("n,vocab,d,chunk", [(1, 2, 3, 1), (23, 41, 7, 5), (97, 131, 13, 32), (64, 37, 9, 64)])
def test_chunked_is_exact_in_fp64(n, vocab, d, chunk):
    """Sums and softmax in the accumulation dtype: fp64 inputs give the fp64 reference to rounding, not to
    fp32's 1e-7; the loss is fp64 too."""
    h, w, t = odd_data(n, vocab, d, seed=n)
    out = []
    for fn in (lambda a, b: chunked_impl(a, b, t, chunk_size=chunk),
               lambda a, b: reference_linear_cross_entropy(a, b, t)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        (1.7 * loss).backward()
        out.append((loss, a.grad, b.grad))
    assert out[0][0].dtype == out[1][0].dtype == torch.float64
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_every_target_ignored_gives_zero_loss_and_gradients():
    h, w, _ = odd_data(9, 11, 4, seed=0)
    t = torch.full((9,), -100)
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_impl(a, b, t, chunk_size=4)
    loss.backward()
    assert loss.item() == 0 and not a.grad.any() and not b.grad.any()


def record_chunk_passes(monkeypatch):
    """Patch the per-chunk pass; returns a list that gets (dh asked, dW asked) per chunk."""
    calls = []
    original = ce._chunk_pass
    monkeypatch.setattr(ce, "_chunk_pass", lambda hc, wc, tc, vc, inv, dh, dw:
                        calls.append((dh is not None, dw is not None)) or original(hc, wc, tc, vc, inv, dh, dw))
    return calls


def test_chunked_computes_no_gradient_when_none_can_be_asked(monkeypatch):
    """Under no_grad (where a Function's needs_input_grad still says True) and for inputs that need none,
    only the loss is computed; with one input requiring grad, only its gradient."""
    h, w, t = odd_data(10, 13, 5, seed=1)
    want = reference_linear_cross_entropy(h, w, t)
    calls = record_chunk_passes(monkeypatch)
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = chunked_impl(a, b, t, chunk_size=4)
    assert calls == [(False, False)] * 3 and loss.grad_fn is None
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    calls.clear()
    assert chunked_impl(h, w, t, chunk_size=4).grad_fn is None and calls == [(False, False)] * 3
    calls.clear()
    loss = chunked_impl(a, w, t, chunk_size=4)
    loss.backward()
    assert calls == [(True, False)] * 3
    calls.clear()
    chunked_impl(a, b, t, chunk_size=4).backward()
    assert calls == [(True, True)] * 3


def test_second_backward_raises_the_reversibility_error():
    """Gradients computed in the forward are scaled in place once: retain_graph cannot be honoured, and the
    error is the reversible layers' own (a RuntimeError), so a model reports one kind either way."""
    from revnet_core.errors import ReversibilityError

    h, w, t = odd_data(8, 9, 3, seed=2)
    loss = chunked_impl(h.requires_grad_(), w, t, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(ReversibilityError, match="backward ran twice.*retain_graph"):
        loss.backward()
