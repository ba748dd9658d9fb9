import pytest
import torch

import revnet_core


@pytest.fixture
def tiny_model():
    """A small fp64 model factory: tiny_model(**config) -> (model, ids)."""

    def make(seed=0, batch=2, seq=12, **fields):
        torch.manual_seed(seed)
        cfg = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24, vocab_size=37, max_seq_len=64)
        cfg.update(fields)
        model = revnet_core.build("torch", **cfg).double()
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
        return model, ids

    return make


def grads_of(model, ids, policy, **kw):
    """Loss and parameter gradients (plus embedding-input gradient via the embedding weight) under a policy."""
    model.zero_grad(set_to_none=True)
    model.set_policy(policy)
    torch.manual_seed(1234)  # dropout masks start from the same state for every policy
    loss = model(ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
