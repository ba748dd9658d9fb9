"""Selection per (operation, device kind, dtype, shape), forcing, plugins, and the one-warning fallback."""

import warnings

import pytest
import torch

import revnet_kernels
from revnet_core import UnknownNameError, hookimpl
from revnet_core.registry import register_plugin, unregister_plugin
from revnet_kernels import attn_triton, registry
from revnet_kernels.attn import reference_attention
from revnet_kernels.norms import reference_layer_norm
from revnet_kernels.registry import KernelFallbackWarning, KernelImpl, device_kind, select

ATTN = {"head_dim": 64, "window": None, "return_lse": False}


def broken_kernel(*args, **kwargs):
    raise RuntimeError("simulated launch failure: out of shared memory")


class KernelPlugin:
    """A plugin that registers the given records through the same hook as the built-ins."""

    def __init__(self, *records):
        self.records = records

    @hookimpl
    def register_kernels(self, register):
        for rec in self.records:
            register(rec)


@pytest.fixture
def plugin():
    names = []

    def add(*records, name="test-kernels"):
        names.append(register_plugin(KernelPlugin(*records), name=name))

    yield add
    for name in names:
        unregister_plugin(name)


@pytest.mark.parametrize("device,dtype,meta,want", [
    ("cuda", torch.bfloat16, ATTN, "sdpa"),  # measured faster (cuDNN) where it applies
    ("cuda", torch.bfloat16, ATTN | {"window": 256}, "triton"),
    ("rocm", torch.float16, ATTN | {"return_lse": True}, "triton"),
    ("cuda", torch.float64, ATTN | {"window": 8}, "reference"),  # no fp64 Triton kernel
    ("cuda", torch.bfloat16, ATTN | {"head_dim": 24, "window": 8}, "reference"),  # not a power of two
    ("cpu", torch.float32, ATTN, "sdpa"),
    ("cpu", torch.float32, ATTN | {"window": 8}, "reference"),
    ("tpu", torch.bfloat16, ATTN | {"return_lse": True}, "reference"),
])
def test_attention_selection(device, dtype, meta, want):
    assert select("attention", device, dtype, meta).impl == want


@pytest.mark.parametrize("op,meta,gpu,cpu", [
    ("layer_norm", {"hidden": 64}, "torch", "torch"),  # measured on an H200: torch's ops win at 64k rows
    ("rms_norm", {"hidden": 64}, "torch", "torch"),
    ("activation", {"kind": "gelu"}, "torch", "torch"),  # level with Triton's
    ("activation", {"kind": "swiglu"}, "triton", "torch"),  # the fused gate: 4x faster
    ("linear_cross_entropy", {}, "triton", "chunked"),
])
def test_selection_on_gpus_and_on_cpu(op, meta, gpu, cpu):
    assert select(op, "cuda", torch.bfloat16, meta).impl == gpu
    assert select(op, "cpu", torch.bfloat16, meta).impl == cpu


def test_device_kinds():
    assert device_kind(torch.device("cpu")) == device_kind(torch.zeros(1)) == "cpu"
    assert device_kind(torch.device("cuda", 0)) == "cuda"
    assert device_kind("tpu") == "tpu"

    class JaxLikeDevice:
        platform = "tpu"

    assert device_kind(JaxLikeDevice()) == "tpu"


def test_rocm_is_told_apart_from_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert device_kind(torch.device("cuda")) == "rocm"


def test_environment_variable_forces_the_reference(monkeypatch):
    monkeypatch.setenv("REVNET_KERNELS", "reference")
    for op in registry.operations():
        assert select(op, "cuda", torch.bfloat16, {"head_dim": 64, "hidden": 64}).impl == "reference"


def test_environment_variable_per_operation(monkeypatch):
    monkeypatch.setenv("REVNET_KERNELS", "attention=reference, rms_norm=triton")
    assert select("attention", "cuda", torch.bfloat16, ATTN).impl == "reference"
    assert select("rms_norm", "cpu", torch.float32, {"hidden": 8}).impl == "triton"  # forced: device unchecked
    assert select("layer_norm", "cuda", torch.float32, {"hidden": 8}).impl == "torch"  # not named: automatic


def test_function_argument_forces(monkeypatch):
    assert select("attention", "cuda", torch.bfloat16, ATTN, impl="reference").impl == "reference"
    x, w = torch.randn(3, 8), torch.randn(8)
    monkeypatch.setattr(registry, "_loaded", {})  # the loaded callables are cached per loader
    calls = []
    monkeypatch.setattr("revnet_kernels.norms.reference_layer_norm",
                        lambda *a: calls.append("reference") or reference_layer_norm(*a))
    revnet_kernels.layer_norm(x, w, impl="reference")
    assert calls == ["reference"]


def test_unknown_names_list_what_exists():
    with pytest.raises(UnknownNameError, match="unknown attention implementation 'fast'.*sdpa, triton, reference"):
        select("attention", "cpu", torch.float32, ATTN, impl="fast")
    with pytest.raises(UnknownNameError, match="unknown kernel operation 'conv'.*attention"):
        select("conv", "cpu", torch.float32)


def test_forced_implementation_must_accept_the_call():
    with pytest.raises(ValueError, match="'sdpa' does not support"):
        select("attention", "cpu", torch.float32, ATTN | {"window": 4}, impl="sdpa")


def test_plugin_kernel_is_selected_by_priority(plugin):
    fast = KernelImpl("layer_norm", "plugin-fast", "revnet_kernels.norms:reference_layer_norm",
                      devices=frozenset({"cpu"}), priority=100)
    plugin(fast)
    assert select("layer_norm", "cpu", torch.float32, {"hidden": 8}) == fast
    assert select("layer_norm", "cuda", torch.float32, {"hidden": 8}).impl == "torch"  # cpu only
    row = [r for r in registry.describe("cpu", "float32") if r["op"] == "layer_norm"][0]
    assert row["impl"] == "plugin-fast" and row["plugin"] == "test-kernels"


