"""Linear cross-entropy entry point: the references, the chunked PyTorch implementation, dispatch."""

import pytest
import torch
import torch.nn.functional as F

import revnet_kernels
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
