"""Experimental layers (PyTorch): ``HierarchicalReversibleAttention`` (local exact attention plus pooled levels,
docs/hierarchical_attention.md) and ``ContinuousDepthRevNet`` (a neural-ODE block, docs/continuous_depth.md).

Experimental means measured at small scale only so far; their interfaces may still change."""

from revnet_torch.hierarchical import HierarchicalReversibleAttention
from revnet_torch.ode import ContinuousDepthRevNet

__all__ = ["ContinuousDepthRevNet", "HierarchicalReversibleAttention"]
