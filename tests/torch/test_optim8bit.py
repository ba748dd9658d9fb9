"""AdamW with block-wise 8-bit moments (revnet_torch.optim8bit): the quantiser against a brute-force nearest
code, the first step equal to AdamW's, close to fp32 AdamW over a short run, the same steps inside the
backward, bit-identical resume through the trainer's checkpoint, ~2 bytes of state a parameter, and the
named refusals. The 200-step comparison is benchmarks/optim8bit_vs_adamw.py."""

import pytest
import torch

import revnet_core
from revnet_core import ConfigError
from revnet_core.data import lm_data, stdlib_corpus
from revnet_torch import optim8bit
from revnet_torch.checkpoint import CheckpointError
from revnet_torch.optim import OptimizerInBackward
from revnet_torch.optim8bit import AdamW8bit, dequantize_blockwise, dynamic_map, quantize_blockwise
from revnet_torch.trainer import LongContextTrainer

TINY = dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=256, max_seq_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only cost (conftest)


def nearest_codes(x: torch.Tensor, block: int, signed: bool) -> torch.Tensor:
    """The reference: per block, the code whose value times the absmax is closest to x (brute force)."""
    values = dynamic_map(signed).double()
    flat = x.reshape(-1).double()
    out = []
    for start in range(0, flat.numel(), block):
        b = flat[start:start + block]
        scale = b.abs().max()
        normed = b / scale if scale > 0 else b
        out.append((normed[:, None] - values[None, :]).abs().argmin(dim=1))
    return torch.cat(out)


def test_the_maps():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert len(signed) == 255 and len(unsigned) == 256
    for m in (signed, unsigned):
        assert torch.all(m[1:] > m[:-1]) and m[-1] == 1.0 and (m == 0).sum() == 1
    assert signed[0] == -1.0 and torch.equal(signed, -signed.flip(0))  # symmetric
    assert unsigned[0] == 0.0 and unsigned[1] == pytest.approx(1e-7)  # seven decades below the absmax
    # Dynamic: each decade below the top has half the codes of the one above it, not a linear grid.
    assert int((unsigned > 0.1).sum()) == 128
    assert int(((unsigned > 0.01) & (unsigned <= 0.1)).sum()) == 64


