"""Debugging, validation and optimisation tools: gradient checks, stability, pitfalls, profiling, advice."""

from revnet_core.advisor import OptimizationAdvisor
from revnet_torch.diagnostics import CommonPitfalls, ReversibleGradientChecker, StabilityAnalyzer
from revnet_torch.profiler import DetailedMemoryProfiler

__all__ = ["CommonPitfalls", "DetailedMemoryProfiler", "OptimizationAdvisor", "ReversibleGradientChecker",
           "StabilityAnalyzer"]
