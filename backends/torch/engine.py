"""The torch driver of the core's reversible sweep: one autograd node per layer.

Each ``reverse`` layer is a ``torch.autograd.Function`` whose inputs are its two streams and its parameters.
It saves nothing: its backward takes the layer's outputs from the segment it belongs to, rebuilds the
inputs with ``revnet_core.sweep.backward_step``, returns the parameters' gradients (so autograd accumulates
each one once: DDP and gradient accumulation see an ordinary backward) and leaves the rebuilt inputs as the
outputs of the layer below. Only the top outputs of a run of reverse layers are held after the forward.

The recompute replays what the forward saw: the autocast state and dtype, and the CPU/CUDA RNG state
before each block when the model draws random numbers (dropout).

Exact streams (``exact_streams``): floating-point ``(x + f) - f`` is not ``x``, and under autocast a rebuilt
stream off by one fp32 ulp flips bf16 roundings in the recomputed block, an error of a bf16 ulp that the
reconstruction of every layer below compounds. A stack of additive layers therefore runs in fixed point,
under every policy: its input and every block output are rounded to multiples of one power of two ``step``
(chosen from the input's magnitude, ``EXACT_HEADROOM_BITS`` below the float's range), so every sum is exact
and the rebuilt inputs are the forward's bit for bit at any depth. Gradients pass the rounding unchanged
(docs/numerics.md measures both).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from revnet_core import policies as policies_table
from revnet_core.couplings import BaseCoupling
from revnet_core.errors import ConfigError, DistributedError, ReversibilityError
from revnet_core.sweep import (LayerSpec, backward_step, forward_step, half_backward, has_capability,
                               pair_backward_step)

from .layers import PairCoupling, ReversibleLayer, _Checkpointed


@dataclass(frozen=True)
class AutocastState:
    """The autocast settings of one device type, to be replayed in the backward."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device_type: str) -> "AutocastState":
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def replay(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def capture_rng(device: torch.device):
    """(cpu_state, device_state) to replay a block's random draws."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay_rng(state, device: torch.device):
    """Run with the RNG as it was at ``capture_rng``; the global RNG is restored afterwards."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type=device.type):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class _Block:
    """A block as the core sees it: callable in the forward (recording RNG), differentiable in the backward."""

    def __init__(self, module: torch.nn.Module, autocast: AutocastState, record_rng: bool):
        self.module = module
        self.autocast = autocast
        self.record_rng = record_rng
        self.rng = None

    @property
    def params(self) -> list[torch.Tensor]:
        # Read at each use, never kept: under FSDP2 the gathered parameters exist only inside the layer's call.
        return [p for p in self.module.parameters() if p.requires_grad]

    def chunks(self, T: int) -> list[tuple]:
        """The sequence chunks a token-wise block runs over (its own ``chunks``), else the whole sequence."""
        if getattr(self.module, "tokenwise", False):
            return self.module.chunks(T)
        return [(..., slice(0, T), slice(None))]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.record_rng:
            self.rng = capture_rng(x.device)
        return self.module(x)

    def vjp(self, x: torch.Tensor, replay: bool = True):
        """(block(x), pullback) with the forward's autocast (and RNG, if ``replay``) replayed;
        pullback(ct) -> (dx, dparams)."""
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad(), self.autocast.replay(), replay_rng(self.rng if replay else None, x.device):
            out = self.module(xg)

        def pullback(ct: torch.Tensor):
            grads = torch.autograd.grad(out, [xg, *self.params], ct.to(out.dtype), allow_unused=True)
            return grads[0], list(grads[1:])

        return out.detach(), pullback


def _vjp(block: _Block, x: torch.Tensor):
    return block.vjp(x)


def _vjp_no_replay(block: _Block, x: torch.Tensor):
    return block.vjp(x, replay=False)


def _coupling_autodiff(coupling, x, fx, dy):
    """(dx, dfx) of a coupling that brings no vjp rule of its own, by torch autograd."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        fg = fx.detach().requires_grad_(True)
        return torch.autograd.grad(coupling.forward(xg, fg), (xg, fg), dy)


def _add_grads(total, part):
    if total is None:
        return part
    return [a if b is None else (b if a is None else a.add_(b)) for a, b in zip(total, part)]


def chunked_half(block: _Block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite: bool):
    """``revnet_core.sweep.half_backward`` over the block's sequence chunks, in the forward's order.

    Valid because the block and the coupling act token by token; each chunk's graph is freed before the
    next is built, and the chunks are the block's own, so the recompute is bit-identical. Requires
    ``overwrite`` (the engine owns y and dy): rebuilt streams and cotangents go back into their memory.
    """
    parts = block.chunks(u.shape[-2])
    if len(parts) == 1:
        return half_backward(block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite)
    assert overwrite, "chunked_half writes into y and dy, so the engine must own them"
    du = torch.empty_like(u)
    dparams = None
    with replay_rng(block.rng, u.device):  # one replay: the chunks draw in the forward's order
        for sl in parts:
            y_c, dy_c = y[sl], dy[sl]
            x_c, dx_c, du_c, dp_c = half_backward(block, coupling, u[sl], y_c, dy_c, _vjp_no_replay,
                                                  coupling_autodiff, True)
            if x_c.data_ptr() != y_c.data_ptr():
                y_c.copy_(x_c)
            if dx_c.data_ptr() != dy_c.data_ptr():
                dy_c.copy_(dx_c)
            du[sl] = du_c
            dparams = _add_grads(dparams, dp_c)
    return y, dy, du, dparams


def head_chunked_vjp(block: _Block, u, dy, settle):
    """``revnet_core.sweep.half_backward``'s ``additive_vjp`` for the F half: the block's own head-chunked
    backward (``AttentionBlock.additive_vjp``) where it has one and it applies: attention over more than one
    head chunk, no random draws to replay, and an eager module (a compiled forward would not be the function
    the eager chunks compute bit for bit). Otherwise NotImplemented, and the sweep takes the general path.
    """
    module = block.module
    fast = getattr(module, "additive_vjp", None)
    if (fast is None or block.record_rng or getattr(module, "_compiled_call_impl", None) is not None
            or len(module.head_chunks(u.shape[0], u.shape[-2])) == 1):
        return NotImplemented
    with block.autocast.replay():
        return fast(u, dy, block.params, settle)


class _KeptBlock(_Block):
    """The F block of a ``reverse_keep_attention`` layer: its forward keeps each head chunk's attention
    output and log-sum-exp (``AttentionBlock.forward_keeping``) until this layer's backward takes them."""

    kept: list | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fx, self.kept = self.module.forward_keeping(x)
        return fx


def _kept_vjp(block: _KeptBlock, u, dy, settle):
    kept, block.kept = block.kept, None  # consumed: a second backward must not find them
    if kept is None:
        raise ReversibilityError("a reverse_keep_attention layer's backward ran twice or before its forward")
    with block.autocast.replay():
        return block.module.additive_vjp(u, dy, block.params, settle, kept=kept)


def kept_half(block: _KeptBlock, coupling, u, y, dy, vjp, coupling_autodiff, overwrite: bool):
    """The F half of a ``reverse_keep_attention`` layer: the head-chunked pass, differentiating the kept
    attention instead of running it again (the coupling is additive: ``keep_refusal`` checked)."""
    return half_backward(block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite, additive_vjp=_kept_vjp)


def keep_refusal(layer) -> str | None:
    """Why ``layer`` cannot take ``reverse_keep_attention``, or None: it needs a ReversibleLayer with an
    additive attention coupling, softmax attention through the fused kernels, and no random draws."""
    if not isinstance(layer, ReversibleLayer):
        return f"{type(layer).__name__} is not a ReversibleLayer (a whole-pair coupling has no attention to keep)"
    if not has_capability(layer.attn.coupling, "additive"):
        return (f"the attention coupling {type(layer.attn.coupling).__name__} is not additive (its cotangent "
                "depends on the attention output)")
    block = layer.spec().f  # the block the engine runs (a padding mask binds one around the attention)
    if getattr(block, "key_mask", None) is not None:
        return "a padding mask is bound (the kept kernels take no mask)"
    if not hasattr(block, "forward_keeping"):
        return f"{type(block).__name__} has no kept-attention path (softmax AttentionBlock only)"
    if needs_rng(layer):
        return "the layer draws random numbers (dropout)"
    return block.keep_refusal()


def head_chunked_half(block: _Block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite: bool):
    """The F half: ``half_backward`` offered the head-chunked pass (taken for additive couplings) when the
    engine owns y and dy, whose memory the chunked pass rebuilds the stream in."""
    return half_backward(block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite,
                         additive_vjp=head_chunked_vjp if overwrite else None)


# Sums stay exact while the streams stay below 2**EXACT_HEADROOM_BITS times the stack's input
# (max|x|); the step is then 6e-5 to 1.2e-4 of it in fp32 (2**(10 - 24) of the power of two above max|x|),
# far under a bf16 rounding of a block's output (2**-9 of it). Past that range sums round as plain floats do.
EXACT_HEADROOM_BITS = 10
INVERSE_CHUNK = 1 << 22  # elements of one fixed-point temporary in the in-place inverse (16 MiB in fp32)
_EXACT = contextvars.ContextVar("revnet_exact_streams", default="auto")
_MONITOR = contextvars.ContextVar("revnet_drift_monitor", default=None)


@contextlib.contextmanager
def exact_streams(mode: bool | str):
    """Within the block, ``run_layers`` takes ``mode`` (True | False | "auto") as its ``exact_streams``."""
    token = _EXACT.set(mode)
    try:
        yield
    finally:
        _EXACT.reset(token)


@contextlib.contextmanager
def watching(monitor):
    """Within the block, each reverse segment ``run_layers`` builds keeps a copy of its bottom input and,
    once its backward has rebuilt that input, calls ``monitor.record(layers: range, drift: float)`` with
    max |rebuilt - kept| / max|kept| (``revnet_torch.drift``)."""
    token = _MONITOR.set(monitor)
    try:
        yield
    finally:
        _MONITOR.reset(token)


def exact_wanted(mode: bool | str, x: torch.Tensor) -> bool:
    """``exact_streams`` resolved: "auto" means on where blocks run under autocast, in a float narrower
    than the streams (where the drift is a bf16/fp16 rounding, not an fp32 one)."""
    if mode != "auto":
        return bool(mode)
    dev = x.device.type
    return (torch.is_autocast_enabled(dev)
            and torch.finfo(torch.get_autocast_dtype(dev)).bits < torch.finfo(x.dtype).bits)


def fixed_point_step(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The power of two every stream value of an exact stack is a multiple of: a 0-d tensor in the stream
    dtype, 2**(e + EXACT_HEADROOM_BITS - mantissa bits) with max|x1|, |x2| < 2**e (no host sync)."""
    amax = torch.maximum(_amax(x1), _amax(x2))
    _, e = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), e + EXACT_HEADROOM_BITS - _precision(x1.dtype))


def _precision(dtype: torch.dtype) -> int:
    """Significand bits of a float dtype, the implicit one included (24 for float32)."""
    return 1 - int(math.log2(torch.finfo(dtype).eps))


def _amax(x: torch.Tensor) -> torch.Tensor:
    """max|x| as a 0-d tensor, without an |x|-sized temporary."""
    if not x.numel():
        return x.new_zeros(())
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(-lo, hi)


def snap(x: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to the nearest multiple of ``step`` (ties to even), as a new tensor of ``dtype``: exact
    scalings by a power of two around one rounding."""
    return x.to(dtype, copy=True).div_(step).round_().mul_(step)


class _Snap(torch.autograd.Function):
    """``snap`` with the identity as its derivative (the rounding is not differentiated)."""

    @staticmethod
    def forward(ctx, x, step):
        return snap(x, step, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _FixedAdd(torch.autograd.Function):
    """``x + snap(fx)`` in x's dtype; its derivative is the additive coupling's (dy to both), saving nothing."""

    @staticmethod
    def forward(ctx, x, fx, step):
        return snap(fx, step, x.dtype).add_(x)  # the new tensor becomes y: one allocation, like x + fx

    @staticmethod
    def backward(ctx, dy):
        return dy, dy, None


class FixedPointAdditive(BaseCoupling):
    """``y = x + snap(fx)`` with x on the grid of ``step``: the sum is exact while |y| < 2**mantissa * step,
    so ``inverse`` gives x back bit for bit. Cotangents pass unchanged (the gradient is the additive
    coupling's), in every policy: store, checkpoint and reverse compute the same function."""

    name = "additive"
    capabilities = frozenset({"additive"})

    def __init__(self, step: torch.Tensor):
        self.step = step

    def forward(self, x, fx):
        return _FixedAdd.apply(x, fx, self.step)

    def inverse(self, y, fx):
        return y - snap(fx, self.step, y.dtype)

    def inverse_(self, y, fx):
        # over sequence chunks: the rounded copy of fx is a temporary, bounded to INVERSE_CHUNK elements
        T = y.shape[-2]
        rows = max(1, INVERSE_CHUNK // max(1, y[..., :1, :].numel()))
        for s in range(0, T, rows):
            y[..., s:s + rows, :] -= snap(fx[..., s:s + rows, :], self.step, y.dtype)
        return y

    def vjp(self, x, fx, dy):
        return dy, dy


def exact_spec(layer: ReversibleLayer, step: torch.Tensor, recompute: str = "") -> LayerSpec:
    """The layer in fixed point (``ReversibleLayer.forward``'s spec with ``FixedPointAdditive`` couplings);
    ``recompute`` ("attention" | "ffn") runs that block under torch.utils.checkpoint."""
    spec = layer.spec()
    f, g = spec.f, spec.g
    if recompute == "attention":
        f = _Checkpointed(f)
    elif recompute == "ffn":
        g = _Checkpointed(g)
    coupling = FixedPointAdditive(step)
    return LayerSpec(f, g, coupling, coupling)


def _exact_layer_forward(layer: ReversibleLayer, step: torch.Tensor, x1, x2):
    return forward_step(x1, x2, exact_spec(layer, step))


def _spec_forward(layer: ReversibleLayer, step: torch.Tensor, recompute: str, x1, x2):
    return forward_step(x1, x2, exact_spec(layer, step, recompute))


# The engine runs a layer's blocks itself, so hooks a wrapper put on the layer's own forward never fire. A
# wrapper that needs them (revnet_torch.distributed: FSDP2 gathers the layer's parameters before its forward
# and reduce-scatters their gradients after its backward) sets this attribute on the layer: a callable
# ``(fn, x1, x2) -> fn(x1, x2)`` that runs fn as the layer's forward, inside its hooks.
LAYER_CALL = "revnet_layer_call"


def in_layer(layer, fn, x1, x2):
    """fn(x1, x2) as ``layer``'s forward: through the layer's ``LAYER_CALL`` hook when it has one."""
    call = getattr(layer, LAYER_CALL, None)
    return fn(x1, x2) if call is None else call(fn, x1, x2)


def _reverse_node(run: "_Run", x1, x2):
    """The layer's autograd node, its parameters read now (inside ``in_layer``: gathered, under FSDP2)."""
    params = run.params
    dtensor = sys.modules.get("torch.distributed.tensor")  # absent: no parameter can be a DTensor
    if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in params):
        raise DistributedError(
            f"layer {run.index}: its parameters are sharded (DTensor) where its reversible node runs, so their "
            "gradients would never arrive; a wrapper sharded the layer (or a block inside it) without gathering "
            "it around the node. Shard with revnet_torch.distributed.shard_model (one fully_shard per layer)")
    return _ReverseLayerFn.apply(x1, x2, run, *params)


class Segment:
    """A run of consecutive ``reverse`` layers of one forward pass: holds the outputs of the layer whose
    backward runs next (the top layer's after the forward, then each rebuilt input in turn).

    It also tracks which buffers the engine owns, so the backward can rebuild streams and accumulate
    cotangents in place: the rebuilt inputs and the cotangents it hands down are its own; the top outputs
    are its own only when the caller says nothing else keeps them (``private_outputs``).
    """

    def __init__(self):
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.owner: int | None = None  # index of the layer that produced ``outputs``
        self.outputs_owned = False
        self.top_grads_private = False  # the caller's graph hands the top cotangents to us alone
        self.handed_down: tuple[int, int] | None = None  # data pointers of the cotangents we returned
        self.layers = range(0)  # the indices of its layers
        self.grid: torch.Tensor | None = None  # exact streams: the fixed-point step (None: plain floats)
        self.peak: torch.Tensor | None = None  # exact streams: max |stream| its forward produced
        self.monitor = None  # a drift monitor watching this forward (revnet_torch.drift), or None
        self.truth: tuple[torch.Tensor, torch.Tensor] | None = None  # the bottom input, kept for the monitor

    def check_range(self) -> None:
        """Exact streams: warn once per backward if a stream left the fixed-point range (sums rounded)."""
        if self.peak is not None and bool(self.peak >= self.grid * 2.0 ** _precision(self.peak.dtype)):
            warnings.warn(f"exact streams: layers {self.layers.start}-{self.layers.stop - 1} grew past "
                          f"2**{EXACT_HEADROOM_BITS} times the stack's input, where fixed-point sums round; this "
                          "backward rebuilt them like plain floats", RuntimeWarning, stacklevel=4)
        self.peak = None

    def owned_grads(self, dy1: torch.Tensor, dy2: torch.Tensor) -> bool:
        ptrs = (dy1.data_ptr(), dy2.data_ptr())
        if ptrs[0] == ptrs[1]:  # one buffer for both (e.g. the backward of y1 + y2): never ours to overwrite
            return False
        if self.top_grads_private:
            self.top_grads_private = False  # only the first (top) layer's cotangents come from the caller
            return True
        return ptrs == self.handed_down


class _ReverseLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, run: "_Run", *params):
        ctx.run = run
        return run.forward(x1, x2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy1, dy2):
        dx1, dx2, dparams = ctx.run.backward(dy1, dy2)
        return dx1, dx2, None, *dparams


class _Run:
    """What one reverse layer remembers between its forward and backward: no tensors, only its place in
    the segment (and RNG states in its blocks). Subclasses say how to step forward and backward."""

    params: list[torch.Tensor]

    def __init__(self, index: int, segment: Segment, bottom: bool):
        self.index = index
        self.segment = segment
        self.bottom = bottom

    def forward(self, x1, x2):
        seg = self.segment
        if seg.monitor is not None and self.bottom:  # the truth the rebuilt bottom input is compared with
            t1 = x1.detach().clone()
            seg.truth = (t1, t1 if x2 is x1 else x2.detach().clone())
        y1, y2 = self.step(x1, x2)
        if seg.grid is not None:
            top = torch.maximum(_amax(y1), _amax(y2))
            seg.peak = top if seg.peak is None else torch.maximum(seg.peak, top)
        seg.outputs = (y1.detach(), y2.detach())  # detached: no cycle through our own graph node
        seg.owner = self.index
        return y1, y2

    def backward(self, dy1, dy2):
        seg = self.segment
        if seg.outputs is None or seg.owner != self.index:
            raise ReversibilityError(
                "a reversible layer's backward ran twice or out of order: the backward rebuilds each layer's "
                "inputs once from its outputs and consumes them, so retain_graph=True, double backward and "
                "partial backward are not supported; run the forward again instead"
            )
        y1, y2 = seg.outputs
        seg.outputs = None
        if seg.peak is not None:
            seg.check_range()
        x1, x2, dx1, dx2, dparams = self.step_back(y1, y2, dy1, dy2, seg)
        del y1, y2, dy1, dy2
        if self.bottom and seg.truth is not None:
            t1, t2 = seg.truth
            seg.truth = None
            scale = torch.maximum(_amax(t1), _amax(t2)).clamp_min(torch.finfo(t1.dtype).tiny)
            drift = torch.maximum(_amax(x1 - t1), _amax(x2 - t2)) / scale
            seg.monitor.record(seg.layers, float(drift))
        if not self.bottom:
            seg.outputs, seg.owner, seg.outputs_owned = (x1, x2), self.index - 1, True
            seg.handed_down = (dx1.data_ptr(), dx2.data_ptr())
        return dx1, dx2, dparams


class _LayerRun(_Run):
    """A ``ReversibleLayer``: the core's steps over its F and G blocks, streams rebuilt in place."""

    def __init__(self, layer: ReversibleLayer, index: int, segment: Segment, bottom: bool, record_rng: bool,
                 autocast: AutocastState, keep_attention: bool = False):
        super().__init__(index, segment, bottom)
        spec = layer.spec()
        self.f = (_KeptBlock if keep_attention else _Block)(spec.f, autocast, record_rng)
        self.f_half = kept_half if keep_attention else head_chunked_half
        self.g = _Block(spec.g, autocast, record_rng)
        cf, cg = spec.cf, spec.cg
        if segment.grid is not None:
            cf = cg = FixedPointAdditive(segment.grid)
        self.spec = LayerSpec(self.f, self.g, cf, cg)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.f.params + self.g.params  # read now, like _Block.params

    def step(self, x1, x2):
        return forward_step(x1, x2, self.spec)

    def step_back(self, y1, y2, dy1, dy2, seg: Segment):
        if not seg.outputs_owned:  # someone else may still read them: work on copies
            y1, y2 = y1.clone(), y2.clone()
        if not seg.owned_grads(dy1, dy2):
            dy1, dy2 = dy1.clone(), dy2.clone()
        with torch.no_grad():
            x1, x2, dx1, dx2, dpf, dpg = backward_step(y1, y2, dy1, dy2, self.spec, _vjp, _coupling_autodiff,
                                                       overwrite=True, g_half=chunked_half,
                                                       f_half=self.f_half)
        return x1, x2, dx1, dx2, dpf + dpg


class _PairRun(_Run):
    """A whole-pair coupling (``PairCoupling``): rebuilt by its own ``inverse``, differentiated by re-running
    its ``forward``; both under the forward's autocast and RNG state."""

    def __init__(self, pair: PairCoupling, index: int, segment: Segment, bottom: bool, record_rng: bool,
                 autocast: AutocastState):
        super().__init__(index, segment, bottom)
        self.pair = pair
        self.autocast = autocast
        self.record_rng = record_rng
        self.rng = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.pair.parameters() if p.requires_grad]  # read now, like _Block.params

    def step(self, x1, x2):
        if self.record_rng:
            self.rng = capture_rng(x1.device)
        return self.pair(x1, x2)

    def step_back(self, y1, y2, dy1, dy2, seg: Segment):
        def inverse(pair, a, b):
            with torch.no_grad(), _replaying(self.autocast, self.rng, a.device):
                return pair.inverse(a, b)

        def vjp2(pair, a, b):
            ag, bg = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            with torch.enable_grad(), _replaying(self.autocast, self.rng, a.device):
                out = pair(ag, bg)

            def pullback(cts):
                grads = torch.autograd.grad(out, [ag, bg, *self.params], cts, allow_unused=True)
                dx1, dx2 = (g if g is not None else torch.zeros_like(x) for g, x in zip(grads[:2], (ag, bg)))
                return dx1, dx2, list(grads[2:])

            return out, pullback

        return pair_backward_step(y1, y2, dy1, dy2, self.pair, inverse, vjp2)


@contextlib.contextmanager
def _replaying(autocast: AutocastState, rng, device: torch.device):
    with autocast.replay(), replay_rng(rng, device):
        yield


def needs_rng(module: torch.nn.Module) -> bool:
    """Whether the module draws random numbers in this mode (then the recompute must replay them)."""
    if not module.training:
        return False
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        if getattr(m, "attention_dropout", 0.0) > 0:
            return True
    return False


def exact_layer(layer) -> bool:
    """Whether a layer can run in fixed point: a ReversibleLayer whose two couplings are additive."""
    return isinstance(layer, ReversibleLayer) and all(
        has_capability(c, "additive") for c in (layer.attn.coupling, layer.ffn.coupling))


def run_layers(layers: Sequence[ReversibleLayer], policies: Sequence[str], x1: torch.Tensor, x2: torch.Tensor,
               *, private_outputs: bool = False, exact_streams: bool | str | None = None):
    """Run the stack: (x1, x2) -> (y1, y2), each (B, T, d), one policy per layer.

    Every policy of ``revnet_core.policies`` is implemented here: reverse: no activations kept (rebuilt from
    outputs); reverse_keep_attention: reverse, but the attention kernel's output and log-sum-exp are kept so
    the backward does not run the kernel again (``kept_attention``); store: plain autograd; checkpoint: keeps
    the layer's inputs and recomputes it (torch.utils.checkpoint, which replays autocast and RNG itself); recompute_attention / recompute_ffn: a
    stored layer whose attention (FFN) block alone runs under torch.utils.checkpoint.
    ``private_outputs``: the caller keeps no
    reference to (y1, y2) or to their cotangents, so the backward may rebuild streams and accumulate
    cotangents in their memory. ``exact_streams`` (True | False | "auto": on under autocast; None: the
    ``exact_streams`` context's, "auto" outside one): a stack of additive layers runs in fixed point under
    every policy (the module docstring): the same function whatever the policies, and reverse layers
    rebuild their inputs bit for bit.
    """
    grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or any(
        p.requires_grad for layer in layers for p in layer.parameters()))
    autocast = AutocastState.capture(x1.device.type)
    grid = None
    mode = _EXACT.get() if exact_streams is None else exact_streams
    if exact_wanted(mode, x1) and all(map(exact_layer, layers)):
        grid = fixed_point_step(x1, x2)
        x1s = _Snap.apply(x1, grid)  # onto the grid: new tensors, the caller's stay as they are
        x1, x2 = x1s, (x1s if x2 is x1 else _Snap.apply(x2, grid))
        del x1s  # the copies live only as long as the layers need them
    segment = None
    for i, (layer, policy) in enumerate(zip(layers, policies)):
        if policy in policies_table.REVERSING and grad:
            if segment is None:
                segment, bottom = Segment(), True
                end = next((j for j in range(i, len(policies)) if policies[j] not in policies_table.REVERSING),
                           len(policies))
                segment.layers, segment.grid, segment.monitor = range(i, end), grid, _MONITOR.get()
            else:
                bottom = False
            if policy in policies_table.KEEPING_ATTENTION:
                reason = keep_refusal(layer)
                if reason is not None:
                    raise ConfigError(f"layer {i}: policy={policy!r} cannot run: {reason}; use 'reverse'")
                run = _LayerRun(layer, i, segment, bottom, False, autocast, keep_attention=True)
            else:
                kind = _PairRun if isinstance(layer, PairCoupling) else _LayerRun
                run = kind(layer, i, segment, bottom, needs_rng(layer), autocast)
            x1, x2 = in_layer(layer, functools.partial(_reverse_node, run), x1, x2)
            continue
        segment = None
        recomputes = policies_table.BY_NAME[policies_table.check(policy)].recomputes
        if recomputes and recomputes != "layer" and not isinstance(layer, ReversibleLayer):
            raise ConfigError(f"layer {i}: policy={policy!r} recomputes one block of a ReversibleLayer; "
                              f"{type(layer).__name__} has no {recomputes} block (use 'checkpoint')")
        if recomputes == "layer" and grad:  # checkpoint
            if grid is None:
                x1, x2 = checkpoint(layer, x1, x2, use_reentrant=False)
            else:
                # the step in a closure, not an argument: checkpoint would keep it as a saved input
                step = functools.partial(_exact_layer_forward, layer, grid)
                x1, x2 = in_layer(layer, functools.partial(checkpoint, step, use_reentrant=False), x1, x2)
        elif grid is not None:  # store, or a block recompute (recompute_attention/_ffn)
            block = recomputes if grad and recomputes != "layer" else ""
            x1, x2 = in_layer(layer, functools.partial(_spec_forward, layer, grid, block), x1, x2)
        elif recomputes and recomputes != "layer":
            x1, x2 = layer(x1, x2, recompute=recomputes) if grad else layer(x1, x2)
        else:
            x1, x2 = layer(x1, x2)
    if segment is not None:
        segment.outputs_owned = segment.top_grads_private = private_outputs
    return x1, x2
