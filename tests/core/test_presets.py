"""Named model sizes: names, counts, and the error for anything else."""

import pytest

from revnet_core.errors import ConfigError
from revnet_core.presets import MODEL_SIZES, preset_config, size_name


@pytest.mark.parametrize("given,name", [("1.3B", "1.3B"), ("1.3b", "1.3B"), (125e6, "125M"), (350_000_000, "350M"),
                                        ("125m", "125M"), ("TINY", "tiny"), ("revnet-zero-base", "revnet-zero-base")])
def test_size_names(given, name):
    assert size_name(given) == name


def test_preset_config_shape_and_overrides():
    cfg = preset_config("1.3B", max_seq_len=262144, vocab_size=50257)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff) == (24, 2048, 16, 8192)
    assert cfg.max_seq_len == 262144 and cfg.vocab_size == 50257


def test_nominal_counts_match_the_shapes():
    # 12 L d^2 (+ embeddings at GPT-2's vocabulary) is within 25% of each nominal count
    for name, (layers, d, _) in MODEL_SIZES.items():
        if name == "1B":  # the 1.3B shape under a rounder name
            continue
        count = 12 * layers * d * d + 50257 * d
        nominal = float(name[:-1]) * (1e9 if name.endswith("B") else 1e6)
        assert abs(count - nominal) / nominal < 0.25, name


@pytest.mark.parametrize("bad", ["3B", "huge", 42, True, None, 1.0e12])
def test_unknown_size_is_named(bad):
    with pytest.raises(ConfigError, match="is not one of"):
        size_name(bad)
