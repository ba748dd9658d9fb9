"""Schedulers: exact gradients under every policy they set, the README's call shapes, predicted saved bytes
against measured ones, and the adaptive correction."""

import warnings

import pytest
import torch

import revnet_core
from revnet_core import ModelConfig
from revnet_core.memory import Workload
from revnet_torch.cost import ROPE_CHUNK, CostModel
from revnet_torch import blocks
from revnet_torch.memory import saved_tensor_bytes
from revnet_torch.scheduler import (AdaptiveScheduler, CalibratedCost, LayerScheduler, MemoryScheduler,
                                    invertible_layers)

from .conftest import grads_of, saved_bytes_case

TOL = 1e-10
ALL = ("store", "reverse", "checkpoint", "recompute_attention", "recompute_ffn")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids oversubscribing a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_same_grads(a, b, tol=TOL):
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * max(b[name].abs().max().item(), 1.0), f"{name}: {err:.3e}"


def scheduled_grads(model, ids, policies):
    """Gradients with ``policies`` (block-level ones included) applied through LayerScheduler."""
    ls = LayerScheduler()
    for i, p in enumerate(policies):
        ls.set_policy(layers=[i], policy=p)
    model.set_scheduler(ls)
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        loss = model(ids).loss
        loss.backward()
        assert list(model.scheduler.plan.policies) == list(policies)
    finally:
        model.set_scheduler(None)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policies", [[p] * 3 for p in ALL] + [
    ["recompute_ffn", "reverse", "recompute_attention"],
    ["store", "recompute_attention", "checkpoint"],
    ["reverse", "recompute_ffn", "store"],
])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_every_policy_gives_plain_autograd_gradients(tiny_model, policies, coupling):
    model, ids = tiny_model(coupling=coupling, dropout=0.1, attention_dropout=0.1, ffn_chunk_size=5)
    model.train()
    _, plain = grads_of(model, ids, "store")
    assert_same_grads(scheduled_grads(model, ids, policies), plain)


@pytest.mark.parametrize("strategy", ["aggressive", "balanced", "adaptive"])
@pytest.mark.parametrize("granularity", ["layer", "attention", "block"])
def test_memory_scheduler_with_block_ends_before_backward(tiny_model, strategy, granularity):
    """The README's loop: the policies are captured in the forward; backward runs after the ``with``."""
    model, ids = tiny_model(num_layers=4)
    _, plain = grads_of(model, ids, "store")
    model.set_policy("reverse")
    budget = CostModel(model.config, Workload(batch=2, seq_len=ids.shape[1], param_dtype="float64",
                                              autocast_dtype=None, device="cpu")).peak_bytes("store") * 0.9
    sched = MemoryScheduler(model=model, strategy=strategy, recompute_granularity=granularity,
                            memory_budget=int(budget))
    model.zero_grad(set_to_none=True)
    with sched:
        outputs = model(ids)
        loss = outputs.loss
    assert model.policies == ["reverse"] * 4  # restored after the forward
    loss.backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters()}, plain)
    plan = sched.plan
    assert plan is not None and len(plan.policies) == 4
    if strategy == "aggressive":
        assert plan.policies == ("reverse",) * 4
    if strategy == "adaptive":
        assert plan.fits and plan.peak_bytes <= budget
    assert sched.history[-1].measured_bytes == sched.history[-1].predicted_bytes  # exact on CPU


