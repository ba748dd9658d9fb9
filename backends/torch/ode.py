"""ContinuousDepthRevNet: a transformer whose depth is an ODE solve (experimental, ``revnet-zero[ode]``).

The discrete reversible layer y1 = x1 + F(x2), y2 = x2 + G(y1) is one step of the coupled system

    d(x1)/dt = F(x2, t),   d(x2)/dt = G(x1, t),   t in [0, 1],

with F the project's attention block and G its feed-forward block, both modulated by learned features of
t (a shift of their input, a gain on their output) so that depth matters. torchdiffeq integrates it: an
adaptive solver (dopri5, ...) chooses the steps, the "depth", to meet ``tolerance``; a fixed-grid solver
(euler, rk4, ...) takes ``max_depth`` equal steps. Gradients come from the adjoint ODE by default (memory
independent of the number of steps), or from plain backprop through the solver's operations. One more
fixed-grid solver is ours, "reversible": the coupling itself as the integrator (``ReversibleIntegrator``),
whose backward rebuilds every step's input through ``revnet_core.sweep`` like the discrete model's.

torchdiffeq is imported inside the functions that need it: importing this module does not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from revnet_core.config import ModelConfig
from revnet_core.couplings import AdditiveCoupling
from revnet_core.errors import BackendFeatureError, ConfigError, DepthLimitError, InputError
from revnet_core.inputs import check_id_range, check_labels_shape, check_length, check_loss_length
from revnet_core.sweep import LayerSpec, backward_step, forward_step

from .blocks import AttentionBlock, FeedForwardBlock, Rotary, make_norm
from .engine import AutocastState
from .loss import IGNORE_INDEX, lm_loss, shift_targets
from .model import ModelOutput, init_weights

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's embedded RK pairs
# torchdiffeq's fixed-grid RK methods, and "reversible": the coupling itself as the integrator (ours)
FIXED_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "reversible")
DEPTH_FUNCTIONS = {"adaptive": ADAPTIVE_SOLVERS, "fixed": FIXED_SOLVERS}
DEFAULT_SOLVER = {"adaptive": "dopri5", "fixed": "rk4"}
INSTALL_HINT = 'pip install "revnet-zero[ode]"'


def load_torchdiffeq():
    """The torchdiffeq module, or BackendFeatureError saying how to install it."""
    try:
        import torchdiffeq as tde
    except ImportError:
        raise BackendFeatureError(f"ContinuousDepthRevNet needs torchdiffeq, which is not installed: "
                                  f"{INSTALL_HINT}") from None
    return tde


def check_solver(depth_function: str, ode_solver: str | None) -> str:
    """The solver for ``depth_function`` ("adaptive" | "fixed"): ``ode_solver`` checked, or the default."""
    if depth_function not in DEPTH_FUNCTIONS:
        raise ConfigError(f"depth_function={depth_function!r} is not one of {list(DEPTH_FUNCTIONS)}")
    if ode_solver is None:
        return DEFAULT_SOLVER[depth_function]
    if ode_solver in DEPTH_FUNCTIONS[depth_function]:
        return ode_solver
    other = "fixed" if depth_function == "adaptive" else "adaptive"
    hint = (f"; {ode_solver!r} is a {other} solver: pass depth_function={other!r}"
            if ode_solver in DEPTH_FUNCTIONS[other] else "")
    raise ConfigError(f"ode_solver={ode_solver!r} does not fit depth_function={depth_function!r}: choose one of "
                      f"{list(DEPTH_FUNCTIONS[depth_function])}{hint}")


def check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0 \
            or not math.isfinite(tolerance):
        raise ConfigError(f"tolerance={tolerance!r} must be a finite number > 0 (e.g. 1e-3; smaller is more "
                          "accurate and takes more steps)")
    return float(tolerance)


def check_max_depth(max_depth) -> int:
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ConfigError(f"max_depth={max_depth!r} must be an integer >= 1 (the most solver steps one solve "
                          "may take; the number of steps of a fixed-grid solver)")
    return max_depth


class TimeModulation(nn.Module):
    """(shift, gain), each (d,), of a block at depth t: a learned map of the cosine basis cos(pi k t),
    k = 0..features-1, of [0, 1]. Zero at init, so an untrained model starts autonomous (f independent of t)."""

    def __init__(self, d_model: int, features: int):
        super().__init__()
        self.features = features
        self.table = nn.Linear(features, 2 * d_model, bias=False)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.arange(self.features, device=t.device, dtype=t.dtype)
        return self.table(torch.cos(math.pi * k * t).to(self.table.weight.dtype)).chunk(2)


class CoupledDynamics(nn.Module):
    """f(t, y) for a state y (2, B, T, d) = (x1, x2): (F(x2, t), G(x1, t)) stacked the same way, with
    F(x, t) = attn(x + sF(t)) * (1 + gF(t)) and G likewise with the FFN. The continuous limit of a reversible
    layer's two additive couplings, one set of weights for all depths."""

    def __init__(self, config: ModelConfig, rotary: Rotary, time_features: int):
        super().__init__()
        d = config.d_model
        self.attn = AttentionBlock(d, config.num_heads, d, rotary, norm=config.norm, eps=config.norm_eps)
        self.ffn = FeedForwardBlock(d, config.ffn_dim, d, activation=config.activation, norm=config.norm,
                                    eps=config.norm_eps)
        self.time_attn = TimeModulation(d, time_features)
        self.time_ffn = TimeModulation(d, time_features)

    def f(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d(x1)/dt = F(x2, t): (B, T, d), scalar t -> (B, T, d)."""
        shift, gain = self.time_attn(t.to(x2.dtype))
        return self.attn(x2 + shift) * (1 + gain)

    def g(self, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d(x2)/dt = G(x1, t): (B, T, d), scalar t -> (B, T, d)."""
        shift, gain = self.time_ffn(t.to(x1.dtype))
        return self.ffn(x1 + shift) * (1 + gain)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x1, x2 = y.unbind(0)
        return torch.stack((self.f(x2, t), self.g(x1, t)))


@dataclass
class SolveStats:
    """What one solve did: function evaluations (NFE) and solver steps (rejected ones included), in the
    forward and in the adjoint backward (filled in while ``backward()`` runs; 0 for direct backprop, whose
    backward replays the forward's NFE operations through autograd instead of calling f)."""

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps_forward: int = 0
    steps_backward: int = 0


class _CountedSolve(nn.Module):
    """The dynamics as torchdiffeq sees them for one call: counts evaluations and steps into ``stats`` and
    raises DepthLimitError when a pass (forward, or the adjoint backward) takes more than ``max_depth`` steps."""

    def __init__(self, dynamics: CoupledDynamics, stats: SolveStats, max_depth: int, tolerance: float):
        super().__init__()
        self.dynamics = dynamics
        self.stats = stats
        self.max_depth = max_depth
        self.tolerance = tolerance
        self.backward_phase = False  # set once the forward solve has returned

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.backward_phase:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return self.dynamics(t, y)

    def _step(self, field: str, where: str) -> None:
        n = getattr(self.stats, field) + 1
        setattr(self.stats, field, n)
        if n > self.max_depth:
            raise DepthLimitError(depth_message(self.max_depth, self.tolerance, where))

    def callback_step(self, t0, y0, dt) -> None:
        self._step("steps_forward", "forward")

    def callback_step_adjoint(self, t0, y0, dt) -> None:
        self._step("steps_backward", "adjoint backward")


# --- reversible integration -----------------------------------------------------------------------------
class _Half:
    """One step of F (or G) as the reversible sweep calls it: x (B, T, d) -> dt * fn(x, t), with the
    parameters its pullback differentiates."""

    def __init__(self, fn, params: list, t: torch.Tensor, dt: torch.Tensor):
        self.fn, self.params, self.t, self.dt = fn, params, t, dt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dt * self.fn(x, self.t)


_ADDITIVE = AdditiveCoupling()


class ReversibleIntegrator:
    """``steps`` steps of the coupling over t in [0, 1], step dt = 1/steps, t_k = k dt (symplectic Euler):

        x1 <- x1 + dt F(x2, t_k);   x2 <- x2 + dt G(x1, t_k)   (the new x1)

    a discrete reversible layer per step with the weights shared over depth, so its backward rebuilds
    each step's input from its output (``revnet_core.sweep``) and saves only the final streams: exact
    gradients of the discretisation (to rounding) in memory independent of ``steps``. First order in dt.
    """

    def __init__(self, dynamics: CoupledDynamics, steps: int, stats: SolveStats, dtype: torch.dtype,
                 device: torch.device):
        self.stats = stats
        self.f_params = [p for m in (dynamics.attn, dynamics.time_attn) for p in m.parameters() if p.requires_grad]
        self.g_params = [p for m in (dynamics.ffn, dynamics.time_ffn) for p in m.parameters() if p.requires_grad]
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype, device=device)
        self.specs = [LayerSpec(_Half(dynamics.f, self.f_params, grid[k], grid[k + 1] - grid[k]),
                                _Half(dynamics.g, self.g_params, grid[k], grid[k + 1] - grid[k]),
                                _ADDITIVE, _ADDITIVE) for k in range(steps)]
        self.autocast = AutocastState.capture(device.type)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every step (under autograd if it is on): the plain-backprop reference of ``apply``."""
        for spec in self.specs:
            x1, x2 = forward_step(x1, x2, spec)
            self.stats.nfe_forward += 1
            self.stats.steps_forward += 1
        return x1, x2

    def apply(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps with the reversible backward: (B, T, d) twice -> (B, T, d) twice."""
        return _ReversibleSolveFn.apply(x1, x2, self, *self.f_params, *self.g_params)

    def _vjp(self, half: _Half, x: torch.Tensor):
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad(), self.autocast.replay():
            out = half(xg)

        def pullback(ct: torch.Tensor):
            got = torch.autograd.grad(out, [xg, *half.params], ct.to(out.dtype), allow_unused=True)
            return got[0], [torch.zeros_like(p) if g is None else g for p, g in zip(half.params, got[1:])]

        return out.detach(), pullback

    def backward(self, y1, y2, dy1, dy2) -> tuple:
        """(dx1, dx2, parameter gradients in f_params + g_params order), rebuilding the streams step by step."""
        df = [torch.zeros_like(p) for p in self.f_params]
        dg = [torch.zeros_like(p) for p in self.g_params]
        for spec in reversed(self.specs):
            y1, y2, dy1, dy2, pf, pg = backward_step(y1, y2, dy1, dy2, spec, self._vjp)
            for total, part in zip(df + dg, list(pf) + list(pg)):
                total.add_(part)
            self.stats.nfe_backward += 1
            self.stats.steps_backward += 1
        return dy1, dy2, df + dg


