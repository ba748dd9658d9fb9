"""Host helpers: launch arithmetic, the interpreter switch, compute dtypes."""

import torch

from revnet_kernels import utils


def test_launch_arithmetic():
    assert [utils.cdiv(a, 16) for a in (1, 16, 17)] == [1, 1, 2]
    assert [utils.next_power_of_2(n) for n in (1, 2, 3, 129)] == [1, 2, 4, 256]
    assert [utils.is_power_of_2(n) for n in (0, 1, 24, 64)] == [False, True, False, True]


def test_interpreter_switch_and_bf16_widening(monkeypatch):
    assert utils.interpreting()  # conftest sets TRITON_INTERPRET=1
    assert utils.upcast_dots(torch.bfloat16) and not utils.upcast_dots(torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not utils.interpreting() and not utils.upcast_dots(torch.bfloat16)


def test_dot_precision_is_ieee_for_every_dtype():
    assert {utils.dot_precision(d) for d in (torch.float32, torch.bfloat16, torch.float16)} == {"ieee"}


def test_compute_dtype_follows_autocast():
    x = torch.zeros(2)
    assert utils.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert utils.compute_dtype(x) == torch.bfloat16
