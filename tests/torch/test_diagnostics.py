"""StabilityAnalyzer's whole-stack numbers: the drift of the rebuilt layer-0 input and the gradient gap."""

import torch

from revnet_torch import engine
from revnet_torch.diagnostics import StabilityAnalyzer

from .test_drift import trained_like


def analyze(model, autocast, exact="auto"):
    with engine.exact_streams(exact), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return StabilityAnalyzer(model, seq_len=32).analyze(num_forward_passes=1, check_gradient_norm=False)


def test_whole_stack_drift_outgrows_each_layers_error():
    """fp32, 24 trained-like layers: the stack's drift is far above any one layer's reconstruction error
    (each error is amplified by the layers below), and the report says so."""
    report = analyze(trained_like(24), autocast=False)
    assert report.stack_drift > 10 * report.max_reconstruction_error > 0
    assert 0 < report.gradient_gap < 1e-3
    assert "whole stack" in report.summary()


def test_bf16_gap_and_its_fix():
    """bf16 autocast: float streams drift by more than a bf16 rounding and the gradients lose percents;
    exact streams (the default under autocast) rebuild bit for bit."""
    model = trained_like(24)
    drifting = analyze(model, autocast=True, exact=False)
    assert drifting.stack_drift > 1e-2 and drifting.gradient_gap > 1e-3
    exact = analyze(model, autocast=True)
    assert exact.stack_drift == 0.0 and exact.gradient_gap < 1e-6
    assert model.policies == ["reverse"] * 24  # put back
