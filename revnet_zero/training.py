"""Training loops (PyTorch): ``LongContextTrainer(model=..., max_length=...).train(train_dataset=...)``."""

from revnet_torch.trainer import LongContextTrainer, TrainingError

__all__ = ["LongContextTrainer", "TrainingError"]
