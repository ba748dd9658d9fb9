"""Kernel tests run every Triton kernel on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module imports
triton or a ``*_triton`` module.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("kernels", max_examples=6, deadline=None, derandomize=True)
settings.load_profile("kernels")


@pytest.fixture(autouse=True)
def _clean_kernel_state(monkeypatch):
    """Each test starts with no forced implementation, no remembered kernel failure, and a fixed seed."""
    from revnet_kernels import registry

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset_failures()
    torch.manual_seed(0)
    yield
    registry.reset_failures()
