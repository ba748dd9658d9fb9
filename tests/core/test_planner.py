"""The planner returns the fastest plan under the budget: checked against trying every plan."""

import itertools

import pytest

from revnet_core import ModelConfig
from revnet_core.memory import Workload
from revnet_torch.cost import CostModel
from revnet_core.planner import layer_options, plan_layers

CFG = ModelConfig(num_layers=5, d_model=64, num_heads=4, d_ff=128, vocab_size=128, max_seq_len=4096)


def model(T=512, **fields):
    return CostModel(CFG.replace(**fields), Workload(seq_len=T, device="cpu", autocast_dtype=None))


def plan_exhaustive(model, num_layers, budget, granularity="layer"):
    """The fastest plan under ``budget`` by trying every combination: the oracle the planner is held to."""
    best = None
    for combo in itertools.product(*[layer_options(granularity)] * num_layers):
        if model.peak_bytes(list(combo)) > budget:
            continue
        t = model.step_time(list(combo))
        if best is None or t < best[0] - 1e-9 * abs(best[0]):
            best = (t, combo)
    return None if best is None else best[1]


def budgets(cm, n=7):
    lo, hi = cm.peak_bytes("reverse"), cm.peak_bytes("store")
    return [int(lo + (hi - lo) * k / (n - 1)) for k in range(n)]


@pytest.mark.parametrize("granularity", ["layer", "attention"])
@pytest.mark.parametrize("T", [256, 1024])
def test_fastest_plan_under_budget_equals_exhaustive(granularity, T):
    """Layers are equal here, so greedy top-down placement is exact (proof in the planner's docstring)."""
    cm = model(T)
    for b in budgets(cm):
        plan = plan_layers(cm, 5, b, granularity=granularity)
        best = plan_exhaustive(cm, 5, b, granularity=granularity)
        assert plan.fits and plan.peak_bytes <= b
        assert plan.step_time == pytest.approx(cm.step_time(best), rel=1e-12), (b, plan.policies, best)


def test_block_granularity_exact_and_never_slower_than_layer():
    cm = model(1024)
    for b in budgets(cm):
        block = plan_layers(cm, 5, b, granularity="block")
        layer = plan_layers(cm, 5, b, granularity="layer")
        best = plan_exhaustive(cm, 5, b, granularity="block")
        assert block.fits
        assert block.step_time <= layer.step_time * (1 + 1e-12)
        assert block.step_time == pytest.approx(cm.step_time(best), rel=1e-12)


def test_greedy_fallback_is_close_on_a_deep_stack(monkeypatch):
    """Past MAX_ENUMERATED splits the planner upgrades greedily: still feasible and near the exact answer."""
    import revnet_core.planner as planner

    cm = model(1024)
    exact = [plan_layers(cm, 5, b, granularity="block") for b in budgets(cm)]
    monkeypatch.setattr(planner, "MAX_ENUMERATED", 0)
    for b, ex in zip(budgets(cm), exact):
        greedy = plan_layers(cm, 5, b, granularity="block")
        assert greedy.fits
        assert greedy.step_time <= ex.step_time * 1.05


def test_stored_layers_go_on_top():
    cm = model(1024)
    plan = plan_layers(cm, 5, budgets(cm)[3])
    assert plan.policies == tuple(sorted(plan.policies, key=lambda p: p == "store"))  # reverse... then store
    assert 0 < plan.policies.count("store") < 5
    assert plan.recomputed_layers == [i for i, p in enumerate(plan.policies) if p == "reverse"]


def test_strategies():
    cm = model(1024)
    lo, hi = cm.peak_bytes("reverse"), cm.peak_bytes("store")
    aggressive = plan_layers(cm, 5, None, strategy="aggressive")
    assert aggressive.policies == ("reverse",) * 5 and aggressive.fits
    balanced = plan_layers(cm, 5, None, strategy="balanced")
    assert balanced.peak_bytes <= (lo + hi) // 2 and "store" in balanced.policies and "reverse" in balanced.policies
    roomy = plan_layers(cm, 5, hi, strategy="adaptive")
    assert roomy.policies == ("store",) * 5 and roomy.relative_time == 1.0
    capped = plan_layers(cm, 5, lo + (hi - lo) // 10, strategy="balanced")
    assert capped.peak_bytes <= lo + (hi - lo) // 10


def test_budget_below_the_floor_is_reported_not_hidden():
    cm = model(1024)
    plan = plan_layers(cm, 5, cm.peak_bytes("reverse") - 1)
    assert not plan.fits and plan.policies == ("reverse",) * 5
    assert "least-memory plan exceeds the budget" in plan.notes[0]
    assert "does NOT fit" in plan.summary()


def test_non_invertible_layers_checkpoint_and_fixed_layers_stay():
    cm = model(1024)
    inv = [True, False, True, True, True]
    plan = plan_layers(cm, 5, None, strategy="aggressive", invertible=inv)
    assert plan.policies[1] == "checkpoint" and plan.policies.count("reverse") == 4
    assert layer_options("attention", invertible=False) == ("store", "recompute_attention", "checkpoint")
    fixed = plan_layers(cm, 5, budgets(cm)[4], fixed={4: "reverse", 0: "store"})
    assert fixed.policies[4] == "reverse" and fixed.policies[0] == "store"
    best = min((p for p in [fixed.policies]), key=cm.step_time)
    assert cm.peak_bytes(list(best)) <= budgets(cm)[4]


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="fast"), "strategy='fast'"), (dict(granularity="op"), "recompute_granularity='op'"),
    (dict(budget=None), "needs a memory budget"), (dict(budget=-5), "positive"),
])
def test_errors(kw, match):
    args = dict(budget=10**9, strategy="adaptive", granularity="layer")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        plan_layers(model(), 5, args.pop("budget"), **args)
