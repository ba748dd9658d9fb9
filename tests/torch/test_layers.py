"""ReversibleSequence: a policy name it does not know is refused, not run as another policy."""

import pytest

from revnet_core import ConfigError
from revnet_core.config import ModelConfig
from revnet_torch.blocks import Rotary
from revnet_torch.layers import ReversibleLayer, ReversibleSequence


def layers(n):
    config = ModelConfig(num_layers=n, d_model=16, num_heads=2, vocab_size=32, max_seq_len=16)
    return [ReversibleLayer.from_config(config, Rotary(config.head_dim, config.rope_base)) for _ in range(n)]


def test_a_policy_typo_raises():
    with pytest.raises(ConfigError, match=r"policy='revers' is not one of \['store'"):
        ReversibleSequence(layers(4), policies=["revers"] * 4)


def test_policies_must_match_the_layers():
    with pytest.raises(ConfigError, match="got 3 policies for 4 layers"):
        ReversibleSequence(layers(4), policies=["reverse"] * 3)
    assert ReversibleSequence(layers(2)).policies == ["reverse", "reverse"]
    assert ReversibleSequence(layers(2), policies="store").policies == ["store", "store"]
