"""Fused linear + cross-entropy (interpreted) against full-logit autograd: loss, dh and dW."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from revnet_kernels.cross_entropy import reference_linear_cross_entropy
from revnet_kernels.cross_entropy_triton import CrossEntropyBlocks, linear_cross_entropy_forward, \
    triton_linear_cross_entropy

from .helpers import rel_err


def make(n, vocab, d=24, dtype=torch.float32, ignore_every=4):
    h = torch.randn(n, d, dtype=dtype)
    w = (torch.randn(vocab, d) * 0.3).to(dtype)
    t = torch.randint(0, vocab, (n,))
    t[::ignore_every] = -100
    return h, w, t


def compare(h, w, t, chunk, tol=None, upstream=1.7, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = triton_linear_cross_entropy(hh, ww, t, chunk_size=chunk, **kw)
    (loss * upstream).backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_linear_cross_entropy(hr, wr, t, **kw).double()
    (ref * upstream).backward()
    assert loss.dtype == torch.float32 and hh.grad.dtype == h.dtype and ww.grad.dtype == w.dtype
    for a, e in ((loss, ref), (hh.grad, hr.grad), (ww.grad, wr.grad)):
        if tol is None:
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
        else:
            assert rel_err(a, e) < tol


@pytest.mark.parametrize("n,vocab,chunk", [
    (1, 5, None), (1, 300, 1), (17, 5, 1), (17, 101, 16), (129, 5, 7), (129, 101, 16), (129, 300, None),
    (64, 300, 64),
])
def test_fp32_matches_reference(n, vocab, chunk):
    compare(*make(n, vocab), chunk)


def test_every_target_ignored_gives_zero_loss_and_gradients():
    h, w, t = make(9, 50)
    t[:] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = triton_linear_cross_entropy(hh, ww, t, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and not hh.grad.any() and not ww.grad.any()


def test_custom_ignore_index():
    h, w, _ = make(20, 30)
    t = torch.randint(0, 30, (20,))
    t[3] = t[11] = 7
    compare(h, w, t, 8, ignore_index=7)


@pytest.mark.parametrize("bad", [-5, 30, -100])
def test_target_out_of_range_gives_nan_not_a_wrong_number(bad):
    h, w, _ = make(6, 30)
    t = torch.randint(0, 30, (6,))
    t[2] = bad
    loss, dh, dw = linear_cross_entropy_forward(h, w, t, ignore_index=-1, chunk_size=4)
    assert loss.isnan() and dh[2].isnan().all() and dw.isnan().any()
    assert not dh[3].isnan().any()  # other rows untouched


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol):
    compare(*make(40, 90, dtype=dtype), 16, tol=tol)


def test_only_requested_gradients_are_computed():
    h, w, t = make(10, 20)
    loss, dh, dw = linear_cross_entropy_forward(h, w, t, chunk_size=4, need_dh=False, need_dw=True)
    assert dh is None and dw.shape == w.shape and dw.dtype == torch.float32
    loss2, dh2, dw2 = linear_cross_entropy_forward(h, w, t, chunk_size=4, need_dh=False, need_dw=False)
    assert dh2 is None and dw2 is None and torch.equal(loss, loss2)
    ww = w.clone().requires_grad_()
    triton_linear_cross_entropy(h, ww, t).backward()  # h needs no gradient
    assert ww.grad is not None


def test_autocast_bf16_matmuls_fp32_softmax():
    h, w, t = make(33, 70)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = triton_linear_cross_entropy(hh, ww, t, chunk_size=8)
        ref = reference_linear_cross_entropy(h, w, t)  # same bf16 matmul, full logits
    loss.backward()
    assert loss.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item())


def test_padded_vocabulary_gives_the_same_result():
    h, w, t = make(21, 77)
    a = linear_cross_entropy_forward(h, w, t, chunk_size=8, pad_vocab=False)
    b = linear_cross_entropy_forward(h, w, t, chunk_size=8, pad_vocab=True)
    assert b[2].shape == w.shape and b[2].is_contiguous()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_second_backward_raises_a_clear_error():
    h, w, t = make(8, 30)
    hh = h.clone().requires_grad_()
    loss = triton_linear_cross_entropy(hh, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_narrow_vocabulary_blocks():
    h, w, t = make(6, 77)
    loss, dh, dw = linear_cross_entropy_forward(h, w, t, chunk_size=4, blocks=CrossEntropyBlocks(16, 1))
    torch.testing.assert_close(loss, reference_linear_cross_entropy(h, w, t), rtol=1e-5, atol=1e-6)


@given(n=st.integers(1, 40), vocab=st.integers(2, 150), chunk=st.integers(1, 48))
def test_property_any_shape(n, vocab, chunk):
    compare(*make(n, vocab), chunk)


@pytest.mark.parametrize("n, vocab", [(3000, 100), (40, 64), (700, 40001)])  # the last: 512-row chunks
def test_cost_model_knows_the_kernels_buffers(n, vocab, monkeypatch):
    """revnet_torch.cost.fused_ce_layout (through revnet_kernels.cross_entropy.fused_layout) names the logits
    chunk and the padded vocabulary this kernel allocates. Only the host's buffers matter here: the row
    kernel is replaced by a no-op (interpreting it over 40k columns takes minutes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import revnet_kernels.cross_entropy_triton as ce_triton

    from revnet_torch.cost import fused_ce_layout

    shapes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith(("empty", "zeros", "new_zeros")):
                shapes.append(tuple(out.shape))
            return out

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(ce_triton, "_ce_rows", NoLaunch())
    h, w = torch.randn(n, 8), torch.randn(vocab, 8)
    with Allocations():
        linear_cross_entropy_forward(h, w, torch.randint(0, vocab, (n,)))
    rows, padded = fused_ce_layout(vocab, n)
    assert (rows, padded) in shapes and (padded, 8) in shapes


def test_no_gradient_pass_when_none_can_be_asked(monkeypatch):
    """The Triton head shares the chunked one's autograd wrapper: under no_grad it runs without NEED_GRAD."""
    import revnet_kernels.cross_entropy_triton as cet

    asked = []
    original = cet.linear_cross_entropy_forward
    monkeypatch.setattr(cet, "linear_cross_entropy_forward",
                        lambda *a: asked.append(a[5:7]) or original(*a))
    h, w, t = make(9, 30)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = triton_linear_cross_entropy(hh, ww, t, chunk_size=4)
    assert asked == [(False, False)] and loss.grad_fn is None
    triton_linear_cross_entropy(hh, ww, t, chunk_size=4).backward()
    assert asked[1] == (True, True)
    torch.testing.assert_close(loss, reference_linear_cross_entropy(h, w, t), rtol=1e-5, atol=1e-6)
