"""Fixtures for the Hugging Face converter: tiny random GPT-2 and Llama models (no download)."""

import pytest
import torch

from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 61


def gpt2_config(layers=3, **kw):
    base = dict(n_layer=layers, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


def llama_config(layers=4, **kw):
    base = dict(num_hidden_layers=layers, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                eos_token_id=0, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


CLASSES = {
    "GPT2Model": (GPT2Model, gpt2_config),
    "GPT2LMHeadModel": (GPT2LMHeadModel, gpt2_config),
    "LlamaModel": (LlamaModel, llama_config),
    "LlamaForCausalLM": (LlamaForCausalLM, llama_config),
}


def trained_like(model, seed=0):
    """Every weight matrix N(0, 1/fan_in), biases and norm gains perturbed: not the init's structure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wpe" not in name:
                fan_in = p.shape[0] if "Conv1D" in type(model.get_submodule(name.rsplit(".", 1)[0])).__name__ \
                    else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / fan_in ** 0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture
def make():
    """make(name, dtype=torch.float64, layers=None, trained=True, **config) -> model (eval mode)."""

    def build(name, dtype=torch.float64, layers=None, trained=True, **kw):
        cls, cfg = CLASSES[name]
        torch.manual_seed(0)
        config = cfg(**({"layers": layers} if layers else {}), **kw)
        model = cls(config).to(dtype)
        if trained:
            trained_like(model)
        return model.eval()

    return build


def ids(batch=2, seq=10, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
