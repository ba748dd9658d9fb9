"""The numba backend's section of ``ModelConfig.backend_options``: how it runs, not architecture.

Imports no numba, so a config is checked (and the core's messages name these options) before numba loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from revnet_core.config import ModelConfig, backend_section
from revnet_core.errors import BackendFeatureError, ConfigError

BACKEND = "numba"


@dataclass(frozen=True)
class NumbaOptions:
    # numba's prange threads (attention over (batch, head), norms and activations over rows); 0 leaves
    # numba's default, NUMBA_NUM_THREADS (all cores unless set).
    threads: int = 0
    attn_block: int = 256  # query and key rows per attention tile (the online softmax walks key tiles)
    # BLAS threads (numpy's, for the blocks' matmuls), set process-wide when a model is built; 0 leaves them.
    # 1 by default: BLAS workers spinning between calls take the cores from numba's threads (a step at 4096
    # tokens on 2 cores: 5.6 s with 1, 11.9 s with 2).
    blas_threads: int = 1
    # The blocks' big matmuls split over numba's threads, one single-threaded gemm each (``revnet_numba.matmul``);
    # False: numpy's ``@`` on its own BLAS threads (``blas_threads``).
    matmul_split: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.matmul_split, bool):
            raise ConfigError(f"matmul_split={self.matmul_split!r} must be True or False")
        for name in ("threads", "attn_block", "blas_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "attn_block"):
                raise ConfigError(f"{name}={value!r} must be a {'positive' if name == 'attn_block' else 'non-negative'} "
                                  "integer")


def options(cfg: ModelConfig) -> NumbaOptions:
    """The validated numba section of ``cfg`` (defaults for what it leaves out). Every numba model asks for it
    when it is built, so a config this backend cannot run stops here: bidirectional attention (causal=False)."""
    if not cfg.causal:
        raise BackendFeatureError("causal=False (bidirectional attention) is not built in the numba backend; the "
                                  "torch backend has it (revnet_torch.bert.ReversibleBERT, or backend='torch')")
    return backend_section(cfg, BACKEND, NumbaOptions)
