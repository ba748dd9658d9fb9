"""revnet_zero is a face, not a copy: every public name is the backend's very object, and imports stay lazy."""

import importlib
import subprocess
import sys

import pytest

import revnet_core
import revnet_zero

# (revnet_zero module, name) -> (implementing module, name). Every public name must be listed here.
EXPECTED = {
    ("revnet_zero", "ReversibleTransformer"): ("revnet_torch.model", "ReversibleTransformer"),
    ("revnet_zero", "MemoryScheduler"): ("revnet_torch.scheduler", "MemoryScheduler"),
    ("revnet_zero", "convert_to_reversible"): ("revnet_torch.hf.convert", "convert_to_reversible"),
    ("revnet_zero.layers", "ReversibleAttention"): ("revnet_torch.layers", "ReversibleAttention"),
    ("revnet_zero.layers", "ReversibleFFN"): ("revnet_torch.layers", "ReversibleFFN"),
    ("revnet_zero.layers", "ReversibleLayer"): ("revnet_torch.layers", "ReversibleLayer"),
    ("revnet_zero.layers", "ReversibleSequence"): ("revnet_torch.layers", "ReversibleSequence"),
    ("revnet_zero.layers", "BaseCoupling"): ("revnet_torch.layers", "PairCoupling"),
    ("revnet_zero.layers", "CouplingType"): ("revnet_core.couplings", "CouplingType"),
    ("revnet_zero.layers", "AdditiveCoupling"): ("revnet_core.couplings", "AdditiveCoupling"),
    ("revnet_zero.layers", "AffineCoupling"): ("revnet_core.couplings", "AffineCoupling"),
    ("revnet_zero.layers", "RationalFourierAttention"): ("revnet_torch.rf_attention", "RationalFourierAttention"),
    ("revnet_zero.models", "ReversibleTransformer"): ("revnet_torch.model", "ReversibleTransformer"),
    ("revnet_zero.models", "ModelOutput"): ("revnet_torch.model", "ModelOutput"),
    ("revnet_zero.models", "ModelConfig"): ("revnet_core.config", "ModelConfig"),
    ("revnet_zero.models", "ReversibleGPT"): ("revnet_torch.gpt", "ReversibleGPT"),
    ("revnet_zero.models", "ReversibleBERT"): ("revnet_torch.bert", "ReversibleBERT"),
    ("revnet_zero.memory", "MemoryScheduler"): ("revnet_torch.scheduler", "MemoryScheduler"),
    ("revnet_zero.memory", "AdaptiveScheduler"): ("revnet_torch.scheduler", "AdaptiveScheduler"),
    ("revnet_zero.memory", "LayerScheduler"): ("revnet_torch.scheduler", "LayerScheduler"),
    ("revnet_zero.memory", "MemoryProfiler"): ("revnet_torch.profiler", "MemoryProfiler"),
    ("revnet_zero.memory", "saved_tensor_bytes"): ("revnet_torch.memory", "saved_tensor_bytes"),
    ("revnet_zero.memory", "live_tensor_bytes"): ("revnet_torch.memory", "live_tensor_bytes"),
    ("revnet_zero.training", "LongContextTrainer"): ("revnet_torch.trainer", "LongContextTrainer"),
    ("revnet_zero.training", "TrainingError"): ("revnet_core.errors", "TrainingError"),
    ("revnet_zero.training", "ReversibleAMPTrainer"): ("revnet_torch.trainer", "ReversibleAMPTrainer"),
    ("revnet_zero.training", "DistributedReversibleTrainer"): ("revnet_torch.distributed_trainer",
                                                               "DistributedReversibleTrainer"),
    ("revnet_zero.training", "DistributedError"): ("revnet_core.errors", "DistributedError"),
    ("revnet_zero.utils", "ReversibleGradientChecker"): ("revnet_torch.diagnostics", "ReversibleGradientChecker"),
    ("revnet_zero.utils", "StabilityAnalyzer"): ("revnet_torch.diagnostics", "StabilityAnalyzer"),
    ("revnet_zero.utils", "CommonPitfalls"): ("revnet_torch.diagnostics", "CommonPitfalls"),
    ("revnet_zero.utils", "DetailedMemoryProfiler"): ("revnet_torch.profiler", "DetailedMemoryProfiler"),
    ("revnet_zero.utils", "OptimizationAdvisor"): ("revnet_core.advisor", "OptimizationAdvisor"),
    ("revnet_zero.configs", "OptimalConfigs"): ("revnet_core.advisor", "OptimalConfigs"),
    ("revnet_zero.benchmarks", "BenchmarkSuite"): ("revnet_torch.bench", "BenchmarkSuite"),
    ("revnet_zero.examples", "LongContextPretraining"): ("revnet_torch.pretraining", "LongContextPretraining"),
    ("revnet_zero.examples", "DocumentQA"): ("revnet_torch.document_qa", "DocumentQA"),
    ("revnet_zero.research", "MemoryEfficientResearch"): ("revnet_torch.research", "MemoryEfficientResearch"),
    ("revnet_zero.research", "ScalingResult"): ("revnet_torch.research", "ScalingResult"),
    ("revnet_zero.research", "AttentionPatterns"): ("revnet_torch.research", "AttentionPatterns"),
    ("revnet_zero.research", "PowerLawFit"): ("revnet_torch.research", "PowerLawFit"),
    ("revnet_zero.research", "fit_power_law"): ("revnet_torch.research", "fit_power_law"),
    ("revnet_zero.experimental", "ContinuousDepthRevNet"): ("revnet_torch.ode", "ContinuousDepthRevNet"),
    ("revnet_zero.experimental", "HierarchicalReversibleAttention"): ("revnet_torch.hierarchical",
                                                                      "HierarchicalReversibleAttention"),
    ("revnet_zero.jax", "ReversibleTransformerJAX"): ("revnet_jax.model", "ReversibleTransformerJAX"),
    ("revnet_zero.jax", "JAXMemoryScheduler"): ("revnet_jax.scheduler", "JAXMemoryScheduler"),
}
# Names the README uses for systems that are planned, not built: they must not exist as stubs.
PLANNED = []
JAX_FREE = [m for m in sorted({m for m, _ in EXPECTED}) if m != "revnet_zero.jax"] + ["revnet_zero.kernels"]


