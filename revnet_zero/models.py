"""Complete models (PyTorch): ``ReversibleTransformer(num_layers=..., d_model=..., num_heads=..., ...)``."""

from revnet_core.config import ModelConfig
from revnet_torch.model import ModelOutput, ReversibleTransformer

__all__ = ["ModelConfig", "ModelOutput", "ReversibleTransformer"]
