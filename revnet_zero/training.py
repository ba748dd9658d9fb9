"""Training loops (PyTorch): ``LongContextTrainer(model=..., max_length=...).train(train_dataset=...)``,
``ReversibleAMPTrainer(model, fp16=True, loss_scale='dynamic')`` for loss-scaled fp16, and
``DistributedReversibleTrainer(model, sharding_strategy='ddp' | 'fsdp', cpu_offload=...)`` over processes."""

from revnet_core.errors import DistributedError, TrainingError
from revnet_torch.distributed_trainer import DistributedReversibleTrainer
from revnet_torch.trainer import LongContextTrainer, ReversibleAMPTrainer

__all__ = ["DistributedReversibleTrainer", "DistributedError", "LongContextTrainer", "ReversibleAMPTrainer",
           "TrainingError"]
