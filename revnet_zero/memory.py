"""Memory scheduling and profiling (PyTorch): schedulers pick each layer's policy from the cost model and a
budget at forward time; profilers measure what the forward keeps."""

from revnet_torch.memory import live_tensor_bytes, saved_tensor_bytes
from revnet_torch.profiler import MemoryProfiler
from revnet_torch.scheduler import AdaptiveScheduler, LayerScheduler, MemoryScheduler

__all__ = ["AdaptiveScheduler", "LayerScheduler", "MemoryProfiler", "MemoryScheduler", "live_tensor_bytes",
           "saved_tensor_bytes"]
