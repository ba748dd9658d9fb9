import pytest

from revnet_core import ConfigError, ModelConfig


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=100, num_heads=16), "d_model=100 must be divisible by num_heads=16"),
    (dict(num_layers=0), "num_layers=0 must be a positive integer"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(activation="tanh"), "activation='tanh' is not one of"),
    (dict(policy="hope"), "policy='hope'"),
    (dict(d_model=24, num_heads=8), "head_dim"),
    (dict(stream_dtype="int8"), "stream_dtype"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_unknown_field_lists_known_fields():
    with pytest.raises(ConfigError, match="unknown config field.*num_layer.*known fields"):
        ModelConfig.from_kwargs(num_layer=3)


def test_defaults():
    cfg = ModelConfig(d_model=64, num_heads=4)
    assert cfg.ffn_dim == 256 and cfg.head_dim == 16
