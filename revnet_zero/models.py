"""Complete models (PyTorch): ``ReversibleTransformer(num_layers=..., d_model=..., num_heads=..., ...)``, the causal
``ReversibleGPT`` and the bidirectional masked-LM ``ReversibleBERT`` (both with ``save_pretrained`` /
``from_pretrained``; docs/models.md)."""

from revnet_core.config import ModelConfig
from revnet_torch.bert import ReversibleBERT
from revnet_torch.gpt import ReversibleGPT
from revnet_torch.model import ModelOutput, ReversibleTransformer

__all__ = ["ModelConfig", "ModelOutput", "ReversibleBERT", "ReversibleGPT", "ReversibleTransformer"]
