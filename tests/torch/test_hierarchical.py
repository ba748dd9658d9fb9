"""Hierarchical reversible attention: the coverage rule, causality, exactness against plain attention, the
chunked kernel against a brute-force dense reference, reversibility, memory, named errors, the doc."""

import math
import re
from pathlib import Path

import pytest
import torch

from revnet_core.errors import ConfigError, InputError
from revnet_torch.blocks import AttentionBlock
from revnet_torch.hierarchical import (Hierarchy, HierarchicalReversibleAttention, hierarchical_attention)
from revnet_torch.layers import ReversibleAttention, ReversibleFFN, ReversibleLayer, ReversibleSequence

from .conftest import stack_grads

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def heads(seed, B=2, H=2, T=37, hd=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, hd, generator=g, dtype=dtype) for _ in range(3)]


def trained_like(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.shape[1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# --- the reference: the stated rule, written out per query, over an explicit (T, T') score matrix --------------
def reference_masks(T, W, ratios, n):
    """(exact (T, T) bool, [pooled_l (T, T // r_l) bool]) of the rule in the module docstring."""
    exact = torch.zeros(T, T, dtype=torch.bool)
    pooled = [torch.zeros(T, T // r, dtype=torch.bool) for r in ratios]
    for i in range(T):
        e = max(0, (i // W - 1) * W)
        exact[i, e:i + 1] = True
        for l, r in enumerate(ratios):
            start = max(0, math.floor((e - n * r) / ratios[l + 1]) * ratios[l + 1]) if l + 1 < len(ratios) else 0
            pooled[l][i, start // r:e // r] = True
            e = start
    return exact, pooled


def dense_reference(q, k, v, W, ratios, n):
    """Softmax over [every exact key, every pooled key of each level] with the rule's mask: (B, H, T, hd)."""
    T, hd = q.shape[-2], q.shape[-1]
    exact, pooled = reference_masks(T, W, ratios, n)
    keys, values, masks, bias = [k], [v], [exact], [torch.zeros(T, dtype=q.dtype)]
    for r, m in zip(ratios, pooled):
        P = T // r
        keys.append(k[..., :P * r, :].reshape(*k.shape[:-2], P, r, hd).mean(-2))
        values.append(v[..., :P * r, :].reshape(*v.shape[:-2], P, r, hd).mean(-2))
        masks.append(m)
        bias.append(torch.full((P,), math.log(r), dtype=q.dtype))
    K, V, M, b = torch.cat(keys, -2), torch.cat(values, -2), torch.cat(masks, -1), torch.cat(bias)
    s = (q @ K.transpose(-1, -2)) / math.sqrt(hd) + b  # (B, H, T, T + sum P_l): the explicit matrix
    return torch.softmax(s.masked_fill(~M, float("-inf")), -1) @ V


CASES = [  # (T, W, ratios, level_blocks, chunk_size)
    (37, 4, (2, 4), 2, 8), (53, 6, (2, 6, 12), 1, 12), (29, 8, (4,), 3, 100), (61, 4, (2, 4, 8), 2, 4),
    (45, 12, (3, 6), 2, 24), (7, 8, (2, 4), 2, 8)]


@pytest.mark.parametrize("T, W, ratios, n, chunk", CASES)
def test_every_past_token_is_covered_exactly_once(T, W, ratios, n, chunk):
    exact, pooled = reference_masks(T, W, ratios, n)
    count = exact.to(torch.int64)
    for r, m in zip(ratios, pooled):
        count[:, :m.shape[1] * r] += m.to(torch.int64).repeat_interleave(r, dim=1)
    assert torch.equal(count, torch.ones(T, T, dtype=torch.int64).tril())
    assert T < 2 * W or all(m.any() for m in pooled)  # every level is used by some query here
    # the module's own regions say the same: contiguous, disjoint, from 0 to the query's local block
    h = Hierarchy(W, ratios, n)
    regions = h.regions(torch.arange(-(-T // W)))
    for b in range(-(-T // W)):
        assert int(regions[0][0][b]) == max(0, (b - 1) * W) and int(regions[-1][0][b]) == 0
        for l in range(1, len(regions)):
            start, end = int(regions[l][0][b]), int(regions[l][1][b])
            assert end == int(regions[l - 1][0][b]) and 0 <= start <= end
            assert start % ratios[l - 1] == 0 and end % ratios[l - 1] == 0
            if l < len(ratios) and start > 0:  # a level below the coarsest holds n to n + r'/r - 1 blocks
                assert n <= (end - start) // ratios[l - 1] <= h.max_blocks(l)


@pytest.mark.parametrize("T, W, ratios, n, chunk", CASES)
def test_chunked_kernel_equals_the_dense_reference_with_gradients(T, W, ratios, n, chunk):
    q, k, v = (x.requires_grad_(True) for x in heads(T, T=T))
    h = Hierarchy(W, ratios, n)
    out = hierarchical_attention(q, k, v, h, chunk_size=chunk)
    ref = dense_reference(q, k, v, W, ratios, n)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_the_chunking_does_not_change_the_function():
    q, k, v = heads(3, T=70)
    h = Hierarchy(4, (2, 4, 8), 2)
    outs = [hierarchical_attention(q, k, v, h, chunk_size=c) for c in (1, 4, 12, 28, 1000)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-13)


# --- exactness where nothing is pooled ----------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 5, 11, 15])
def test_shorter_than_the_window_it_is_plain_causal_attention(T):
    q, k, v = heads(T, T=T)
    out = hierarchical_attention(q, k, v, Hierarchy(8, (2, 4), 2))  # T < 2W: one exact region, nothing pooled
    want = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                                       float("-inf")), -1) @ v
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_the_layer_below_the_window_equals_reversible_attention_with_the_same_weights():
    torch.manual_seed(0)
    hier = trained_like(HierarchicalReversibleAttention(16, 2, num_levels=2, compression_ratios=[2, 4],
                                                        local_window=8).double())
    plain = ReversibleAttention(16, 2, attention="reference").double()
    plain.block.load_state_dict(hier.block.state_dict())
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    torch.testing.assert_close(hier(x)[1], plain(x)[1], rtol=0, atol=1e-12)
    assert isinstance(plain.block, AttentionBlock)


@pytest.mark.parametrize("T, W", [(23, 4), (40, 8), (9, 3)])
def test_no_levels_is_block_local_windowed_attention(T, W):
    q, k, v = heads(T, T=T)
    out = hierarchical_attention(q, k, v, Hierarchy(W, (), 1), chunk_size=2 * W)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (j >= ((i // W - 1) * W).clamp_min(0))
    want = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


# --- causality of the whole layer ---------------------------------------------------------------------
@pytest.mark.parametrize("T", [19, 33, 47])
def test_no_output_depends_on_a_later_token(T):
    torch.manual_seed(T)
    layer = trained_like(HierarchicalReversibleAttention(16, 2, num_levels=3, compression_ratios=[2, 4, 8],
                                                         local_window=4, level_blocks=1, chunk_size=8).double())
    x = torch.randn(1, T, 16, dtype=torch.float64)
    _, y = layer(x)
    for i in (0, 5, T // 2, T - 2):
        x2 = x.clone()
        x2[:, i + 1:] = torch.randn(1, T - i - 1, 16, dtype=torch.float64) * 3
        _, y2 = layer(x2)
        torch.testing.assert_close(y2[:, :i + 1], y[:, :i + 1], rtol=0, atol=1e-14)
        assert not torch.allclose(y2[:, i + 1:], y[:, i + 1:])
    # and the backward agrees: d y_i / d x_j is exactly zero for every j > i
    xg = x.clone().requires_grad_(True)
    i = T // 2
    layer(xg)[1][:, i].sum().backward()
    assert torch.count_nonzero(xg.grad[:, i + 1:]) == 0 and torch.count_nonzero(xg.grad[:, :i + 1]) > 0


# --- reversibility ------------------------------------------------------------------------------------
def hier_stack(coupling, dropout=0.0, layers=3):
    torch.manual_seed(5)
    blocks = [ReversibleLayer(
        HierarchicalReversibleAttention(16, 2, num_levels=2, compression_ratios=[2, 4], local_window=4,
                                        coupling=coupling, level_blocks=2, chunk_size=8, dropout=dropout),
        ReversibleFFN(16, 24, coupling, dropout=dropout)) for _ in range(layers)]
    return trained_like(ReversibleSequence(blocks).double(), seed=9)


@pytest.mark.parametrize("coupling, dropout", [("additive", 0.0), ("affine", 0.0), ("additive", 0.1)])
def test_reversible_gradients_equal_plain_autograd_fp64(coupling, dropout):
    seq = hier_stack(coupling, dropout)
    seq.train()
    x = torch.randn(2, 27, 16, dtype=torch.float64)
    store = stack_grads(seq, x, "store")
    rev = stack_grads(seq, x, "reverse")
    assert store.keys() == rev.keys() and any("qkv" in n for n in store)
    for name in store:
        err = (store[name] - rev[name]).abs().max().item()
        assert err <= 1e-10 * max(1.0, store[name].abs().max().item()), f"{name}: {err:.3e}"
        assert store[name].abs().max() > 0, name


def test_the_half_and_the_layer_invert_fp64():
    torch.manual_seed(2)
    half = trained_like(HierarchicalReversibleAttention(16, 2, num_levels=2, compression_ratios=[2, 4],
                                                        local_window=4, level_blocks=2).double())
    x1, x2 = torch.randn(2, 2, 31, 16, dtype=torch.float64)
    h, y1 = half(x2, x1)  # y1 = x1 + F(x2)
    assert h is x2 and not torch.allclose(y1, x1)
    torch.testing.assert_close(half.inverse(h, y1), x1, rtol=0, atol=1e-12)
    layer = hier_stack("affine").layers[0]
    with torch.no_grad():
        z1, z2 = layer(x1, x2)
        r1, r2 = layer.inverse(z1, z2)
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-12)


def test_generation_through_the_decoder_equals_the_full_forward():
    """Cached decoding re-runs the block over its input so far: the logits are the full forward's."""
    import revnet_core
    from revnet_torch.generate import Decoder

    torch.manual_seed(4)
    model = revnet_core.build("torch", num_layers=2, d_model=16, num_heads=2, d_ff=24, vocab_size=29,
                              max_seq_len=32).double()
    for layer in model.layers:
        layer.attn = HierarchicalReversibleAttention(16, 2, num_levels=2, compression_ratios=[2, 4], local_window=4,
                                                     level_blocks=1, rotary=model.rotary).double()
    trained_like(model).eval()
    ids = torch.randint(0, 29, (2, 19))
    dec = Decoder(model, 2, 19)
    got = dec.feed(ids[:, :5])
    for t in range(5, 20):
        with torch.no_grad():
            want = model(ids[:, :t], return_logits=True, compute_loss=False).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        if t < 19:
            got = dec.feed(ids[:, t:t + 1])


# --- memory: no (T, T) matrix -------------------------------------------------------------------------
def test_the_forward_and_backward_never_hold_a_quadratic_buffer():
    from revnet_torch.memory import saved_tensor_bytes
    from revnet_torch.profiler import DetailedMemoryProfiler

    B, H, hd, W = 1, 2, 8, 64
    h = Hierarchy(W, (4, 16, 64), 4)
    saved = {}
    for T in (4096, 8192):
        q, k, v = (x.requires_grad_(True) for x in heads(0, B, H, T, hd, torch.float32))
        with DetailedMemoryProfiler() as prof:
            with saved_tensor_bytes() as s:
                out = hierarchical_attention(q, k, v, h, chunk_size=512)
            out.sum().backward()
        saved[T] = s["bytes"]
        peak = prof.generate_report().peak("cpu")[1]
        dense = B * H * T * T * 4  # one fp32 (T, T) score matrix per head
        assert saved[T] <= 5 * B * H * T * hd * 4 + B * H * T * 4  # q, k, v, out and lse: linear in T
        assert peak < dense / 20, f"T={T}: peak {peak} bytes vs one (T, T) matrix {dense}"
    assert saved[8192] == 2 * saved[4096]


# --- named errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(num_levels=2, compression_ratios=[4, 16, 64]), "one ratio per pooled level"),
    (dict(num_levels=2, compression_ratios=[16, 4]), "larger multiple"),
    (dict(num_levels=2, compression_ratios=[4, 6]), "larger multiple"),
    (dict(num_levels=1, compression_ratios=[1]), "integer >= 2"),
    (dict(num_levels=1, compression_ratios=[2.0]), "integer >= 2"),
    (dict(num_levels=-1), "num_levels"),
    (dict(local_window=6, compression_ratios=[4, 16, 64]), "multiple of compression_ratios"),
    (dict(local_window=0), "local_window"),
    (dict(level_blocks=0), "level_blocks"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(d_model=18), "divisible"),
    (dict(d_model=24, num_heads=8), "even head size"),
])
def test_bad_settings_raise_config_errors(kwargs, message):
    args = {"d_model": 16, "num_heads": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        HierarchicalReversibleAttention(**args)


def test_bad_inputs_raise_input_errors():
    layer = HierarchicalReversibleAttention(16, 2, num_levels=1, compression_ratios=[4])
    x = torch.randn(1, 10, 16)
    with pytest.raises(InputError, match="sequence_length=12 but hidden_states holds 10"):
        layer(x, sequence_length=12)
    with pytest.raises(InputError, match=r"\(batch, seq, 16\)"):
        layer(torch.randn(10, 16))
    with pytest.raises(InputError, match="other must be"):
        layer(x, torch.randn(1, 9, 16))
    with pytest.raises(InputError, match="share one shape"):
        hierarchical_attention(*heads(0, T=5)[:2], torch.randn(2, 2, 6, 4), Hierarchy(4, (), 1))
    h, y = layer(x, sequence_length=10)
    assert h is x and y.shape == x.shape


def test_the_readme_call_shrunk_for_cpu():
    layer = HierarchicalReversibleAttention(d_model=32, num_heads=4, num_levels=3, compression_ratios=[4, 16, 64])
    assert layer.hierarchy.window == 128 and layer.hierarchy.ratios == (4, 16, 64)
    inputs = torch.randn(1, 700, 32)
    hidden, out = layer(inputs, sequence_length=700)
    assert hidden is inputs and out.shape == inputs.shape and torch.isfinite(out).all()


def test_the_doc_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "hierarchical_attention.md").read_text()
    codes = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert codes
    for code in codes:
        exec(compile(code, "docs/hierarchical_attention.md", "exec"), {"__name__": "__doc_example__"})


def test_the_doc_benchmark_table_is_the_committed_result():
    """docs/hierarchical_attention.md's table renders from docs/benchmarks/hierarchical/cpu.json."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("hier_bench", ROOT / "benchmarks" / "hierarchical_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = json.loads((ROOT / "docs" / "benchmarks" / "hierarchical" / "cpu.json").read_text())
    assert result["command"].startswith("python benchmarks/hierarchical_attention.py --device cpu")
    assert bench.table(result) in (ROOT / "docs" / "hierarchical_attention.md").read_text()
    rows = {(r["impl"], r["seq_len"]): r for r in result["rows"]}
    assert all(r["saved_bytes"] < r["dense_scores_bytes"] / 50 for r in rows.values() if r["seq_len"] >= 8192)
