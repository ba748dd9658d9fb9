"""The README's use cases (PyTorch): ``LongContextPretraining(model_size=..., context_length=...).run(dataset=...)``
and ``DocumentQA(base_model=..., max_document_length=...)`` with ``finetune`` and ``answer_question``."""

from revnet_torch.document_qa import DocumentQA
from revnet_torch.pretraining import LongContextPretraining

__all__ = ["DocumentQA", "LongContextPretraining"]