def test_adaptive_scheduler_readme_shape():
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=4, d_model=32, num_heads=2, vocab_size=64)
    inputs = torch.randint(0, 64, (1, 64))
    cm = CostModel(model.config, Workload(seq_len=64, autocast_dtype=None, device="cpu"))
    budget = (cm.peak_bytes("reverse") + cm.peak_bytes("store")) // 2
    scheduler = AdaptiveScheduler(model=model, memory_budget=budget, profile=None, recompute_strategy="selective")
    with scheduler as sched:
        outputs = model(inputs)
        assert sched.recomputed_layers and len(sched.recomputed_layers) < 4
        assert sched.memory_saved > 0
    outputs.loss.backward()
    assert sched.recomputed_layers == [i for i, p in enumerate(sched.plan.policies) if p != "store"]
    with AdaptiveScheduler(model=model, memory_budget=budget, recompute_strategy="full") as full:
        model(inputs)
    assert full.recomputed_layers == [0, 1, 2, 3]
    with pytest.warns(UserWarning, match="stores every layer"):
        with AdaptiveScheduler(model=model, memory_budget=budget, recompute_strategy="none") as none:
            model(inputs)
    assert none.recomputed_layers == [] and not none.plan.fits


def test_layer_scheduler_readme_shape():
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=24, d_model=32, num_heads=2, vocab_size=64)
    ids = torch.randint(0, 64, (1, 32))
    cm = CostModel(model.config, Workload(seq_len=32, autocast_dtype=None, device="cpu"))
    layer_scheduler = LayerScheduler(memory_budget=cm.peak_bytes(["store"] * 6 + ["reverse"] * 18))
    layer_scheduler.set_policy(layers=range(0, 6), policy="store")
    layer_scheduler.set_policy(layers=range(6, 18), policy="recompute")
    layer_scheduler.set_policy(layers=range(18, 24), policy="adaptive")
    model.set_scheduler(layer_scheduler)
    model(ids).loss.backward()
    plan = model.scheduler.plan.policies
    assert plan[:6] == ("store",) * 6 and plan[6:18] == ("reverse",) * 12
    assert set(plan[18:]) <= {"store", "reverse"}
    model.set_scheduler(None)
    assert model.scheduler is None and model.policies == ["reverse"] * 24


def test_recompute_means_checkpoint_for_a_layer_without_inverse(tiny_model):
    class NoInverse(revnet_core.AdditiveCoupling):
        inverse = revnet_core.BaseCoupling.inverse

    model, ids = tiny_model()
    model.layers[1].ffn.coupling = NoInverse()
    assert invertible_layers(model) == [True, False, True]
    ls = LayerScheduler().set_policy(layers=range(3), policy="recompute")
    model.set_scheduler(ls)
    model(ids).loss.backward()
    assert model.scheduler.plan.policies == ("reverse", "checkpoint", "reverse")
    model.set_scheduler(LayerScheduler().set_policy(layers=[1], policy="reverse"))
    with pytest.raises(ValueError, match="layer 1 cannot be reversed"):
        model(ids)
    model.set_scheduler(None)


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="fast"), "strategy='fast'"), (dict(recompute_granularity="op"), "recompute_granularity='op'"),
    (dict(memory_budget=-1), "memory_budget"),
])
def test_scheduler_arguments_raise(tiny_model, kw, match):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=match):
        MemoryScheduler(model=model, **kw)


