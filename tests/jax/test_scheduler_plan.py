"""JAXMemoryScheduler(rematerialization_policy="auto"): the core planner's choice under a memory budget,
priced by XLA's own buffer plans (XLACost), checked against XLA's exact plan of the chosen step."""

import pytest

import revnet_core
from revnet_core.errors import ConfigError
from revnet_core.planner import plan_layers
from revnet_jax import JAXMemoryScheduler
from revnet_jax.scheduler import step_memory, xla_cost

SHAPE = (1, 64)
CFG = dict(num_layers=4, d_model=16, num_heads=2, d_ff=32, vocab_size=37, max_seq_len=64)


@pytest.fixture(scope="module")
def priced():
    model = revnet_core.build("jax", **CFG)  # float32
    cost = xla_cost(model, SHAPE)  # the one the scheduler asks for below: probed once

    seen = {}

    def exact(policies):  # XLA's plan of the whole step, compiled once per plan
        key = tuple(policies)
        if key not in seen:
            mem = step_memory(model.replace(policies=policies), SHAPE)
            seen[key] = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"] + cost.optimizer_bytes
        return seen[key]

    return model, cost, exact


def test_uniform_plans_are_priced_as_xla_plans_them(priced):
    model, cost, exact = priced
    for policy in ("reverse", "store"):
        plan = [policy] * 4
        assert abs(cost.peak_bytes(plan) - exact(plan)) <= 0.01 * exact(plan), policy
    assert cost.peak_bytes(["store"] * 4) > cost.peak_bytes(["reverse"] * 4)
    assert cost.step_time(["reverse"] * 4) > cost.step_time(["store"] * 4)  # the recompute's FLOPs


def test_auto_takes_the_planners_plan_and_it_fits(priced):
    model, cost, exact = priced
    low, high = exact(["reverse"] * 4), exact(["store"] * 4)
    budget = (low + high) // 2
    scheduled = JAXMemoryScheduler(rematerialization_policy="auto", memory_budget=budget).schedule(model, SHAPE)
    chosen = scheduled.plan.policies
    assert chosen == plan_layers(cost, 4, budget).policies  # the core planner's choice, as torch's scheduler
    assert set(chosen) == {"reverse", "store"} and chosen[-1] == "store"  # stored layers on top
    assert scheduled.compiled_peak <= budget and scheduled.compiled_peak == exact(list(chosen))
    assert scheduled.model.policies == chosen
    tight = JAXMemoryScheduler(rematerialization_policy="auto", memory_budget=low // 2).schedule(model, SHAPE)
    assert tight.plan.policies == ("reverse",) * 4 and not tight.plan.fits


def test_refusals_name_the_fix():
    model = revnet_core.build("jax", **CFG)
    with pytest.raises(ConfigError, match="input_shape"):
        JAXMemoryScheduler(rematerialization_policy="auto", memory_budget=10**9).schedule(model)
    with pytest.raises(ConfigError, match="needs rematerialization_policy='auto'"):
        JAXMemoryScheduler(memory_budget=10**9)
    with pytest.raises(ConfigError, match="states no memory size"):
        JAXMemoryScheduler(rematerialization_policy="auto").schedule(model, SHAPE)  # CPU, no budget
    with pytest.raises(ConfigError, match="whole-layer policies only"):
        JAXMemoryScheduler(rematerialization_policy="auto", recompute_granularity="block")
