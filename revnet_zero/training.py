"""Training loops (PyTorch): ``LongContextTrainer(model=..., max_length=...).train(train_dataset=...)``, and
``ReversibleAMPTrainer(model, fp16=True, loss_scale='dynamic')`` for loss-scaled fp16."""

from revnet_core.errors import TrainingError
from revnet_torch.trainer import LongContextTrainer, ReversibleAMPTrainer

__all__ = ["LongContextTrainer", "ReversibleAMPTrainer", "TrainingError"]