def public_names(module_name):
    return list(importlib.import_module(module_name).__all__)


@pytest.mark.parametrize("module_name", sorted({m for m, _ in EXPECTED} | {"revnet_zero.kernels"}))
def test_every_public_name_is_accounted_for(module_name):
    if module_name == "revnet_zero.kernels":
        import revnet_kernels

        assert public_names(module_name) == list(revnet_kernels.__all__)
        return
    listed = {n for m, n in EXPECTED if m == module_name}
    assert set(public_names(module_name)) == listed


@pytest.mark.parametrize("key", sorted(k for k in EXPECTED if k[0] != "revnet_zero.jax"), ids="{0[0]}.{0[1]}".format)
def test_public_name_is_the_backend_object(key):
    (module_name, name), (impl_module, impl_name) = key, EXPECTED[key]
    assert getattr(importlib.import_module(module_name), name) is getattr(importlib.import_module(impl_module),
                                                                          impl_name)


def test_kernels_are_the_kernel_package_objects():
    import revnet_kernels
    import revnet_zero.kernels as kernels

    for name in revnet_kernels.__all__:
        assert getattr(kernels, name) is getattr(revnet_kernels, name)


def test_build_makes_the_classes_revnet_zero_exports():
    from revnet_zero.layers import AffineCoupling, CouplingType

    model = revnet_core.build("torch", num_layers=1, d_model=16, num_heads=2, coupling=CouplingType.AFFINE)
    assert type(model) is revnet_zero.ReversibleTransformer
    assert type(revnet_core.resolve_coupling(model.config)) is AffineCoupling
    assert type(model.layers[0].attn.coupling) is AffineCoupling


def test_coupling_type_values_are_registered_coupling_names():
    from revnet_core.registry import get_coupling

    for member in revnet_zero.layers.CouplingType:
        assert get_coupling(member.value).name == member.value


@pytest.mark.parametrize("module_name,name", PLANNED)
def test_planned_names_are_not_stubbed(module_name, name):
    assert not hasattr(importlib.import_module(module_name), name)


def _imports(code):
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(sorted(m for m in ('torch', 'jax', "
                          "'triton') if m in sys.modules))"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_import_revnet_zero_imports_no_framework():
    assert _imports("import revnet_zero") == "[]"


def test_torch_submodules_never_import_jax():
    code = "import revnet_zero\n" + "".join(f"import {m}\n" for m in JAX_FREE)
    code += "".join(f"{m}.{n}\n" for m, n in EXPECTED if m in JAX_FREE)
    assert _imports(code) == "['torch']"


def test_revnet_core_imports_no_framework():
    assert _imports("import revnet_core; revnet_core.CouplingType; import revnet_core.advisor") == "[]"


def test_revnet_zero_jax_imports_jax_only_when_a_name_is_used():
    assert _imports("import revnet_zero.jax") == "[]"
    assert "jax" in _imports("import revnet_zero.jax as j; j.ReversibleTransformerJAX")