@pytest.mark.parametrize("n, block", [(1000, 64), (4096, 256), (777, 256), (3000, 2048)])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_the_nearest_code_per_block(n, block, signed):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 0, n)[torch.randperm(n, generator=g)]
    if not signed:
        x = x * x
    x[:block // 2] = 0  # part of a block zero
    codes, scales = quantize_blockwise(x, block, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert scales.dtype == torch.float32 and scales.shape == (-(-n // block),)
    ref = nearest_codes(x, block, signed)
    differ = codes.long() != ref
    if not signed:  # the one deviation: tiny non-zero values take the smallest non-zero code, not zero
        assert torch.all(codes[x > 0] > 0)
        differ &= ~((ref == 0) & (x > 0))
    # Ties between two codes may fall either way in fp32: allow a handful, never a distant code.
    assert int(differ.sum()) <= 2 and torch.all((codes.long() - ref).abs() <= 1)
    back = dequantize_blockwise(codes, scales, block, signed)
    assert back.shape == (n,) and torch.all(back[x == 0] == 0)
    for start in range(0, n, block):  # each block's absmax comes back exactly
        b = x[start:start + block]
        i = int(b.abs().argmax())
        assert back[start + i] == b[i]


def test_an_all_zero_block_and_shapes():
    x = torch.zeros(3, 128)
    x[2] = torch.linspace(-1, 1, 128)
    codes, scales = quantize_blockwise(x, 128, True)
    assert scales.tolist()[:2] == [0.0, 0.0] and scales[2] == 1.0
    assert torch.equal(dequantize_blockwise(codes, scales, 128, True)[:256], torch.zeros(256))


def test_first_step_equals_adamw():
    # Step 1 updates with the fp32 moments before they are quantised: AdamW's step, to fp32 rounding.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 40))
    b = torch.nn.Parameter(a.detach().clone())
    g = torch.randn(64, 40)
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ours = AdamW8bit([b], lr=1e-2, weight_decay=0.1)
    a.grad, b.grad = g.clone(), g.clone()
    ref.step()
    ours.step()
    torch.testing.assert_close(b, a, rtol=0, atol=2e-7)


def test_many_steps_stay_close_to_adamw():
    torch.manual_seed(1)
    target = torch.randn(4096)
    a = torch.nn.Parameter(torch.zeros(4096))
    b = torch.nn.Parameter(torch.zeros(4096))
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.0)
    ours = AdamW8bit([b], lr=1e-2, weight_decay=0.0)
    for step in range(100):
        noise = 0.1 * torch.randn(4096)
        for p, opt in ((a, ref), (b, ours)):
            p.grad = (p.detach() - target) + noise  # a noisy quadratic
            opt.step()
    a, b = a.detach(), b.detach()
    gap = (a - b).abs()
    assert gap.mean() < 0.03 and gap.max() < 0.15  # measured 0.0145 and 0.073, parameters moved ~0.56 on average
    assert (a - target).norm() / target.norm() == pytest.approx(float((b - target).norm() / target.norm()),
                                                                 abs=0.02)


def test_chunked_update_is_the_unchunked_one(monkeypatch):
    torch.manual_seed(2)
    start = torch.randn(5000)
    grads = [torch.randn(5000) for _ in range(3)]

    def run():
        p = torch.nn.Parameter(start.clone())
        opt = AdamW8bit([p], lr=1e-2, block_size=64)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]

    whole, whole_state = run()
    monkeypatch.setattr(optim8bit, "CHUNK_ELEMENTS", 128)  # 40 chunks of two blocks
    chunked, chunked_state = run()
    assert torch.equal(whole, chunked)
    assert all(torch.equal(whole_state[k], chunked_state[k]) for k in whole_state if k != "step")


def test_non_contiguous_and_bf16_parameters():
    p = torch.nn.Parameter(torch.randn(128, 64).t())  # strided
    AdamW8bit([p], lr=1e-2).step()  # no gradient: nothing happens
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    AdamW8bit([p], lr=1e-2, weight_decay=0.0).step()
    torch.testing.assert_close(p.detach(), before - 1e-2, rtol=0, atol=1e-6)  # first Adam step: lr * sign
    q = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    q.grad = torch.ones_like(q)
    opt = AdamW8bit([q], lr=0.5, weight_decay=0.0)
    opt.step()
    assert q.dtype == torch.bfloat16 and torch.all(q == 0.5)
    assert opt.state[q]["exp_avg_scales"].dtype == torch.float32


def test_state_is_about_two_bytes_a_parameter():
    params = [torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(1000))]
    n = sum(p.numel() for p in params)
    for block, expected in ((256, 2 + 8 / 256), (2048, 2 + 8 / 2048)):
        opt = AdamW8bit(params, block_size=block)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state_bytes() / n == pytest.approx(expected, rel=0.01)
    fp32 = torch.optim.AdamW(params)
    fp32.step()
    fp32_bytes = sum(s[k].numel() * s[k].element_size() for s in fp32.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert fp32_bytes / n == 8


# --- through the trainer --------------------------------------------------------------------------------
def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return revnet_core.build("torch", **TINY).to(dtype)


def data(seed=0):
    return lm_data(stdlib_corpus(), seq_len=32, batch_size=4, seed=seed, eval_windows_max=2)


def fit(optimizer, steps, fused=False, dtype=torch.float32, **kw):
    m = model(dtype=dtype)
    trainer = LongContextTrainer(m, optimizer=optimizer, optimizer_in_backward=fused, progress=False, plot=False,
                                 drift_every=None, lr=3e-3, warmup_steps=2, **kw)
    summary = trainer.fit(data(), steps=steps)
    return m, trainer, summary


def test_short_run_tracks_fp32_adamw():
    # A short version of the benchmark's 200 steps: the losses follow fp32 AdamW's step by step.
    _, plain, _ = fit("adamw", 25)
    _, eight, _ = fit("adamw8bit", 25)
    a = [r["loss"] for r in plain.history if r.get("kind") == "train"]
    b = [r["loss"] for r in eight.history if r.get("kind") == "train"]
    assert a[-1] < a[0] - 0.5  # it learns at all
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05
    assert abs(a[-1] - b[-1]) / a[-1] < 0.01


@pytest.mark.parametrize("accum", [1, 2])
def test_inside_the_backward_takes_the_same_steps(accum):
    plain, _, _ = fit("adamw8bit", 3, gradient_accumulation_steps=accum, max_grad_norm=None, dtype=torch.float64)
    fused, trainer, _ = fit("adamw8bit", 3, fused=True, gradient_accumulation_steps=accum, max_grad_norm=None,
                            dtype=torch.float64)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max():.3e}"
    inner = next(iter(trainer.optimizer._inner.values()))
    assert isinstance(inner, AdamW8bit)


def test_inside_the_backward_with_bf16_weights_and_stochastic_rounding():
    # A plain bf16 network (the model's CPU bf16 path would switch the norm kernel process-wide).
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(torch.bfloat16)
    params = list(net.parameters())
    opt = OptimizerInBackward(params, AdamW8bit, lr=1e-2, stochastic_rounding=True,
                              generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in params]
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    opt.arm()
    net(x).float().pow(2).mean().backward()
    opt.finish()
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in params)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    states = [inner.state for inner in opt._inner.values()]
    assert all(s["exp_avg_codes"].dtype == torch.uint8 for state in states for s in state.values())


