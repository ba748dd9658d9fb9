"""The fixed-point BDIA step: exact inverse, side bits, bit-exact rebuilt inputs at depth."""

import pytest
import torch

from revnet_torch import engine
from revnet_torch.hf import convert_to_reversible
from revnet_torch.hf.bdia import BDIACoupling, StepContext, grid_step, pack_bits, range_limit, unpack_bits

from .conftest import ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_pack_unpack_round_trip(bits):
    r = torch.randint(0, 2 ** bits, (3, 5, 7)).double()
    packed = pack_bits(r, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (bits, (r.numel() + 7) // 8)
    assert torch.equal(unpack_bits(packed, r.shape, r.dtype), r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bits", [1, 2, 5])
def test_coupling_inverse_is_bit_exact(dtype, bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 6, 8, generator=g, dtype=dtype) * 3
    step = grid_step(x)
    x = (x / step).round() * step
    fx = ((torch.randn(4, 6, 8, generator=g, dtype=dtype) * 5) / step).round() * step
    sigma = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=dtype).view(4, 1, 1)
    c = BDIACoupling(sigma, StepContext(step, bits, dtype, None))
    y = c.forward(x, fx)
    # y is fx + gamma x up to x's dropped low bits, and those are what the coupling keeps
    gamma = sigma / 2 ** bits
    assert (y - (fx + gamma * x)).abs().max() < step
    assert bool(c.ctx.peak < range_limit(step))
    assert torch.equal(c.inverse(y, fx), x)
    with pytest.raises(RuntimeError, match="no side bits"):
        c.inverse(y, fx)


class Drift:
    def __init__(self):
        self.seen = []

    def record(self, layers, drift):
        self.seen.append(drift)


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-2)])
def test_rebuilt_input_is_bit_exact_at_depth(make, name, dtype, rtol):
    """16 layers, trained-like weights: the backward rebuilds the stack's input bit for bit (drift 0) in fp32
    and bf16 models; gradients match stored activations to fp32 rounding (bf16: to bf16's noise, the
    cotangent sums' order differs)."""
    model = make(name, dtype, layers=16)
    x = ids(seq=16)
    res = {}
    for policy in ("reverse", "store"):
        rev = convert_to_reversible(model, policy=policy).train()
        rev.zero_grad(set_to_none=True)
        monitor = Drift()
        torch.manual_seed(3)
        with engine.watching(monitor):
            loss = rev(x, labels=x).loss
        loss.backward()
        res[policy] = (loss.detach(), [p.grad.float() for p in rev.parameters()], monitor.seen)
    assert res["reverse"][2] == [0.0]
    assert torch.equal(res["reverse"][0], res["store"][0])
    for a, b in zip(res["reverse"][1], res["store"][1]):
        assert (a - b).abs().max() <= rtol * b.abs().max()


def test_gamma_draws_per_sample_and_forward(make):
    """Training forwards differ from one draw to the next, and samples of one batch draw apart."""
    model = make("GPT2Model", layers=4)
    rev = convert_to_reversible(model).train()
    x = ids(batch=1).repeat(8, 1)
    with torch.enable_grad():
        a = rev(x).last_hidden_state
        b = rev(x).last_hidden_state
    assert not torch.equal(a, b)
    assert len({tuple(a[i].flatten()[:4].tolist()) for i in range(8)}) > 1


def test_warns_when_the_stream_leaves_the_fixed_point_range(make):
    model = make("GPT2Model", torch.bfloat16, layers=2)
    with torch.no_grad():
        model.h[0].mlp.c_proj.bias.fill_(1e7)  # the stream grows by far more than 2**16 past the input
    rev = convert_to_reversible(model).train()
    with pytest.warns(RuntimeWarning, match="fixed-point range"):
        rev(ids()).last_hidden_state.float().sum().backward()


def test_autocast_streams_are_fp32_and_rebuilt_exactly(make):
    """An fp32 model under bf16 autocast: fp32 fixed-point streams, the input rebuilt bit for bit."""
    model = make("LlamaForCausalLM", torch.float32, layers=6)
    rev = convert_to_reversible(model).train()
    x = ids(seq=16)
    monitor = Drift()
    with torch.autocast("cpu", dtype=torch.bfloat16), engine.watching(monitor):
        loss = rev(x, labels=x).loss
    loss.backward()
    assert monitor.seen == [0.0] and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rev.parameters())
