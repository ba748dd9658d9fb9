"""ContinuousDepthRevNet: adjoint gradients against backprop through the solver, fixed grids against the
unrolled steps, saved memory against the step count, depth against tolerance, errors, training, docs."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revnet_core.data import lm_data, stdlib_corpus
from revnet_core.errors import BackendFeatureError, ConfigError, InputError, TrainingError
from revnet_torch.memory import saved_tensor_bytes
from revnet_core.errors import DepthLimitError
from revnet_torch.ode import ContinuousDepthRevNet, SolveStats

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(d_model=8, num_heads=2, d_ff=12, vocab_size=11, max_seq_len=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, scale=0.2, **fields):
    """An fp64 model with "trained-like" weights: every parameter (time tables included) perturbed."""
    torch.manual_seed(seed)
    model = ContinuousDepthRevNet(**{**TINY, **fields}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --- gradients ---------------------------------------------------------------------------------------
def test_adjoint_gradients_equal_backprop_through_the_solver():
    model = tiny()
    ids = torch.randint(0, 11, (1, 5))
    kw = dict(tolerance=1e-10, max_depth=100_000)
    loss_a, ga = grads(model, ids, adjoint=True, **kw)
    assert model.last_solve.nfe_backward > 0  # the adjoint ODE really ran
    loss_d, gd = grads(model, ids, adjoint=False, **kw)
    assert model.last_solve.nfe_backward == 0
    torch.testing.assert_close(loss_a, loss_d, rtol=1e-12, atol=0)
    for name in gd:
        assert gd[name].abs().max() > 0, name  # every parameter, time tables included, gets gradient
        scale = gd[name].abs().max().item()
        torch.testing.assert_close(ga[name], gd[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_hidden_state_input_gradient_matches_under_the_adjoint():
    model = tiny(seed=1, scale=0.1)
    h = torch.randn(2, 4, 8, dtype=torch.float64)
    cot = torch.randn(2, 4, 8, dtype=torch.float64)
    got = []
    for adjoint in (True, False):
        x = h.clone().requires_grad_(True)
        (model(x, tolerance=1e-10, max_depth=100_000, adjoint=adjoint) * cot).sum().backward()
        got.append(x.grad)
    torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=1e-8)


# --- fixed grids are the unrolled discrete steps -------------------------------------------------------
def euler_step(f, t0, dt, y):
    return y + dt * f(t0, y)


def rk4_step(f, t0, dt, y):
    """Kutta's 3/8 rule: c = (0, 1/3, 2/3, 1), b = (1, 3, 3, 1) / 8 (torchdiffeq's "rk4")."""
    third, two_thirds = 1 / 3, 2 / 3
    k1 = f(t0, y)
    k2 = f(t0 + dt * third, y + dt * k1 * third)
    k3 = f(t0 + dt * two_thirds, y + dt * (k2 - k1 * third))
    k4 = f(t0 + dt, y + dt * (k1 - k2 + k3))
    return y + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


@pytest.mark.parametrize("solver, step", [("euler", euler_step), ("rk4", rk4_step)])
def test_fixed_grid_equals_the_unrolled_steps(solver, step):
    steps = 5
    model = tiny(depth_function="fixed", ode_solver=solver, max_depth=steps)
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    out = model(h, adjoint=False)
    assert model.last_solve.steps_forward == steps
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    y = torch.stack((h, h))
    for t0, t1 in zip(grid[:-1], grid[1:]):
        y = step(model.dynamics, t0, t1 - t0, y)
    assert torch.equal(out, y[0] * 0.5 + y[1] * 0.5)
    # One explicit Euler step is the discrete coupling x1 + F(x2), x2 + G(x1) with time-modulated blocks.
    if solver == "euler":
        one = tiny(depth_function="fixed", ode_solver="euler", max_depth=1)
        t0 = torch.zeros((), dtype=torch.float64)
        s_f, g_f = one.dynamics.time_attn(t0)
        s_g, g_g = one.dynamics.time_ffn(t0)
        x1 = h + one.dynamics.attn(h + s_f) * (1 + g_f)
        x2 = h + one.dynamics.ffn(h + s_g) * (1 + g_g)
        torch.testing.assert_close(one(h, adjoint=False), (x1 + x2) / 2, rtol=1e-14, atol=1e-14)


# --- reversible integration ----------------------------------------------------------------------------
def test_reversible_gradients_equal_plain_autograd_through_the_steps():
    model = tiny(seed=2, depth_function="fixed", ode_solver="reversible", max_depth=6)
    ids = torch.randint(0, 11, (2, 5))
    loss_r, gr = grads(model, ids, adjoint=True)
    assert model.last_solve == SolveStats(6, 6, 6, 6)
    loss_p, gp = grads(model, ids, adjoint=False)  # ordinary autograd over the same six steps
    torch.testing.assert_close(loss_r, loss_p, rtol=0, atol=0)
    for name in gp:
        assert gp[name].abs().max() > 0, name
        torch.testing.assert_close(gr[name], gp[name], rtol=1e-10, atol=1e-12, msg=name)
    h = torch.randn(2, 4, 8, dtype=torch.float64)
    got = []
    for adjoint in (True, False):
        x = h.clone().requires_grad_(True)
        (model(x, adjoint=adjoint) ** 2).sum().backward()
        got.append(x.grad)
    torch.testing.assert_close(got[0], got[1], rtol=1e-10, atol=1e-12)


def test_reversible_steps_are_the_coupling_and_converge_to_the_ode():
    steps = 4
    model = tiny(depth_function="fixed", ode_solver="reversible", max_depth=steps)
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    x1, x2 = h, h
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x1 = x1 + (t1 - t0) * model.dynamics.f(x2, t0)
        x2 = x2 + (t1 - t0) * model.dynamics.g(x1, t0)  # the updated x1: the reversible layer's order
    with torch.no_grad():
        assert torch.equal(model(h, adjoint=True), x1 * 0.5 + x2 * 0.5)
        ode = ContinuousDepthRevNet(**TINY, tolerance=1e-10, max_depth=100_000).double()  # same f, dopri5
        ode.load_state_dict(model.state_dict())
        exact = ode(h)
        errors = [(model(h, max_depth=n) - exact).abs().max().item() for n in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 8, errors  # first order: ~1/n


def test_depth_matters():
    """The dynamics depend on t once the time tables are trained (here: perturbed)."""
    model = tiny()
    y = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    f0 = model.dynamics(torch.tensor(0.0, dtype=torch.float64), y)
    f1 = model.dynamics(torch.tensor(1.0, dtype=torch.float64), y)
    assert (f0 - f1).abs().max() > 1e-3


# --- memory ---------------------------------------------------------------------------------------------
def saved(model, adjoint, **kw):
    h = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    with saved_tensor_bytes(exclude=list(model.parameters())) as s:
        out = model(h, adjoint=adjoint, **kw)
    out.sum().backward()
    return s["bytes"], model.last_solve.nfe_forward


def test_adjoint_saved_bytes_do_not_grow_with_steps():
    few = tiny(depth_function="fixed", ode_solver="rk4", max_depth=2)
    many = tiny(depth_function="fixed", ode_solver="rk4", max_depth=8)
    adj_few, nfe_few = saved(few, True)
    adj_many, nfe_many = saved(many, True)
    direct_few, _ = saved(few, False)
    direct_many, _ = saved(many, False)
    assert (nfe_few, nfe_many) == (8, 32)
    rev_few, _ = saved(tiny(depth_function="fixed", ode_solver="reversible", max_depth=2), True)
    rev_many, _ = saved(tiny(depth_function="fixed", ode_solver="reversible", max_depth=16), True)
    stream = 2 * 8 * 8 * 8  # bytes of one (B, T, d) fp64 stream
    assert rev_few == rev_many == 2 * stream  # the two final streams
    assert adj_few == adj_many == 2 * 2 * stream + 2 * 8  # the solution (2 times, 2 streams) and t (2,)
    assert direct_many > 3.5 * direct_few  # linear in the steps
    assert direct_few > 10 * adj_few
    # Adaptive: a tighter tolerance takes more steps; the adjoint still saves the same bytes.
    adaptive = tiny()
    a_loose, n_loose = saved(adaptive, True, tolerance=1e-2)
    a_tight, n_tight = saved(adaptive, True, tolerance=1e-6)
    assert n_tight > n_loose and a_tight == a_loose


# --- depth, limits and errors -----------------------------------------------------------------------------
def test_tighter_tolerance_takes_more_evaluations():
    model = tiny()
    ids = torch.randint(0, 11, (1, 6))
    seen = []
    for tol in (1e-2, 1e-4, 1e-6):
        model(ids, tolerance=tol, max_depth=10_000).loss.backward()
        s = model.last_solve
        seen.append((s.nfe_forward, s.nfe_backward))
    assert seen[0][0] < seen[1][0] < seen[2][0]
    assert seen[0][1] < seen[1][1] < seen[2][1]
    assert model.last_nfe == {"forward": seen[2][0], "backward": seen[2][1]}


def test_max_depth_exceeded_raises_a_named_error():
    model = tiny()
    ids = torch.randint(0, 11, (1, 6))
    with pytest.raises(DepthLimitError, match="raise max_depth or loosen"):
        model(ids, tolerance=1e-8, max_depth=3)
    assert issubclass(DepthLimitError, TrainingError)
    # The adjoint backward is bounded too: allow exactly the forward's steps when the backward needs more.
    model(ids, tolerance=1e-2, max_depth=1000).loss.backward()
    s = model.last_solve
    assert s.steps_backward > s.steps_forward
    loss = model(ids, tolerance=1e-2, max_depth=s.steps_forward).loss
    with pytest.raises(DepthLimitError, match="adjoint backward"):
        loss.backward()


@pytest.mark.parametrize("kw, message", [
    (dict(ode_solver="rk45"), "ode_solver='rk45' does not fit"),
    (dict(ode_solver="rk4"), "pass depth_function='fixed'"),
    (dict(depth_function="fixed", ode_solver="dopri5"), "pass depth_function='adaptive'"),
    (dict(depth_function="deep"), "depth_function='deep' is not one of"),
    (dict(tolerance=0.0), "tolerance=0.0 must be"),
    (dict(tolerance=-1e-3), "must be a finite number > 0"),
    (dict(max_depth=0), "max_depth=0 must be an integer >= 1"),
    (dict(max_depth=2.5), "max_depth=2.5"),
    (dict(adjoint="yes"), "adjoint='yes' must be True or False"),
    (dict(num_heads=3), "num_heads"),
])
def test_bad_arguments_get_named_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        ContinuousDepthRevNet(**{**TINY, **kw})


def test_bad_call_arguments_and_inputs():
    model = ContinuousDepthRevNet(**TINY)
    ids = torch.randint(0, 11, (1, 6))
    with pytest.raises(ConfigError, match="tolerance"):
        model(ids, tolerance=0)
    with pytest.raises(ConfigError, match="max_depth"):
        model(ids, max_depth=0)
    for bad, message in [(torch.zeros(1, 6, 5), r"shape \(batch, seq, 8\)"), ([1, 2], "torch.Tensor"),
                         (torch.full((1, 6), 11), "out of range"), (torch.zeros(1, 17, dtype=torch.long), "17"),
                         (torch.zeros(1, 6, dtype=torch.bool), "integer token ids")]:
        with pytest.raises(InputError, match=message):
            model(bad)


def test_missing_torchdiffeq_names_the_extra(monkeypatch):
    model = ContinuousDepthRevNet(**TINY)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(BackendFeatureError, match=re.escape('pip install "revnet-zero[ode]"')):
        model(torch.randint(0, 11, (1, 6)))


def test_importing_the_backend_does_not_import_torchdiffeq():
    code = ("import sys, revnet_torch, revnet_torch.ode; import revnet_zero; "
            "assert 'torchdiffeq' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- inputs and outputs -------------------------------------------------------------------------------------
def test_token_ids_give_loss_and_logits():
    model = tiny()
    ids = torch.randint(0, 11, (2, 7))
    out = model(ids, tolerance=1e-6)
    assert out.logits.shape == (2, 7, 11) and out.last_hidden_state.shape == (2, 7, 8)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    labels = ids.clone()
    labels[:, 4:] = -100
    part = model(ids, labels=labels, tolerance=1e-6).loss
    torch.testing.assert_close(part, torch.nn.functional.cross_entropy(
        out.logits[:, :3].reshape(-1, 11), ids[:, 1:4].reshape(-1)), rtol=1e-12, atol=1e-12)
    assert model(ids[0], tolerance=1e-6, return_logits=False).logits is None  # (T,) works as one sequence


def test_hidden_states_give_hidden_states():
    model = ContinuousDepthRevNet(**TINY)
    h = torch.randn(3, 5, 8)
    out = model(h, tolerance=1e-3, max_depth=100)
    assert out.shape == h.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.last_solve.nfe_forward >= 6 and isinstance(model.last_solve, SolveStats)
    assert not torch.equal(out, h)


def test_no_grad_calls_run_the_plain_solver():
    model = ContinuousDepthRevNet(**TINY)
    ids = torch.randint(0, 11, (1, 6))
    with torch.no_grad():
        loss = model(ids).loss
    assert loss.grad_fn is None and math.isfinite(loss.item())


# --- training ---------------------------------------------------------------------------------------------------
def test_training_lowers_heldout_loss():
    torch.manual_seed(0)
    data = lm_data(stdlib_corpus(), seq_len=32, batch_size=8, seed=0, eval_windows_max=16, eval_batch_size=16)
    model = ContinuousDepthRevNet(d_model=32, num_heads=2, vocab_size=256, max_seq_len=32, tolerance=1e-2)
    ev = torch.from_numpy(data.eval_batches[0][0])

    def heldout():
        with torch.no_grad():
            return model(ev, return_logits=False).loss.item()

    before = heldout()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        ids = torch.from_numpy(data.sampler.next_batch()[0])
        loss = model(ids, return_logits=False).loss
        loss.backward()
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = heldout()
    assert math.isfinite(after) and after < before - 1.0, (before, after)
    assert model.dynamics.time_attn.table.weight.abs().max() > 0  # the time tables learned something


# --- docs ----------------------------------------------------------------------------------------------------------
def test_docs_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code_blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "continuous_depth.md").read_text(), flags=re.S)
    assert code_blocks
    for code in code_blocks:
        exec(compile(code, "docs/continuous_depth.md", "exec"), {"__name__": "__doc_example__"})


def test_docs_table_is_the_committed_results():
    import json

    record = json.loads((ROOT / "docs" / "benchmarks" / "continuous_depth" / "results.json").read_text())
    doc = (ROOT / "docs" / "continuous_depth.md").read_text()
    assert record["command"] in doc
    for name, row in record["results"].items():
        (line,) = [ln for ln in doc.splitlines() if ln.startswith(f"| {name} ")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == [str(row["parameters"]), f"{row['heldout_bits_per_byte']:.4f}",
                              f"{row['step_time_ms_median']:.2f} ms"], line
        if "nfe_forward_mean" in row:
            assert cells[4] == f"{row['nfe_forward_mean']:g} / {row['nfe_backward_mean']:g}", line
