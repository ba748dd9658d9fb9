"""The built-ins come through the pluggy hook, every loader resolves, and imports stay lazy."""

import subprocess
import sys

import revnet_core.registry
from revnet_kernels import registry
from revnet_kernels.plugin import BUILTIN_KERNELS
from revnet_kernels.registry import KernelImpl


def test_builtins_are_registered_through_the_hook():
    entries = [e for e in revnet_core.registry.registry().kernels if isinstance(e.obj, KernelImpl)]
    builtin = {e.obj for e in entries if e.plugin == "revnet_kernels"}
    assert builtin == set(BUILTIN_KERNELS)
    assert {e.name for e in entries} >= {"attention:triton", "attention:reference", "linear_cross_entropy:chunked"}


def test_every_operation_has_a_reference():
    for op in registry.operations():
        assert any(r.is_reference and r.impl == "reference" for r in registry.implementations(op)), op


def test_every_loader_resolves_to_a_function():
    for rec in BUILTIN_KERNELS:
        assert callable(rec.load()), rec.name


def test_triton_kernels_run_interpreted_in_these_tests():
    """TRITON_INTERPRET was set before the kernels were decorated (else they would need a GPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from revnet_kernels import activations_triton, attn_triton, cross_entropy_triton, norms_triton

    for kernel in (attn_triton._attn_fwd, attn_triton._attn_bwd_dkdv, attn_triton._attn_bwd_dq,
                   norms_triton._norm_fwd, norms_triton._norm_bwd, activations_triton._act_fwd,
                   activations_triton._act_bwd, cross_entropy_triton._ce_rows):
        assert isinstance(kernel, InterpretedFunction)


def test_import_and_selection_import_neither_torch_nor_triton():
    code = ("import sys, revnet_kernels; from revnet_kernels import registry; registry.describe('cuda', 'bfloat16'); "
            "print(sorted(m for m in ('torch', 'triton', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_describe_lists_every_operation():
    chosen = {r["op"]: r["impl"] for r in registry.describe("cuda", "bfloat16")}
    for op in ("activation", "layer_norm", "rms_norm"):
        assert chosen[op] == "torch", op  # no meta: plain kinds, where benchmarks/norm_act_bench.py ranks torch first
    assert chosen["linear_cross_entropy"] == "triton"
    assert chosen["attention"] == "sdpa"  # the seed model's plain causal attention: SDPA measured faster
    windowed = registry.describe("cuda", "bfloat16", {"attention": {"head_dim": 64, "window": 4096}})
    assert {r["op"]: r["impl"] for r in windowed}["attention"] == "triton"
