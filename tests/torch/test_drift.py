"""Exact streams and the drift monitor: reverse no worse than bf16's own noise at 96 layers, and the
fallback to checkpoint when a layer is made unstable on purpose."""

import pytest
import torch

import revnet_core
from revnet_core.couplings import AdditiveCoupling
from revnet_torch import engine
from revnet_torch.drift import DriftMonitor
from revnet_torch.scheduler import LayerScheduler


def trained_like(depth, d_model=32, heads=2, seq=32, seed=0, **fields):
    """A small model with every matrix N(0, 1/fan_in): trained-like sizes, where drift shows."""
    torch.manual_seed(seed)
    model = revnet_core.build("torch", num_layers=depth, d_model=d_model, num_heads=heads, vocab_size=64,
                              max_seq_len=seq, **fields)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def grads(model, ids, policy, autocast, exact):
    model.set_policy(policy)
    model.zero_grad(set_to_none=True)
    with engine.exact_streams(exact), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids).loss
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def rel(a, b):
    return float((a - b).norm() / b.norm())


IDS = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def deep():
    return trained_like(96)


def test_exact_streams_at_96_layers_within_bf16_noise(deep):
    """bf16 autocast, 96 layers: reverse (exact streams, the default under autocast) against store of the
    same model is far under bf16's own gap (bf16 store vs fp32 store), and so is it against the float model."""
    fp32 = grads(deep, IDS, "store", False, False)
    float_store = grads(deep, IDS, "store", True, False)
    own = rel(float_store, fp32)
    assert rel(grads(deep, IDS, "reverse", True, False), float_store) > own  # the drift, without the fix
    exact_store = grads(deep, IDS, "store", True, "auto")
    exact_reverse = grads(deep, IDS, "reverse", True, "auto")
    assert rel(exact_reverse, exact_store) < 1e-6 < own
    assert rel(exact_reverse, float_store) <= own


def test_fp32_exact_streams_rebuild_bit_for_bit(deep):
    """fp32, 96 layers, exact streams on: the rebuilt layer-0 input is the forward's bit for bit, and the
    reverse gradients equal store's of the same model up to summation order."""
    drifts = []

    class Recorder:
        def record(self, layers, drift):
            drifts.append(drift)

    deep.set_policy("reverse")
    with engine.exact_streams(True), engine.watching(Recorder()):
        loss = deep(IDS).loss
    loss.backward()
    assert drifts == [0.0]
    assert rel(grads(deep, IDS, "reverse", False, True), grads(deep, IDS, "store", False, True)) < 1e-6


def test_exact_streams_auto_is_off_without_autocast():
    x = torch.zeros(2, 3, 4)
    assert not engine.exact_wanted("auto", x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.exact_wanted("auto", x)
        assert not engine.exact_wanted(False, x)
    assert engine.exact_wanted(True, x)


def test_fixed_point_sums_are_exact():
    x = torch.randn(4, 8, 16) * 3
    step = engine.fixed_point_step(x, x)
    xs = engine.snap(x, step, x.dtype)
    coupling = engine.FixedPointAdditive(step)
    fx = torch.randn(4, 8, 16, dtype=torch.bfloat16) * 50
    y = coupling.forward(xs, fx)
    assert torch.equal(coupling.inverse(y, fx), xs)
    assert torch.equal(coupling.inverse_(y.clone(), fx), xs)


class Unstable(AdditiveCoupling):
    """Additive forward, an inverse off by 1e-3 of the block output: a layer that does not rebuild its input."""

    def inverse(self, y, fx):
        return y - fx * 1.001


def unstable_model(depth=6):
    model = trained_like(depth)
    model.layers[3].ffn.coupling = Unstable()  # no "additive" capability of its own: the stack runs in floats
    return model


@pytest.mark.parametrize("scheduled", [False, True])
def test_monitor_falls_back_to_checkpoint_and_recovers(scheduled):
    model = unstable_model()
    if scheduled:
        model.set_scheduler(LayerScheduler())  # reverse for every layer: the model's policies
    monitor = DriftMonitor(model, every=2, threshold=1e-3)
    with pytest.warns(RuntimeWarning, match="reconstruction drift"):
        bad = grads(model, IDS, "reverse", False, "auto") if not scheduled else _step(model)
    assert [e["layers"] for e in monitor.events] == [[0, 5]] and monitor.events[0]["step"] == 1
    assert monitor.events[0]["drift"] > 1e-3 and monitor.events[0]["threshold"] == 1e-3
    assert monitor.pop_events() == monitor.events and monitor.pop_events() == []
    store = _store_grads(model)
    assert rel(bad, store) > 1e-4  # the unstable layer's gradients were wrong
    fixed = _step(model)  # step 2: not monitored, layers now under checkpoint
    assert len(monitor.checks) == 1
    assert rel(fixed, store) < 1e-6
    if scheduled:
        assert model.scheduler.forced == dict.fromkeys(range(6), "checkpoint")
    else:
        assert model.policies == ["checkpoint"] * 6
    monitor.remove()


def _step(model):
    model.zero_grad(set_to_none=True)
    model(IDS).loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def _store_grads(model):
    kept, sched = list(model.policies), model.scheduler
    model.scheduler = None
    if sched is not None:
        sched._uninstall()
    g = grads(model, IDS, "store", False, "auto")
    model.policies = kept
    if sched is not None:
        sched._install()
        model.scheduler = sched
    return g


def test_monitor_checks_every_n_training_forwards():
    model = trained_like(4)
    monitor = DriftMonitor(model, every=3)
    for _ in range(7):
        _step(model)
    with torch.no_grad():
        model(IDS)  # not a training forward: not counted
    assert [c["step"] for c in monitor.checks] == [1, 4, 7]
    assert all(c["drift"] < 1e-3 for c in monitor.checks) and not monitor.events
    with pytest.raises(ValueError):
        DriftMonitor(model, every=0)


def test_the_torch_option_reaches_the_engine(monkeypatch):
    """backend_options {"torch": {"exact_streams": ...}} decides; "auto" defers to the engine's context."""
    seen = []
    original = engine.fixed_point_step
    monkeypatch.setattr(engine, "fixed_point_step", lambda *a: seen.append(1) or original(*a))
    for option, expect in ((True, 1), (False, 0), ("auto", 0)):
        seen.clear()
        model = trained_like(2, exact_streams=option)
        model(IDS)  # fp32, no autocast: "auto" is off here
        assert len(seen) == expect, option
    with engine.exact_streams(True):
        seen.clear()
        trained_like(2)(IDS)
        assert len(seen) == 1


def test_the_trainer_logs_a_drift_fallback(tmp_path):
    """LongContextTrainer attaches the monitor; an unstable layer's fallback lands in log.jsonl."""
    import json

    from revnet_torch.trainer import LongContextTrainer

    model = trained_like(3, seq=16)

    class Skewed(AdditiveCoupling):  # an inverse that is off on purpose: the rebuilt input drifts
        def inverse(self, y, fx):
            return y - fx + 0.1

        def inverse_(self, y, fx):
            return y.sub_(fx).add_(0.1)

    for layer in model.layers:
        layer.attn.coupling = Skewed()
    model.set_policy("reverse")
    data = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    trainer = LongContextTrainer(model, out_dir=tmp_path, progress=False, plot=False, device="cpu",
                                 drift_every=1, precision="fp32")
    trainer.train(data, batch_size=2)  # two steps
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "drift_fallback"]
    assert events and events[0]["step"] == 1 and events[0]["policy"] == "checkpoint"
    assert set(model.policies) == {"checkpoint"}