def test_other_bad_arguments_raise(tiny_model):
    model, ids = tiny_model()
    with pytest.raises(ValueError, match="recompute_strategy='sometimes'"):
        AdaptiveScheduler(model=model, memory_budget=10**9, recompute_strategy="sometimes")
    with pytest.raises(ValueError, match="policy='fast'"):
        LayerScheduler().set_policy(layers=range(2), policy="fast")
    model.set_scheduler(LayerScheduler().set_policy(layers=[7], policy="store"))
    with pytest.raises(ValueError, match=r"layer indices \[7\] out of range"):
        model(ids)
    model.set_scheduler(None)
    with pytest.raises(TypeError, match="ReversibleTransformer-like"):
        MemoryScheduler(model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LayerScheduler or a MemoryScheduler"):
        model.set_scheduler("store")


class HalfWrong(CostModel):
    """A cost model that predicts half the saved bytes, as a stale model of the blocks would."""

    def saved_bytes(self, policies):
        return super().saved_bytes(policies) // 2

    def peak_bytes(self, policies):
        static = self.parameter_bytes() + self.optimizer_bytes() + self.gradient_bytes()
        return static + (super().peak_bytes(policies) - static) // 2


def test_adaptive_corrects_a_wrong_prediction(monkeypatch):
    """Measured saved bytes twice the prediction: the scheduler doubles its activation estimate and the next
    forward recomputes more layers to stay in the budget."""
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=6, d_model=32, num_heads=2, vocab_size=64)
    ids = torch.randint(0, 64, (1, 128))
    true = CostModel(model.config, Workload(seq_len=128, autocast_dtype=None, device="cpu"))
    budget = (true.peak_bytes("reverse") + true.peak_bytes("store")) // 2
    import revnet_torch.scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "CostModel", HalfWrong)
    with AdaptiveScheduler(model=model, memory_budget=budget) as sched:
        model(ids)
        first = sched.plan
        model(ids)
        second = sched.plan
    assert sched.activation_scale == pytest.approx(2.0, rel=0.02)
    assert "activation scale 1.000 -> 2" in sched.adjustments[0]
    assert len(second.recomputed_layers) > len(first.recomputed_layers)
    assert true.peak_bytes(list(first.policies)) > budget >= true.peak_bytes(list(second.policies))


CONFIGS = [
    dict(d_model=32, num_heads=2, d_ff=48, activation="gelu", coupling="additive"),
    dict(d_model=48, num_heads=3, d_ff=80, activation="relu", coupling="affine"),
    dict(d_model=64, num_heads=4, d_ff=None, activation="geglu", coupling="affine"),
    dict(d_model=32, num_heads=4, d_ff=64, activation="swiglu", coupling="additive", ffn_chunk_size=16),
    dict(d_model=32, num_heads=2, d_ff=40, activation="silu", coupling="affine", norm="rmsnorm"),
]

@pytest.mark.parametrize("fields", CONFIGS)
@pytest.mark.parametrize("T", [40, 96])
@pytest.mark.parametrize("autocast", [False, True])
def test_predicted_saved_bytes_match_measured(fields, T, autocast):
    """CI's memory proof: the cost model's saved bytes against what autograd saves (within 5%; exact here)."""
    _, _, cases = saved_bytes_case(fields, T, autocast)
    for plan, predicted, measured in cases:
        assert abs(predicted - measured) <= 0.05 * measured, (plan, predicted, measured)


def test_rope_chunk_constant_matches_the_blocks():
    assert ROPE_CHUNK == blocks.ROPE_CHUNK


def test_calibrated_cost_uses_measured_seconds():
    cm = CostModel(ModelConfig(num_layers=4, d_model=32, num_heads=2), Workload(seq_len=64, device="cpu"))
    cal = CalibratedCost(cm, layer_seconds={"store": 1.0, "reverse": 1.5, "checkpoint": 1.6})
    head = cm.head_time() / cm.layer_time("store")
    assert cal.step_time(["store"] * 4) == pytest.approx(4 + head)
    assert cal.step_time(["reverse", "checkpoint", "store", "store"]) == pytest.approx(1.5 + 1.6 + 2 + head)
    partial = cal.step_time(["recompute_ffn"] + ["store"] * 3) - cal.step_time(["store"] * 4)
    assert 0 < partial < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CalibratedCost(cm, activation_scale=2.0).peak_bytes(["store"] * 4) > cm.peak_bytes(["store"] * 4)


