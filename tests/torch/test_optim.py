"""The optimizer step inside the backward (revnet_torch.optim): the same updates as the optimizer after the
backward, bit for bit in fp64, with accumulation and resume; one parameter's gradient alive at a time;
bf16 stochastic rounding unbiased; the named refusals."""

import pytest
import torch

import revnet_core
from revnet_core import ConfigError
from revnet_core.data import lm_data, stdlib_corpus
from revnet_torch.optim import OptimizerInBackward, stochastic_round_to_bf16
from revnet_torch.trainer import LongContextTrainer, ReversibleAMPTrainer

TINY = dict(num_layers=3, d_model=32, num_heads=2, d_ff=48, vocab_size=256, max_seq_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only cost (conftest)


def model(seed=0, dtype=torch.float64, **fields):
    torch.manual_seed(seed)
    m = revnet_core.build("torch", **{**TINY, **fields}).to(dtype)
    with torch.no_grad():  # trained-like weights: not the init's small symmetric ones
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def data(seed=0):
    return lm_data(stdlib_corpus(), seq_len=32, batch_size=2, seed=seed, eval_windows_max=2)


def trained(fused: bool, steps=3, accum=1, policy="reverse", **kw):
    m = model()
    m.set_policy(policy)
    trainer = LongContextTrainer(m, gradient_accumulation_steps=accum, optimizer_in_backward=fused, progress=False,
                                 plot=False, drift_every=None, lr=1e-3, **kw)
    summary = trainer.fit(data(), steps=steps)
    return m, trainer, summary


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("policy", ["reverse", "store"])
def test_fused_updates_equal_the_step_after_the_backward(accum, policy):
    plain, _, _ = trained(False, accum=accum, policy=policy, max_grad_norm=None)
    fused, trainer, _ = trained(True, accum=accum, policy=policy, max_grad_norm=None)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max():.3e}"
    records = [r for r in trainer.history if r.get("kind") == "train"]
    assert len(records) == 3 and all(r["grad_norm"] > 0 for r in records)


def test_gradient_norm_reported_equals_the_plain_steps():
    _, plain, _ = trained(False, max_grad_norm=None)
    _, fused, _ = trained(True, max_grad_norm=None)
    a = [r["grad_norm"] for r in plain.history if r.get("kind") == "train"]
    b = [r["grad_norm"] for r in fused.history if r.get("kind") == "train"]
    assert a == pytest.approx(b, rel=1e-12)


def test_clipping_uses_the_previous_steps_norm():
    _, trainer, _ = trained(True, steps=3, max_grad_norm=1e-3)
    records = [r for r in trainer.history if r.get("kind") == "train"]
    assert records[0]["clip_factor"] == 1.0  # nothing to go by on the first step
    for before, now in zip(records, records[1:]):
        assert now["clip_factor"] == pytest.approx(min(1.0, 1e-3 / (before["grad_norm"] + 1e-6)), rel=1e-12)
        assert now["clip_factor"] < 1.0


def test_only_one_parameters_gradient_is_alive_at_a_time():
    m = model(num_layers=6)
    m.set_policy("reverse")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = OptimizerInBackward(params, torch.optim.AdamW, lr=1e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    opt.arm()
    m(ids, labels=ids).loss.backward()
    opt.finish()
    largest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    assert opt.peak_grad_bytes == largest
    assert opt.peak_grad_bytes < total / 4
    assert all(p.grad is None for p in params)
    opt.step()  # nothing pending


def test_unarmed_backward_accumulates_like_plain_autograd():
    m = model()
    params = list(m.parameters())
    opt = OptimizerInBackward(params, torch.optim.AdamW, lr=1e-3)
    before = [p.detach().clone() for p in params]
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    m(ids, labels=ids).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # nothing updated
    assert opt.peak_grad_bytes == sum(p.numel() * p.element_size() for p in params)
    with pytest.raises(RuntimeError, match="did not consume"):
        opt.step()


def test_fused_resume_is_bit_identical(tmp_path):
    def run(out, **kw):
        m = model(seed=kw.pop("seed", 0))
        trainer = LongContextTrainer(m, optimizer_in_backward=True, progress=False, plot=False, drift_every=None,
                                     out_dir=out, **{k: v for k, v in kw.items() if k == "callbacks"})
        trainer.fit(data(), steps=4, resume=kw.get("resume"))
        return m

    straight = run(tmp_path / "a")
    run(tmp_path / "b", callbacks=[lambda t, r: r["step"] == 2 and t.request_stop()])
    resumed = run(tmp_path / "c", seed=5, resume=tmp_path / "b")  # other weights: all must come from the file
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_second_fit_does_not_leave_the_first_optimizer_stepping():
    m = model()
    trainer = LongContextTrainer(m, optimizer_in_backward=True, progress=False, plot=False, drift_every=None)
    trainer.fit(data(), steps=1)
    first = trainer.optimizer
    trainer.fit(data(), steps=1)
    assert trainer.optimizer is not first and first._handles == []


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    x = torch.full((200_000,), float(lo) + 0.3 * (float(hi) - float(lo)), dtype=torch.float32)
    out = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {float(lo), float(hi)}
    assert (out == hi).float().mean().item() == pytest.approx(0.3, abs=0.005)
    neg = stochastic_round_to_bf16(-x, torch.Generator().manual_seed(0))
    assert torch.equal(neg, -out)  # the magnitude is rounded: symmetric in sign
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3e38])
    got = stochastic_round_to_bf16(special).float()
    assert got[0] == float("inf") and got[1] == -float("inf") and got[2].isnan() and torch.isfinite(got[3])


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    # A step of 1e-4 on 1.0 is 1/78 of a bf16 ulp: round-to-nearest never moves, stochastic rounding drifts
    # by the right amount in expectation.
    def run(sr):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = OptimizerInBackward([p], torch.optim.SGD, lr=1e-4, stochastic_rounding=sr,
                                  generator=torch.Generator().manual_seed(0)) if sr else \
            OptimizerInBackward([p], torch.optim.SGD, lr=1e-4)
        for _ in range(200):
            opt.arm()
            (-p.float().sum()).backward()  # gradient -1: each step adds lr
            opt.finish()
        return p.detach().float()

    assert torch.equal(run(False), torch.ones(4096))
    assert run(True).mean().item() == pytest.approx(1.0 + 200 * 1e-4, abs=5e-4)


def test_named_refusals():
    with pytest.raises(ConfigError, match="fp16"):
        ReversibleAMPTrainer(model(dtype=torch.float32), fp16=True, optimizer_in_backward=True, progress=False)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ConfigError, match="bf16"):
        OptimizerInBackward([p], stochastic_rounding=True)
    with pytest.raises(ConfigError, match="clip="):
        OptimizerInBackward([p], clip="current")
    with pytest.raises(ConfigError, match="max_grad_norm"):
        OptimizerInBackward([p], max_grad_norm=0)
    with pytest.raises(RuntimeError, match="arm"):
        OptimizerInBackward([p]).finish()
