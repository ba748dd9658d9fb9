"""The advisor's recommendations fit the stated memory by the cost model, apply to a model through its
duck-typed interface, and OptimalConfigs answers "what fits on my GPU" from a table of real devices."""

import pytest

from revnet_core import ModelConfig
from revnet_core.advisor import (GPUS_MIB, OptimalConfigs, OptimizationAdvisor, Recommendation, gpu_budget,
                                 usable_bytes)
from revnet_core.memory import Workload
from revnet_torch.cost import CostModel

SEED = ModelConfig(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257, max_seq_len=65536)


class FakeModel:
    """What the advisor may touch on a built model: config, policies, set_policy."""

    def __init__(self, config):
        self.config = config
        self.policies = [config.policy] * config.num_layers

    def set_policy(self, policies):
        self.policies = list(policies)


def test_gpu_table_has_the_devices_users_name():
    for name in ("A100_40GB", "A100_80GB", "H100", "H200", "L4", "RTX_4090"):
        assert name in GPUS_MIB
    assert 36 * 2**30 < gpu_budget("A100_40GB") < 40 * 2**30
    assert gpu_budget("h200") > gpu_budget("H100") > gpu_budget("A100_40GB") > gpu_budget("L4")
    assert usable_bytes(80 * 2**30) < 80 * 2**30
    with pytest.raises(ValueError, match="hardware='TPUv5'"):
        gpu_budget("TPUv5")


def test_analyze_recommends_a_plan_that_fits_the_stated_memory():
    advisor = OptimizationAdvisor(FakeModel(SEED), target_seq_length=131072, hardware="A100_40GB")
    recs = advisor.analyze()
    assert all(isinstance(r, Recommendation) and r.category and r.suggestion and r.expected_gain for r in recs)
    cats = {r.category: r for r in recs}
    assert "sequence_length" in cats and cats["sequence_length"].action == {"config": {"max_seq_len": 131072}}
    policy = cats["memory_policy"]
    cm = CostModel(SEED.replace(max_seq_len=131072), Workload(seq_len=131072))
    assert cm.peak_bytes(policy.action["policies"]) <= gpu_budget("A100_40GB")
    assert "store" in policy.action["policies"] and "reverse" in policy.action["policies"]
    assert "GiB" in policy.expected_gain and "x of storing every layer" in policy.expected_gain


def test_apply_recommendations_sets_policies_and_config():
    model = FakeModel(SEED)
    advisor = OptimizationAdvisor(model, target_seq_length=131072, memory_budget=36 * 2**30)
    optimized = advisor.apply_recommendations(model)
    assert optimized is model
    assert model.config.max_seq_len == 131072
    cm = CostModel(model.config, Workload(seq_len=131072))
    assert cm.peak_bytes(model.policies) <= 36 * 2**30
    assert model.policies != ["reverse"] * 24


def test_capacity_precision_attention_and_batch_recommendations():
    recs = OptimizationAdvisor(SEED, target_seq_length=8192, memory_budget=80 * 2**30, autocast_dtype=None).analyze()
    cats = {r.category: r for r in recs}
    assert cats["precision"].bytes_saved > 0 and cats["precision"].action is None
    assert "batch" in cats
    ref = SEED.replace(backend_options={"torch": {"attention": "reference"}}, max_seq_len=4096)
    cats = {r.category: r for r in OptimizationAdvisor(ref, target_seq_length=4096, memory_budget=80 * 2**30).analyze()}
    assert cats["attention"].bytes_saved > 0 and "score matrix" in cats["attention"].suggestion
    assert "backend_options" in cats["attention"].suggestion and cats["attention"].action is None
    tight = OptimizationAdvisor(SEED, target_seq_length=65536, memory_budget=4 * 2**30).analyze()
    assert tight[0].category == "capacity" and "does not fit" in tight[0].suggestion


def test_advisor_needs_a_budget_for_a_bare_config():
    with pytest.raises(ValueError, match="memory_budget"):
        OptimizationAdvisor(SEED, target_seq_length=4096)
    with pytest.raises(TypeError, match="ModelConfig"):
        OptimizationAdvisor(object(), target_seq_length=4096, memory_budget=1)


def test_optimal_config_fits_and_has_the_readme_fields():
    cfg = OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="L4",
                                    training_regime="pre-training")
    assert cfg.num_heads == 12 and cfg.d_model == 768
    assert cfg.num_layers == 12 and cfg.coupling_type in ("additive", "affine")
    assert cfg.recompute_granularity in ("layer", "attention", "block")
    assert cfg.fits and cfg.predicted_peak_bytes <= cfg.budget_bytes == gpu_budget("L4")
    mc = cfg.model_config()
    cm = CostModel(mc, Workload(batch=cfg.batch_size, seq_len=4096))
    assert cm.peak_bytes(cfg.policies) == cfg.predicted_peak_bytes
    assert cfg.batch_size * 4096 * cfg.gradient_accumulation_steps >= 0.5e6
    assert "fits" in cfg.summary() and cfg.policy


