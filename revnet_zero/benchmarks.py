"""Benchmarks against baselines run in the same process: ``BenchmarkSuite().run(models=..., ...)``."""

from revnet_torch.bench import BenchmarkSuite

__all__ = ["BenchmarkSuite"]
