"""The model's face: the same named input errors as torch, config errors, weights shared with torch, the
registry record, ``revnet info``, and a missing numba as one line."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import revnet_core
from revnet_core.couplings import BaseCoupling
from revnet_core.errors import ConfigError, InputError
from revnet_numba.layers import check_coupling
from revnet_numba.model import ReversibleTransformerNumba

from .conftest import TINY, torch_loss_and_grads, worst_relative


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return revnet_core.build("torch", **TINY), revnet_core.build("numba", **TINY)


BAD = {
    "out of range": (lambda: np.array([[1, 2, 37]]), None, "out of range"),
    "negative": (lambda: np.array([[1, -1, 3]]), None, "out of range"),
    "float ids": (lambda: np.array([[1.0, 2.0]]), None, "integer token ids"),
    "rank 3": (lambda: np.zeros((1, 2, 3), np.int64), None, "shape"),
    "empty": (lambda: np.zeros((1, 0), np.int64), None, "empty"),
    "too long": (lambda: np.zeros((1, 129), np.int64), None, "exceeds max_seq_len"),
    "one token": (lambda: np.array([[3]]), None, "at least 2 tokens"),
    "labels shape": (lambda: np.array([[1, 2, 3]]), lambda: np.array([[1, 2]]), "must match"),
    "labels range": (lambda: np.array([[1, 2, 3]]), lambda: np.array([[1, 2, 99]]), "labels out of range"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_torchs_named_errors(models, case):
    tm, nm = models
    ids, labels, match = BAD[case]
    args = (ids(),) + ((labels(),) if labels else ())
    with pytest.raises(InputError, match=match) as numba_err:
        nm.loss(*args)
    with pytest.raises(InputError) as torch_err:
        tm(*(torch.from_numpy(a) for a in args))
    assert str(numba_err.value) == str(torch_err.value).replace("torch.", "")  # dtypes named by their library
    with pytest.raises(InputError, match=match):
        nm.value_and_grad(*args)


def test_not_an_array_is_an_input_error(models):
    with pytest.raises(InputError, match="numpy array"):
        models[1].loss([[1, 2, 3]])


def test_ignored_labels_and_one_dimensional_ids_are_accepted(models):
    nm = models[1]
    ids = np.array([1, 2, 3, 4])
    assert nm.loss(ids) == nm.loss(ids[None])
    assert np.isfinite(nm.loss(ids, np.array([-100, 2, 3, -100])))


@pytest.mark.parametrize("fields,match", [
    (dict(dropout=0.1), "dropout is not built"),
    (dict(attention_window=8), "sliding-window"),
    (dict(stream_dtype="bfloat16"), "numpy has no bfloat16"),
    (dict(backend_options={"numba": {"threads": -1}}), "threads"),
    (dict(backend_options={"numba": {"tile": 8}}), r"unknown numba backend option\(s\) \['tile'\]"),
])
def test_config_errors_are_named(fields, match):
    with pytest.raises(ConfigError, match=match):
        revnet_core.build("numba", **dict(TINY, **fields))


def test_a_coupling_without_vjp_is_refused_by_name():
    class NoRule(BaseCoupling):
        def forward(self, x, fx):
            return x + fx

        def inverse(self, y, fx):
            return y - fx

    with pytest.raises(ConfigError, match="has no vjp rule"):
        check_coupling(NoRule(), 8)


def test_options_go_to_the_numba_section():
    m = revnet_core.build("numba", attn_block=16, **TINY)
    assert m.config.backend_options["numba"] == {"attn_block": 16}
    assert m.layers.block.attn_block == 16


def test_return_logits_and_hidden(models):
    nm = models[1]
    out = nm(np.array([[1, 2, 3, 4, 5]]), return_logits=True)
    assert out.logits.shape == (1, 5, 37) and out.last_hidden_state.shape == (1, 5, 32)
    z = out.logits[0, :-1]
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert abs(out.loss - np.mean(lse - z[np.arange(4), [2, 3, 4, 5]])) < 1e-5


# --- weights ----------------------------------------------------------------------------------------------
def test_weights_round_trip_with_torch(tmp_path):
    nm = ReversibleTransformerNumba(seed=3, coupling="affine", norm="rmsnorm", **TINY)
    path = tmp_path / "n.safetensors"
    nm.save_weights(path)
    tm = revnet_core.build("torch", weights=str(path), coupling="affine", norm="rmsnorm", **TINY).double()
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert sorted(state) == sorted(nm.params)
    assert all(np.array_equal(state[k], nm.params[k]) for k in state)  # float32 file, bit for bit
    ids = np.random.default_rng(0).integers(0, 37, (2, 30))
    t_loss, t_grads = torch_loss_and_grads(tm, ids)
    n_loss, n_grads = nm.astype("float64").value_and_grad(ids)
    assert abs(n_loss - t_loss) / t_loss < 1e-10 and worst_relative(n_grads, t_grads) < 1e-10
    again = revnet_core.build("numba", weights=str(path), coupling="affine", norm="rmsnorm", **TINY)
    assert all(np.array_equal(again.params[k], v.astype(np.float32)) for k, v in nm.params.items())


def test_a_weight_file_that_does_not_fit_names_what_is_wrong(tmp_path):
    path = tmp_path / "w.safetensors"
    revnet_core.build("numba", **TINY).save_weights(path)
    with pytest.raises(ConfigError, match=r"missing \['layers.3"):
        revnet_core.build("numba", weights=str(path), **dict(TINY, num_layers=4))
    with pytest.raises(ConfigError, match="wrong shape"):
        revnet_core.build("numba", weights=str(path), **dict(TINY, d_ff=48))


# --- the record, the CLI, a missing numba -----------------------------------------------------------------
def run_python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_discovering_the_backend_imports_no_numba():
    r = run_python("import sys, revnet_core.registry as r; rec = r.backend_record('numba'); "
                   "print(rec.memory, rec.options, 'numba' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["revnet_numba.memory", "revnet_numba.options:NumbaOptions", "False"]


def test_revnet_info_lists_numba():
    r = subprocess.run([sys.executable, "-m", "revnet_zero", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "numba (revnet-zero" in r.stdout
    assert "  numba: CPU (" in r.stdout


BLOCK_NUMBA = "import sys; sys.modules['numba'] = None; "  # what an environment without numba sees


def test_missing_numba_is_one_line_naming_the_install():
    r = run_python(BLOCK_NUMBA + "import revnet_core; revnet_core.build('numba', num_layers=1)")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("revnet_numba.plugin.NumbaMissingError") and "pip install 'revnet-zero[numba]'" in last
    r = run_python(BLOCK_NUMBA + "from revnet_zero.cli import main; raise SystemExit(main(['info']))")
    assert r.returncode == 0, r.stderr
    assert "numba: not available" in r.stdout and "revnet-zero[numba]" in r.stdout


def test_building_a_model_holds_blas_to_its_option():
    from threadpoolctl import threadpool_info

    revnet_core.build("numba", **TINY)  # blas_threads=1, the default
    assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
    with pytest.raises(ConfigError, match="blas_threads=-1 must be a non-negative integer"):
        revnet_core.build("numba", blas_threads=-1, **TINY)
