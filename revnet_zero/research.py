"""Research helpers (PyTorch): which model sizes and contexts fit a GPU, short scaling runs, attention
patterns. ``from revnet_zero.research import MemoryEfficientResearch``; see docs/research.md."""

from revnet_torch.research import (AttentionPatterns, MemoryEfficientResearch, PowerLawFit, ScalingResult,
                                   fit_power_law)

__all__ = ["AttentionPatterns", "MemoryEfficientResearch", "PowerLawFit", "ScalingResult", "fit_power_law"]
