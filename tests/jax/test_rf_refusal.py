"""A Rational-Fourier config is torch-only: the JAX model refuses it by name instead of building softmax."""

import pytest

import revnet_core
from revnet_core.errors import ConfigError


def test_an_rf_config_is_refused_by_name():
    with pytest.raises(ConfigError, match="attention_kind='rf' is built in the torch backend only, not in jax"):
        revnet_core.build("jax", num_layers=1, d_model=16, num_heads=2, attention_kind="rf")