@pytest.mark.parametrize("policy, block", [("recompute_ffn", "ffn"), ("recompute_attention", "attn")])
def test_block_recompute_is_real(tiny_model, policy, block):
    """A stored layer with one block checkpointed saves less and runs that block twice; the other once."""
    model, ids = tiny_model(num_layers=2)
    calls = {"attn": 0, "ffn": 0}
    hooks = [getattr(layer, name).block.norm.register_forward_hook(  # inside the block: seen by recomputes too
        lambda *a, _n=name: calls.__setitem__(_n, calls[_n] + 1)) for layer in model.layers for name in calls]
    params = list(model.parameters())
    saved = {}
    try:
        for p in ("store", policy):
            model.set_scheduler(LayerScheduler().set_policy(layers=range(2), policy=p))
            model.scheduler.measure = False
            for k in calls:
                calls[k] = 0
            with saved_tensor_bytes(exclude=params) as s:
                loss = model(ids).loss
            loss.backward()
            saved[p] = (s["bytes"], dict(calls))
            model.set_scheduler(None)
    finally:
        for h in hooks:
            h.remove()
    assert saved[policy][0] < saved["store"][0]
    other = "attn" if block == "ffn" else "ffn"
    assert saved["store"][1] == {"attn": 2, "ffn": 2}
    assert saved[policy][1][block] == 4 and saved[policy][1][other] == 2


def _plan_with_block_recomputes(model, ids):
    """A MemoryScheduler whose plan mixes policies (block recomputes included) under a tight budget."""
    cm = CostModel(model.config, Workload(batch=ids.shape[0], seq_len=ids.shape[1], param_dtype="float64",
                                          autocast_dtype=None, device="cpu"))
    budget = (cm.peak_bytes("store") + cm.peak_bytes("reverse")) // 2
    return MemoryScheduler(model=model, strategy="adaptive", recompute_granularity="block", memory_budget=budget)


@pytest.mark.parametrize("hooks", ["counting", "save_on_cpu"])
def test_callers_saved_tensor_hooks_are_not_shadowed(tiny_model, hooks):
    """A scheduled forward inside the caller's saved-tensor hooks: their pack hook sees the forward's saved
    tensors (the scheduler installs no hooks of its own over them) and loss and gradients are unchanged."""
    model, ids = tiny_model(num_layers=4)
    plain_loss, plain = grads_of(model, ids, "store")
    model.set_policy("reverse")
    sched = _plan_with_block_recomputes(model, ids)
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    caller = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooks == "counting"
              else torch.autograd.graph.save_on_cpu())
    if hooks == "save_on_cpu":  # count its pack calls too: wrap the hook save_on_cpu installs
        inner_pack = caller.pack_hook
        caller.pack_hook = lambda t: (pack(t), inner_pack(t))[1]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    with caller:
        with sched:
            loss = model(ids).loss
        loss.backward()
    assert len(set(sched.plan.policies)) > 1, sched.plan.policies  # a mixed plan, not a trivial one
    assert sum(n > 1 for n in packed) > 0  # the caller's hook saw the model's activations, not just a probe
    assert "not measured" in sched.history[-1].measure and sched.history[-1].measured_bytes is None
    assert sched.adjustments == []  # an unmeasured forward corrects nothing
    assert torch.equal(loss.detach(), plain_loss) or abs(loss.item() - plain_loss.item()) <= TOL
    assert_same_grads({n: p.grad for n, p in model.named_parameters()}, plain)
    with sched:  # without the caller's hooks the scheduler measures again
        model(ids).loss.backward()
    assert sched.history[-1].measure == "saved-tensor bytes"
    assert sched.history[-1].measured_bytes == sched.history[-1].predicted_bytes


def test_schedulers_never_patch_a_block(tiny_model):
    """Block recomputes are the engine's: the scheduler sets the plan as the model's policies and leaves every
    block's forward alone."""
    model, ids = tiny_model(num_layers=3)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(list(model.policies)))
    plan = ["recompute_attention", "recompute_ffn", "store"]
    ls = LayerScheduler()
    for i, p in enumerate(plan):
        ls.set_policy(layers=[i], policy=p)
    model.set_scheduler(ls)
    try:
        model(ids).loss.backward()
    finally:
        model.set_scheduler(None)
    assert seen == [plan]
    assert all("forward" not in layer.attn.block.__dict__ and "forward" not in layer.ffn.block.__dict__
               for layer in model.layers)