class _ReversibleSolveFn(torch.autograd.Function):
    """One autograd node for all steps: saves only the final streams; parameters are inputs so their
    gradients arrive through autograd."""

    @staticmethod
    def forward(ctx, x1, x2, integrator: ReversibleIntegrator, *params):
        with torch.no_grad():
            y1, y2 = integrator.forward(x1, x2)
        ctx.integrator = integrator
        ctx.save_for_backward(y1, y2)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        dx1, dx2, dparams = ctx.integrator.backward(y1, y2, dy1, dy2)
        return dx1, dx2, None, *dparams


def depth_message(max_depth: int, tolerance: float, where: str) -> str:
    return (f"the ODE solver needed more than max_depth={max_depth} steps in the {where} pass at "
            f"tolerance={tolerance:g}: raise max_depth or loosen (increase) tolerance")


class ContinuousDepthRevNet(nn.Module):
    """A continuous-depth reversible transformer LM: embedding, the coupled ODE of ``CoupledDynamics`` from
    t=0 to t=1 (both streams start from the input), the streams' mean, a final norm and an untied LM head.

    ``ContinuousDepthRevNet(d_model=1024, depth_function='adaptive', ode_solver='dopri5')``, then
    ``model(inputs, tolerance=1e-3, max_depth=100)`` with inputs either token ids (B, T) int (-> ModelOutput
    with .loss, the next-token loss against ``labels`` (default the ids), and .logits (B, T, V)) or hidden
    states (B, T, d) float (-> the flow's output (B, T, d), same dtype). After each call ``last_solve`` /
    ``last_nfe`` report the depth the solver used.

    depth_function "adaptive": an adaptive solver (ADAPTIVE_SOLVERS, rtol = atol = tolerance) takes at most
    ``max_depth`` steps; "fixed": a fixed-grid solver (FIXED_SOLVERS) takes exactly ``max_depth`` equal steps
    (tolerance unused). ``adjoint=True`` gets gradients from the adjoint ODE (solved backward with the same
    solver and tolerance, seminorm error control): saved memory independent of the step count, gradients
    accurate to the tolerance; ``adjoint=False`` backpropagates through every solver operation (exact
    gradients of the discretisation, memory linear in the NFE). For ode_solver "reversible", adjoint=True
    means its reversible backward instead (exact gradients, the final streams saved), False plain autograd. Architecture fields (num_heads, d_ff,
    vocab_size, max_seq_len, norm, norm_eps, activation, rope_base, init_std, loss_chunk_size) are those of
    ``revnet_core.ModelConfig`` and validated by it. Dropout is not supported: an adaptive solver needs a
    deterministic f.
    """

    def __init__(self, d_model: int = 256, depth_function: str = "adaptive", ode_solver: str | None = None, *,
                 num_heads: int = 4, d_ff: int | None = None, vocab_size: int = 256, max_seq_len: int = 2048,
                 tolerance: float = 1e-3, max_depth: int = 100, adjoint: bool = True, time_features: int = 8,
                 norm: str = "layernorm", norm_eps: float = 1e-5, activation: str = "gelu",
                 rope_base: float = 10000.0, init_std: float = 0.02, loss_chunk_size: int = 1024):
        super().__init__()
        self.ode_solver = check_solver(depth_function, ode_solver)
        self.depth_function = depth_function
        self.tolerance = check_tolerance(tolerance)
        self.max_depth = check_max_depth(max_depth)
        self.adjoint = _check_flag(adjoint, "adjoint")
        if isinstance(time_features, bool) or not isinstance(time_features, int) or time_features < 1:
            raise ConfigError(f"time_features={time_features!r} must be an integer >= 1")
        # One "layer" of ModelConfig: the dynamics hold one attention and one FFN block for every depth.
        self.config = ModelConfig(num_layers=1, d_model=d_model, num_heads=num_heads, d_ff=d_ff,
                                  vocab_size=vocab_size, max_seq_len=max_seq_len, norm=norm, norm_eps=norm_eps,
                                  activation=activation, rope_base=rope_base, init_std=init_std,
                                  loss_chunk_size=loss_chunk_size)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rotary = Rotary(self.config.head_dim, rope_base)
        self.dynamics = CoupledDynamics(self.config, self.rotary, time_features)
        self.norm = make_norm(norm, d_model, norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        init_weights(self, self.config)
        for block in (self.dynamics.time_attn, self.dynamics.time_ffn):
            nn.init.zeros_(block.table.weight)
        self.last_solve: SolveStats | None = None

    @property
    def last_nfe(self) -> dict[str, int] | None:
        """{"forward": NFE, "backward": NFE} of the last call (backward grows while its backward runs)."""
        s = self.last_solve
        return None if s is None else {"forward": s.nfe_forward, "backward": s.nfe_backward}

    # --- the solve ------------------------------------------------------------------------------------
    def solve_options(self, max_depth: int) -> tuple[dict, dict]:
        """torchdiffeq (options, adjoint_options) for this model's solver and ``max_depth``."""
        if self.depth_function == "fixed":
            def grid(func, y0, t):
                return torch.linspace(float(t[0]), float(t[-1]), max_depth + 1, dtype=t.dtype, device=t.device)

            return {"grid_constructor": grid}, {"grid_constructor": grid}
        # Seminorm: the adjoint's step control ignores the parameter-gradient integrals, which need no
        # accuracy of their own (Kidger et al. 2021), saving backward steps at the same gradient quality.
        options = {"max_num_steps": max_depth + 1}  # our step callback raises at max_depth + 1 first
        return options, {**options, "norm": "seminorm"}

    def flow(self, h: torch.Tensor, tolerance: float | None = None, max_depth: int | None = None,
             adjoint: bool | None = None) -> torch.Tensor:
        """Integrate both streams from h (B, T, d) over t in [0, 1]; their mean at t=1, (B, T, d), h's dtype.
        None arguments take the model's defaults. Fills ``last_solve``."""
        tolerance = self.tolerance if tolerance is None else check_tolerance(tolerance)
        max_depth = self.max_depth if max_depth is None else check_max_depth(max_depth)
        adjoint = self.adjoint if adjoint is None else _check_flag(adjoint, "adjoint")
        stats = SolveStats()
        self.last_solve = stats
        if self.ode_solver == "reversible":
            integrator = ReversibleIntegrator(self.dynamics, max_depth, stats, h.dtype, h.device)
            if adjoint and torch.is_grad_enabled():
                x1, x2 = integrator.apply(h, h)
            else:
                x1, x2 = integrator.forward(h, h)
            return x1 * 0.5 + x2 * 0.5
        tde = load_torchdiffeq()
        func = _CountedSolve(self.dynamics, stats, max_depth, tolerance)
        y0 = torch.stack((h, h))  # (2, B, T, d)
        t = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        options, adjoint_options = self.solve_options(max_depth)
        kw = dict(rtol=tolerance, atol=tolerance, method=self.ode_solver, options=options)
        try:
            if adjoint and torch.is_grad_enabled():
                params = tuple(p for p in self.dynamics.parameters() if p.requires_grad)
                ys = tde.odeint_adjoint(func, y0, t, adjoint_params=params, adjoint_options=adjoint_options, **kw)
            else:
                ys = tde.odeint(func, y0, t, **kw)
        except AssertionError as exc:  # torchdiffeq's own max_num_steps guard
            if "max_num_steps" not in str(exc):
                raise
            raise DepthLimitError(depth_message(max_depth, tolerance, "forward")) from None
        func.backward_phase = True
        x1, x2 = ys[-1].unbind(0)
        return x1 * 0.5 + x2 * 0.5

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, *, tolerance: float | None = None,
                max_depth: int | None = None, adjoint: bool | None = None, return_logits: bool = True,
                compute_loss: bool = True):
        """Token ids (B, T) or (T,) int -> ModelOutput(loss, logits (B, T, V) with return_logits,
        last_hidden_state (B, T, d)); hidden states (B, T, d) float -> their flow (B, T, d).

        tolerance, max_depth, adjoint override the model's defaults for this call."""
        if not isinstance(inputs, torch.Tensor):
            raise InputError(f"inputs must be a torch.Tensor of token ids (B, T) or hidden states (B, T, d), "
                             f"got {type(inputs).__name__}")
        if inputs.is_floating_point():
            if inputs.dim() != 3 or inputs.shape[-1] != self.config.d_model:
                raise InputError(f"hidden-state inputs must have shape (batch, seq, {self.config.d_model}), got "
                                 f"{tuple(inputs.shape)}")
            check_length(inputs.shape[1], self.config.max_seq_len, "inputs")
            return self.flow(inputs, tolerance, max_depth, adjoint)
        ids = self._check_ids(inputs, "inputs")
        if labels is not None:
            labels = self._check_ids(labels, "labels", allow_ignore=True)
            check_labels_shape(labels.shape, ids.shape)
        x = self.embed(ids)
        h = self.norm(self.flow(x, tolerance, max_depth, adjoint))
        loss = None
        if compute_loss:
            if labels is None:
                check_loss_length(ids.shape[1])
            targets = shift_targets(ids if labels is None else labels.to(torch.int64))
            loss = lm_loss(h, self.head.weight, targets, self.config.loss_chunk_size)
        logits = self.head(h) if return_logits else None
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=h)

    def _check_ids(self, ids: torch.Tensor, what: str, allow_ignore: bool = False) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"{what} must hold integer token ids or floating hidden states, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise InputError(f"{what} must have shape (batch, seq) or (seq,) with batch >= 1, got {tuple(ids.shape)}")
        check_length(ids.shape[1], self.config.max_seq_len, what)
        real = ids[ids != IGNORE_INDEX] if allow_ignore else ids
        if real.numel():
            check_id_range(int(real.min()), int(real.max()), self.config.vocab_size, what)
        return ids


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be True or False")
    return value