def test_regime_sets_tokens_per_step_and_oversized_models_are_reported():
    pre = OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="L4")
    fine = OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="L4",
                                     training_regime="fine-tuning")
    assert pre.gradient_accumulation_steps * pre.batch_size * 4096 >= 0.5e6
    assert fine.gradient_accumulation_steps * fine.batch_size * 4096 >= 64 * 4096
    assert fine.gradient_accumulation_steps < pre.gradient_accumulation_steps
    huge = OptimalConfigs.get_config(model_size="7B", context_length=131072, hardware="A100_40GB")
    assert not huge.fits and "does not fit" in huge.notes[0]
    with pytest.raises(ValueError, match="model_size='3B'"):
        OptimalConfigs.get_config(model_size="3B", context_length=4096, hardware="H100")
    with pytest.raises(ValueError, match="training_regime"):
        OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="H100", training_regime="rl")


# --- optimizer options (issue #21) ------------------------------------------------------------------------
from revnet_core.presets import preset_config
from revnet_torch.optim_cost import ACCUMULATING_LADDER, FILL, LADDER


def test_7b_at_128k_on_an_h200_is_advised_the_step_inside_the_backward():
    cfg = preset_config("7B", vocab_size=50257, max_seq_len=131072)
    advisor = OptimizationAdvisor(cfg, target_seq_length=131072, hardware="H200")
    rec = advisor.optimizer_recommendation()
    assert rec is not None and rec.category == "optimizer" and rec.action == {"optimizer": "adamw_in_backward"}
    assert "optimizer_in_backward=True" in rec.suggestion
    assert rec.bytes_saved > 15 * 2**30  # the fp32 gradients of 6.85B parameters, less one layer's


def test_a_tiny_model_keeps_plain_adamw():
    tiny = ModelConfig(num_layers=2, d_model=64, num_heads=2, vocab_size=256, max_seq_len=256)
    advisor = OptimizationAdvisor(tiny, target_seq_length=256, hardware="L4")
    assert advisor.optimizer_recommendation() is None
    assert "optimizer" not in [r.category for r in advisor.analyze()]
    assert OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="L4").optimizer == "adamw"


def test_the_ladder_takes_the_first_option_with_room():
    cm = CostModel(preset_config("7B", vocab_size=50257, max_seq_len=262144), Workload(seq_len=262144))
    budget = gpu_budget("H100")
    name, peaks, how = cm.choose_optimizer(["reverse"] * 32, budget)
    assert list(peaks) == list(LADDER)  # nothing before the last had room
    assert name == "adamw8bit_in_backward_bf16" and peaks[name] <= FILL * budget and "stochastic_rounding" in how
    assert all(peaks[n] > FILL * budget for n in LADDER[:-1])
    # With accumulation only the state can shrink (every gradient exists on the earlier micro-batches).
    name, peaks, how = cm.choose_optimizer(["reverse"] * 32, budget, accumulating=True)
    assert list(peaks) == list(ACCUMULATING_LADDER) and name == "adamw8bit" and "optimizer='adamw8bit'" in how


def test_optimal_config_with_accumulation_chooses_8bit_state():
    cfg = OptimalConfigs.get_config(model_size="760M", context_length=2048, hardware="T4", training_regime="fine-tuning")
    assert cfg.optimizer == "adamw8bit" and cfg.fits and cfg.gradient_accumulation_steps > 1
    assert any("optimizer='adamw8bit'" in n for n in cfg.notes) and "optimizer adamw8bit" in cfg.summary()
    plain = OptimalConfigs.get_config(model_size="760M", context_length=2048, hardware="T4",
                                      training_regime="fine-tuning", optimizer="adamw")
    assert plain.optimizer == "adamw" and plain.predicted_peak_bytes > cfg.predicted_peak_bytes
    with pytest.raises(ValueError, match="'sgd8' is not one of"):
        OptimalConfigs.get_config(model_size="125M", context_length=4096, hardware="L4", optimizer="sgd8")


def test_a_step_without_adamw_is_not_given_an_adamw_option():
    cm = CostModel(preset_config("7B", vocab_size=50257, max_seq_len=131072), Workload(seq_len=131072, optimizer="sgd"))
    name, peaks, _ = cm.choose_optimizer(["reverse"] * 32, gpu_budget("H100"))
    assert name == "adamw" and list(peaks) == ["adamw"]
