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


def test_backend_options_are_a_section_per_backend_checked_by_its_options_class():
    """The core checks only the shape of ``backend_options``; a backend's dataclass checks its section."""
    from dataclasses import dataclass

    from revnet_core.config import backend_section, model_fields, with_backend_options

    @dataclass(frozen=True)
    class Opts:
        kernel: str = "a"

        def __post_init__(self):
            if self.kernel not in ("a", "b"):
                raise ConfigError(f"kernel={self.kernel!r} is not one of ['a', 'b']")

    with pytest.raises(ConfigError, match="must map backend names to dicts"):
        ModelConfig(backend_options={"toy": ["kernel"]})
    cfg = ModelConfig(backend_options={"toy": {"kernel": "b"}, "other": {"anything": 1}})
    assert backend_section(cfg, "toy", Opts) == Opts("b")
    assert backend_section(ModelConfig(), "toy", Opts) == Opts()  # no section: the defaults
    with pytest.raises(ConfigError, match=r"unknown toy backend option\(s\) \['kernal'\]; known: \['kernel'\]"):
        backend_section(ModelConfig(backend_options={"toy": {"kernal": "b"}}), "toy", Opts)
    with pytest.raises(ConfigError, match="kernel='c'"):
        with_backend_options(cfg, "toy", Opts, kernel="c")
    built = model_fields(None, {"num_layers": 2, "kernel": "b"}, "toy", Opts)
    assert built.num_layers == 2 and built.backend_options == {"toy": {"kernel": "b"}}
    kept = model_fields(cfg, {"num_layers": 3}, "toy", Opts)  # another backend's section survives
    assert kept.backend_options["other"] == {"anything": 1} and kept.num_layers == 3


def test_a_backend_option_passed_as_a_field_names_its_backend():
    with pytest.raises(ConfigError, match="loss_kernel is an option of the torch backend: "
                                          r"backend_options=\{'torch': \{'loss_kernel': \.\.\.\}\}"):
        ModelConfig.from_kwargs(loss_kernel="fused")


def test_backend_options_modules_import_no_framework():
    import subprocess
    import sys

    code = ("import sys, revnet_torch.options, revnet_jax.options, revnet_core.registry as r; r.option_names(); "
            "assert not {'torch', 'jax', 'triton', 'numba'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["init_std", "rope_base", "norm_eps"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1.0", True])
def test_non_finite_or_non_numeric_scales_are_refused(name, value):
    # inf passed "> 0" before and gave NaN weights (init_std) or NaN rotary angles (rope_base).
    with pytest.raises(ConfigError, match=f"{name}=.* must be a finite number"):
        ModelConfig(**{name: value})
