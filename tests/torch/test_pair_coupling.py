"""Whole-pair couplings in the user's README form: the engine inverts them, then re-runs forward for grads."""

import pytest
import torch
from torch import nn

import revnet_core
from revnet_torch import PairCoupling, ReversibleSequence
from revnet_torch.memory import saved_tensor_bytes


class CustomCoupling(PairCoupling):
    """The README's example: y1 = x1, y2 = x2 + transform(x1); ``swap`` alternates which stream changes."""

    def __init__(self, d, swap=False, dropout=0.0):
        super().__init__()
        self.mlp = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.swap = swap

    def transform(self, x):
        return self.drop(self.mlp(x) * torch.sigmoid(self.gate(x)))

    def forward(self, x1, x2):
        if self.swap:
            return x1 + self.transform(x2), x2
        return x1, x2 + self.transform(x1)

    def inverse(self, y1, y2):
        if self.swap:
            return y1 - self.transform(y2), y2
        return y1, y2 - self.transform(y1)


def grads(seq, x1, x2, policy):
    seq.policies = [policy] * len(seq.layers)
    seq.zero_grad(set_to_none=True)
    a, b = x1.detach().requires_grad_(), x2.detach().requires_grad_()
    torch.manual_seed(7)
    y1, y2 = seq(a, b)
    ((y1 * y1).sum() + (y2 * 3).sum()).backward()
    return [a.grad, b.grad] + [p.grad for p in seq.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pair_coupling_gradients_equal_plain_autograd(dropout):
    torch.manual_seed(0)
    seq = ReversibleSequence([CustomCoupling(8, swap=i % 2 == 1, dropout=dropout) for i in range(4)]).double()
    seq.train()
    x1, x2 = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    for a, b in zip(grads(seq, x1, x2, "reverse"), grads(seq, x1, x2, "store")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_pair_couplings_mix_with_reversible_layers():
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=2, d_model=8, num_heads=2, vocab_size=11)
    seq = ReversibleSequence([model.layers[0], CustomCoupling(8), model.layers[1], CustomCoupling(8, swap=True)])
    seq = seq.double()
    x1, x2 = torch.randn(1, 6, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)
    for a, b in zip(grads(seq, x1, x2, "reverse"), grads(seq, x1, x2, "store")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_engine_uses_the_pair_inverse():
    class Skewed(CustomCoupling):
        def inverse(self, y1, y2):
            x1, x2 = super().inverse(y1, y2)
            return x1 + 1e-3 * y1.tanh(), x2

    torch.manual_seed(0)
    seq = ReversibleSequence([Skewed(8, swap=i % 2 == 1) for i in range(3)]).double()
    x1, x2 = torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 4, 8, dtype=torch.float64)
    worst = max((a - b).abs().max().item() for a, b in zip(grads(seq, x1, x2, "reverse"), grads(seq, x1, x2, "store")))
    assert worst > 1e-6


def test_pair_coupling_saves_nothing_per_layer():
    def saved(depth):
        torch.manual_seed(0)
        seq = ReversibleSequence([CustomCoupling(16, swap=i % 2 == 1) for i in range(depth)])
        x = torch.randn(1, 32, 16, requires_grad=True)
        with saved_tensor_bytes(exclude=list(seq.parameters())) as s:
            y1, y2 = seq(x, x)
        (y1.sum() + y2.sum()).backward()
        return s["bytes"]

    assert saved(2) == saved(12)
