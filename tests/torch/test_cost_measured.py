"""The cost model's head-chunked attention (``attn_head_chunk``) against what torch saves and allocates on CPU:
the forward's saved bytes under every policy and per layer (exact), and a step's peak against the allocator
records (within 5%, as in test_profiler.py)."""

import pytest
import torch

import revnet_core
from revnet_core.memory import Workload
from revnet_torch.blocks import HEAD_CHUNK_TOKENS
from revnet_torch.cost import CostModel
from revnet_torch import blocks
from revnet_torch.blocks import AttentionBlock
from revnet_torch.profiler import MemoryProfiler

from .conftest import saved_bytes_case, step_peak
from .test_profiler import small

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_chunk_constant_matches_the_blocks():
    assert HEAD_CHUNK_TOKENS == blocks.HEAD_CHUNK_TOKENS


def head_counts(model, batch: int, T: int) -> list[int]:
    """Heads per chunk the model's attention runs over."""
    return [s.stop - s.start for s in model.layers[0].attn.block.head_chunks(batch, T)]


CONFIGS = [
    dict(d_model=48, num_heads=3, d_ff=80, attn_head_chunk=1),
    dict(d_model=64, num_heads=4, d_ff=96, attn_head_chunk=2, activation="relu", coupling="affine"),
    dict(d_model=64, num_heads=4, d_ff=64, attn_head_chunk=3, attention="reference", norm="rmsnorm"),
    dict(d_model=64, num_heads=4, d_ff=64, attn_head_chunk=1, use_flash_attention=False, activation="swiglu",
         ffn_chunk_size=16),
]


@pytest.mark.parametrize("fields", CONFIGS)
@pytest.mark.parametrize("T", [40, 96])
@pytest.mark.parametrize("autocast", [False, True])
def test_head_chunked_saved_bytes_match_measured(fields, T, autocast):
    """What autograd saves in the forward with head chunks, against the prediction: exact."""
    model, cm, cases = saved_bytes_case(fields, T, autocast)
    assert head_counts(model, 2, T) == cm.sizes.head_counts() and len(cm.sizes.head_counts()) > 1
    for plan, predicted, measured in cases:
        assert predicted == measured, plan


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_memory_profiler_layers_match_with_head_chunks(coupling):
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=3, d_model=48, num_heads=3, d_ff=96, vocab_size=128,
                              max_seq_len=1024, loss_chunk_size=64, coupling=coupling, attn_head_chunk=1)
    ids = torch.randint(0, 128, (2, 64))
    profile = MemoryProfiler(model).profile({"input_ids": ids})
    cm = CostModel(model.config, Workload(batch=2, seq_len=64, autocast_dtype=None, device="cpu"))
    assert cm.sizes.head_counts() == [1, 1, 1]
    for lp in profile.layers:
        for policy in ("store", "reverse", "checkpoint"):
            assert lp.saved_bytes[policy] == cm.layer_saved_bytes(policy), (lp.index, policy)
    assert profile.model_saved_bytes == profile.model_predicted_saved_bytes


REF = dict(attention="reference")


@pytest.mark.parametrize("policies, fields", [
    # the reversible F half through AttentionBlock.additive_vjp (additive coupling, no dropout)
    (["reverse"] * 3, dict(REF, d_model=48, num_heads=3, attn_head_chunk=1)),
    (["reverse"] * 3, dict(d_model=256, num_heads=4, d_ff=512, attn_head_chunk=2)),
    (["reverse", "store", "reverse"], dict(use_flash_attention=False, attn_head_chunk=3, norm="rmsnorm")),
    # the generic half over the chunked forward (affine coupling; dropout), and plain autograd through it
    (["reverse"] * 3, dict(REF, coupling="affine", attn_head_chunk=2)),
    (["reverse"] * 3, dict(REF, dropout=0.1, attn_head_chunk=2)),
    (["store"] * 3, dict(REF, attn_head_chunk=2, activation="geglu")),
    # the other output merge: the embedding looked up again, its gradient held from the top of backward
    (["reverse"] * 3, dict(d_model=256, num_heads=4, d_ff=512, attn_head_chunk=2, vocab_size=4096,
                           stream_merge="sum")),
    (["checkpoint", "store", "reverse"], dict(REF, d_model=48, num_heads=3, attn_head_chunk=1, coupling="affine")),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_head_chunked_step_peak_matches_the_allocator(monkeypatch, policies, fields, autocast):
    """Step 2 on CPU, every allocation recorded: the predicted peak above the start within 5%, as for the
    unchunked block (test_profiler.py). Here it lands within a few bytes (the head-chunked reverse backward
    included), dropout within 0.6% (as unchunked). The margin is for what the cost model leaves out: the
    CPU flash kernel's (SDPA) per-thread buffers, which scale with threads, not tokens, and weigh more next
    to one chunk's q, k, v than next to all heads' (4-7% of the peak at d_model 96-128 with bf16)."""
    model = small(**fields)
    model.set_policy(policies)
    T = 512
    ids = torch.randint(0, 128, (1, T))
    calls = []
    original = AttentionBlock.additive_vjp
    monkeypatch.setattr(AttentionBlock, "additive_vjp",
                        lambda self, *a: calls.append(self) or original(self, *a))
    predicted, measured, cm = step_peak(model, ids, autocast, before_measuring=calls.clear)
    assert head_counts(model, 1, T) == cm.sizes.head_counts() and len(cm.sizes.head_counts()) > 1
    fast = fields.get("coupling", "additive") == "additive" and not fields.get("dropout")
    assert len(calls) == (policies.count("reverse") if fast else 0)  # the path the cost model follows
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