def test_unimportable_requirement_is_skipped(plugin):
    plugin(KernelImpl("rms_norm", "needs-missing", "revnet_kernels.norms:reference_rms_norm",
                      priority=100, requires=("a_module_that_is_not_installed",)))
    assert select("rms_norm", "cpu", torch.float32, {"hidden": 8}).impl == "torch"  # the next in rank


def test_failing_kernel_falls_back_with_exactly_one_warning(plugin):
    plugin(KernelImpl("layer_norm", "broken", "tests.kernels.test_registry:broken_kernel",
                      devices=frozenset({"cpu"}), priority=100))
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    with pytest.warns(KernelFallbackWarning, match="layer_norm kernel 'broken' failed on cpu.*shared memory") as rec:
        first = revnet_kernels.layer_norm(x, w, b)
        second = revnet_kernels.layer_norm(x, w, b)
    assert len([r for r in rec if issubclass(r.category, KernelFallbackWarning)]) == 1
    torch.testing.assert_close(first, reference_layer_norm(x, w, b))
    torch.testing.assert_close(second, first)
    assert ("layer_norm", "broken", "cpu") in registry.failures()


def test_unloadable_kernel_falls_back(plugin):
    plugin(KernelImpl("rms_norm", "missing", "revnet_kernels.no_such_module:fn", priority=100))
    with pytest.warns(KernelFallbackWarning, match="ModuleNotFoundError"):
        revnet_kernels.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_forced_failing_kernel_raises_instead(plugin):
    plugin(KernelImpl("layer_norm", "broken", "tests.kernels.test_registry:broken_kernel", priority=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        with pytest.raises(RuntimeError, match="simulated launch failure"):
            revnet_kernels.layer_norm(torch.randn(2, 8), torch.ones(8), impl="broken")


def test_failing_backward_recomputes_with_the_reference_once(plugin, monkeypatch):
    """The real (interpreted) Triton attention, auto-selected on CPU, whose backward kernel fails."""
    plugin(KernelImpl("attention", "triton-on-cpu", "revnet_kernels.attn_triton:triton_impl",
                      devices=frozenset({"cpu"}), priority=100))
    monkeypatch.setattr(attn_triton, "attention_backward", broken_kernel)
    q, k, v = (torch.randn(1, 2, 11, 16, requires_grad=True) for _ in range(3))
    with pytest.warns(KernelFallbackWarning, match="backward kernel 'triton-on-cpu'") as rec:
        o = revnet_kernels.attention(q, k, v, window=5)
        got = torch.autograd.grad(o.sum(), (q, k, v))
    assert len([r for r in rec if issubclass(r.category, KernelFallbackWarning)]) == 1
    ref = reference_attention(q, k, v, window=5)[0]
    torch.testing.assert_close(o, ref, rtol=2e-5, atol=2e-5)
    for g, want in zip(got, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, want, rtol=2e-5, atol=2e-5)
    assert select("attention", "cpu", torch.float32, ATTN | {"window": 5}).impl == "reference"


def test_forced_kernel_backward_failure_raises(monkeypatch):
    monkeypatch.setattr(attn_triton, "attention_backward", broken_kernel)
    q = torch.randn(1, 1, 5, 16, requires_grad=True)
    o = revnet_kernels.attention(q, q, q, impl="triton")
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        o.sum().backward()


def test_selection_is_cached_until_failures_or_plugins_change(plugin):
    """Blocks call an op per layer per step: the answer is remembered per (op, device kind, dtype, forced name,
    shape facts), and recomputed after a failure is recorded or forgotten and after plugins change."""
    asked = []
    counted = KernelImpl("layer_norm", "counted", "revnet_kernels.norms:reference_layer_norm",
                         devices=frozenset({"cpu"}), supports=lambda meta: asked.append(dict(meta)) or True,
                         priority=100)
    plugin(counted)
    for _ in range(3):
        assert select("layer_norm", "cpu", torch.float32, {"hidden": 8}) is counted
    assert asked == [{"hidden": 8}]
    select("layer_norm", "cpu", torch.float32, {"hidden": 16})
    select("layer_norm", "cpu", torch.bfloat16, {"hidden": 8})
    assert select("layer_norm", "cpu", torch.float32, {"hidden": 8}, impl="torch").impl == "torch"
    assert len(asked) == 3
    registry.reset_failures()
    select("layer_norm", "cpu", torch.float32, {"hidden": 8})
    assert len(asked) == 4
    faster = KernelImpl("layer_norm", "faster", "revnet_kernels.norms:reference_layer_norm", priority=200)
    plugin(faster, name="more-kernels")
    assert select("layer_norm", "cpu", torch.float32, {"hidden": 8}) is faster


def test_a_recorded_failure_deselects_at_once(plugin):
    rec = KernelImpl("rms_norm", "flaky", "revnet_kernels.norms:reference_rms_norm", priority=100)
    plugin(rec)
    assert select("rms_norm", "cpu", torch.float32, {"hidden": 8}) is rec
    with pytest.warns(KernelFallbackWarning):
        assert registry.backward_failed(rec, "cpu", RuntimeError("simulated"))
    assert select("rms_norm", "cpu", torch.float32, {"hidden": 8}).impl == "torch"


def test_unhashable_shape_facts_are_selected_uncached():
    assert select("layer_norm", "cpu", torch.float32, {"hidden": 8, "shape": [2, 8]}).impl == "torch"