@pytest.mark.parametrize("fused", [False, True])
def test_resume_is_bit_identical(tmp_path, fused):
    def run(out, seed=0, **kw):
        m = model(seed=seed)
        trainer = LongContextTrainer(m, optimizer="adamw8bit", optimizer_in_backward=fused, progress=False,
                                     plot=False, drift_every=None, out_dir=out, lr=3e-3,
                                     callbacks=kw.pop("callbacks", ()))
        trainer.fit(data(), steps=4, **kw)
        return m, trainer

    straight, _ = run(tmp_path / "a")
    run(tmp_path / "b", callbacks=[lambda t, r: r["step"] == 2 and t.request_stop()])
    resumed, trainer = run(tmp_path / "c", seed=5, resume=tmp_path / "b")  # other weights: all from the file
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert trainer.hyperparameters()["optimizer"] == "adamw8bit"


def test_resume_with_another_optimizer_is_refused(tmp_path):
    LongContextTrainer(model(), optimizer="adamw", progress=False, plot=False, drift_every=None,
                       out_dir=tmp_path / "a").fit(data(), steps=1)
    trainer = LongContextTrainer(model(), optimizer="adamw8bit", progress=False, plot=False, drift_every=None)
    with pytest.raises(CheckpointError, match="'adamw' optimizer state"):
        trainer.fit(data(), steps=2, resume=tmp_path / "a")


def test_named_refusals():
    p = torch.nn.Parameter(torch.ones(8))
    for bad in (63, 100, 32, 1 << 17, True, 256.0):
        with pytest.raises(ConfigError, match="block_size"):
            AdamW8bit([p], block_size=bad)
    with pytest.raises(ConfigError, match="block_size"):
        AdamW8bit([{"params": [p], "block_size": 96}])
    with pytest.raises(ConfigError, match="float parameters"):
        AdamW8bit([torch.nn.Parameter(torch.ones(8, dtype=torch.int64), requires_grad=False)])
    for kw in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=0.0), dict(weight_decay=-0.1)):
        with pytest.raises(ConfigError):
            AdamW8bit([p], **kw)
    with pytest.raises(ConfigError, match="optimizer='adam'"):
        LongContextTrainer(model(), optimizer="adam", progress=False)
