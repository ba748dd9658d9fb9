"""The README's "Converting Existing Models" example, as the user types it, on a tiny random GPT-2 (the
``from_pretrained`` download replaced by a config with gpt2's vocabulary and context, 2 layers)."""

import pytest
import torch
from transformers import GPT2Model

from .conftest import gpt2_config

EXAMPLE = """
from revnet_zero import convert_to_reversible
from transformers import GPT2Model

# Convert existing transformer to reversible
original_model = GPT2Model.from_pretrained('gpt2-large')
reversible_model = convert_to_reversible(
    original_model,
    coupling='additive',  # or 'affine'
    checkpoint_segments=4  # For gradient checkpointing fallback
)

# Verify conversion maintains outputs
test_input = torch.randint(0, 50257, (1, 1024))
with torch.no_grad():
    original_output = original_model(test_input).last_hidden_state
    reversible_output = reversible_model(test_input).last_hidden_state
    assert torch.allclose(original_output, reversible_output, atol=1e-5)
"""


def test_readme_conversion_example(monkeypatch):
    def tiny(name, *a, **k):
        assert name == "gpt2-large"
        torch.manual_seed(0)
        return GPT2Model(gpt2_config(layers=4, vocab_size=50257, n_positions=1024)).eval()

    monkeypatch.setattr(GPT2Model, "from_pretrained", staticmethod(tiny))
    scope = {"torch": torch}
    exec(compile(EXAMPLE, "README.md", "exec"), scope)
    assert scope["reversible_model"].revnet_conversion["checkpoint_segments"] == 4


def test_readme_affine_alternative_is_refused_with_the_reason(monkeypatch):
    """The example's comment offers 'affine': it is refused, saying why."""
    from revnet_core.errors import ConfigError
    from revnet_torch.hf import convert_to_reversible

    with pytest.raises(ConfigError, match="affine"):
        convert_to_reversible(GPT2Model(gpt2_config()), coupling="affine")
