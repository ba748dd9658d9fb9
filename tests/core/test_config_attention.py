"""ModelConfig's attention family: attention_kind / attention_options, their errors, and legacy configs."""

import pytest

from revnet_core.config import LEGACY_DEFAULTS, RF_OPTIONS, ModelConfig, require_softmax
from revnet_core.errors import CheckpointIncompatibleError, ConfigError
from revnet_core.resume import check_resumable


def test_softmax_by_default_and_rf_options_filled_in():
    assert ModelConfig().attention_kind == "softmax" and ModelConfig().rf_options == {}
    cfg = ModelConfig(attention_kind="rf", attention_options={"kernel": "cauchy"})
    assert cfg.rf_options == {**RF_OPTIONS, "kernel": "cauchy"}
    assert ModelConfig.from_kwargs(**cfg.to_dict()) == cfg  # a saved dict round trips


@pytest.mark.parametrize("fields, message", [
    ({"attention_kind": "linear"}, r"attention_kind='linear' is not one of \['softmax', 'rf'\]"),
    ({"attention_options": {"kernel": "cauchy"}}, "options are for attention_kind=rf"),
    ({"attention_kind": "rf", "attention_options": {"features": 8}}, r"a dict of \['chunk_size', 'kernel'"),
    ({"attention_kind": "rf", "attention_options": {"kernel": "rbf"}}, r"kernel='rbf' must be one of \['gaussian'"),
    ({"attention_kind": "rf", "attention_options": {"num_fourier_features": 0}}, "must be a positive integer"),
    ({"attention_kind": "rf", "attention_options": {"chunk_size": True}}, "must be a positive integer"),
    ({"attention_kind": "rf", "attention_options": {"learnable_features": 1}}, "must be True or False"),
    ({"attention_kind": "rf", "attention_options": "gaussian"}, "a dict of"),
    ({"attention_kind": "rf", "attention_window": 8, "attention_options": {"kernel": "laplacian"}},
     "which only kernel=.gaussian. estimates"),
])
def test_bad_attention_settings_raise_named_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_a_windowed_gaussian_rf_config_is_valid():
    cfg = ModelConfig(attention_kind="rf", attention_window=16)
    assert cfg.rf_options["kernel"] == "gaussian" and cfg.attention_window == 16


def test_configs_saved_before_the_field_are_softmax_and_resume():
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("attention_kind", "attention_options")}
    assert ModelConfig.from_saved(old).attention_kind == "softmax"
    assert LEGACY_DEFAULTS["attention_kind"] == "softmax" and LEGACY_DEFAULTS["attention_options"] == {}
    now = {**old, "attention_kind": "softmax", "attention_options": {}}
    check_resumable(old, now, {}, {}, "old.pt")  # the absent fields held what the model used
    with pytest.raises(CheckpointIncompatibleError, match="attention_kind: checkpoint 'softmax', now 'rf'"):
        check_resumable(old, {**now, "attention_kind": "rf"}, {}, {}, "old.pt")


def test_require_softmax_names_the_backend():
    require_softmax(ModelConfig(), "jax")
    with pytest.raises(ConfigError, match="built in the torch backend only, not in jax"):
        require_softmax(ModelConfig(attention_kind="rf"), "jax")
