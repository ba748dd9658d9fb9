"""The validation tools beyond the README's calls: they leave the model alone, and each pitfall rule fires
on its own case and stays quiet on a healthy setup."""

import pytest
import torch
from torch import nn

from revnet_zero import ReversibleTransformer
from revnet_zero.layers import AffineCoupling, ReversibleAttention, ReversibleFFN, ReversibleLayer, ReversibleSequence
from revnet_zero.utils import CommonPitfalls, ReversibleGradientChecker, StabilityAnalyzer


def tiny(**fields):
    torch.manual_seed(0)
    return ReversibleTransformer(**{"num_layers": 2, "d_model": 16, "num_heads": 2, "max_seq_len": 64, **fields})


def test_checker_leaves_the_model_and_rng_untouched():
    model = tiny(dropout=0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    results = ReversibleGradientChecker().check_model(model, input_shape=(1, 8), tolerance=1e-8)
    assert results == {"layers.0": True, "layers.1": True}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_checker_on_affine_layers_and_bad_shapes():
    layers = [ReversibleLayer(ReversibleAttention(16, 2, coupling="affine"),
                              ReversibleFFN(16, 32, coupling_fn=AffineCoupling(scale_init=0.5))) for _ in range(2)]
    checker = ReversibleGradientChecker()
    assert all(checker.check_model(ReversibleSequence(layers), input_shape=(2, 6, 16), tolerance=1e-10).values())
    assert max(checker.last_errors.values()) < 1e-12
    with pytest.raises(ValueError, match="no embedding"):
        checker.check_model(ReversibleSequence(layers), input_shape=(2, 6))
    with pytest.raises(ValueError, match="must be"):
        checker.check_model(tiny(), input_shape=(2,))
    with pytest.raises(TypeError, match="no reversible layers"):
        checker.check_model(nn.Linear(4, 4), input_shape=(1, 2, 4))


def test_analyzer_flags_nonfinite_streams():
    model = tiny()
    with torch.no_grad():
        model.layers[1].ffn.block.down.weight.fill_(float("nan"))
    report = StabilityAnalyzer(model, seq_len=8).analyze(num_forward_passes=1)
    assert report.nonfinite
    assert "NON-FINITE" in report.summary()


def test_analyzer_without_gradients():
    report = StabilityAnalyzer(tiny(), seq_len=8).analyze(num_forward_passes=2, check_gradient_norm=False)
    assert report.grad_norms == [] and report.max_grad_norm is None and len(report.activation_stats) == 2


HEALTHY = {"seq_len": 64, "batch_size": 1, "lr": 3e-4, "max_grad_norm": 1.0, "memory_budget": 2**34}


@pytest.mark.parametrize("change,model_fields,expected", [
    ({}, {}, set()),
    ({}, {"stream_dtype": "bfloat16"}, {"bf16_streams"}),
    ({"precision": "fp16"}, {}, {"fp16_autocast"}),
    ({"fp16": True}, {}, {"fp16_autocast"}),
    ({"max_length": 128, "seq_len": None}, {}, {"sequence_past_max_seq_len"}),
    ({"gradient_clip": 0, "max_grad_norm": None}, {}, {"no_gradient_clipping"}),
    ({"learning_rate": 5e-3, "lr": None}, {}, {"lr_too_high_for_depth"}),
    ({"memory_budget": 2**10}, {}, {"budget_below_floor"}),
    ({}, {"policy": "store"}, {"every_layer_stored"}),
])
def test_each_pitfall_alone(change, model_fields, expected):
    config = {k: v for k, v in {**HEALTHY, **change}.items() if v is not None}
    issues = CommonPitfalls().check(tiny(**model_fields), config)
    assert {i.name for i in issues} == expected
    assert all(i.severity in ("error", "warning") and i.description and i.solution for i in issues)


def test_lr_limit_falls_with_depth():
    config = {"lr": 1.5e-3}
    assert CommonPitfalls().check(tiny(num_layers=12), config) == []
    assert [i.name for i in CommonPitfalls().check(tiny(num_layers=48), config)] == ["lr_too_high_for_depth"]
