"""Recommended configurations: ``OptimalConfigs.get_config(model_size=..., context_length=..., hardware=...)``
from the cost model and a table of real GPUs."""

from revnet_core.advisor import OptimalConfigs

__all__ = ["OptimalConfigs"]
