"""The numpy driver of the core's reversible sweep: a loop over layers, forward then backward.

``forward`` runs ``revnet_core.sweep.forward_step`` layer by layer and returns a ``Tape``: for a ``reverse``
layer nothing, for a ``store`` layer its inputs, block outputs and the blocks' pullbacks (whose closures hold
the residuals). ``Tape.backward`` walks the layers down: a ``reverse`` layer rebuilds its inputs from its
outputs with ``backward_step`` (the G half over the FFN's own sequence chunks, ``chunked_g_half``), a
``store`` layer pulls its cotangents back through what it kept. After the forward a run of ``reverse``
layers holds only the top outputs, so memory is flat in depth (``memory.live_array_bytes`` measures it).

In place only in memory the engine owns: the backward's carry (the rebuilt streams and the cotangents it
made) is overwritten; the outputs handed to the caller are copied first unless the caller says they are
private (the model does).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from revnet_core import policies as policy_table
from revnet_core.errors import ConfigError, ReversibilityError
from revnet_core.sweep import backward_step, coupling_vjp, half_backward

from .blocks import chunk_slices
from .layers import Layers, coupling_autodiff

# What this engine builds: layers that keep everything, and layers rebuilt by inversion; none that recompute
# from kept inputs (checkpoint, the block-level recomputes). Read from the core's table, not listed here.
SUPPORTED = tuple(p.name for p in policy_table.TABLE
                  if (p.recomputes == "" or p.needs_inverse) and not p.keeps_attention)  # keeping: torch's


def check_policies(policies, num_layers: int) -> tuple[str, ...]:
    """One policy per layer from the core's table; ConfigError for a name this backend does not build."""
    out = policy_table.check_all(policies, num_layers)
    for p in out:
        if p not in SUPPORTED:
            raise ConfigError(f"policy={p!r} is not built in the numba backend; it supports {list(SUPPORTED)}")
    return out


def block_vjp(block, x):
    return block.vjp(x)


def chunked_g_half(block, coupling, u, y, dy, vjp, coupling_autodiff=None, overwrite=False):
    """``revnet_core.sweep.half_backward`` of the FFN over its own sequence chunks, in the forward's order.

    Valid because the FFN and the couplings act token by token: only one chunk's (t, d_ff) residuals exist at
    a time. The chunks' x and dx are written into y and dy (the caller owns them: ``overwrite``), views of
    which each chunk receives. Returns (x, dx, du, dparams) like ``half_backward``.
    """
    parts = chunk_slices(u.shape[1], block.cfg.ffn_chunk_size)
    if len(parts) == 1 or not overwrite:
        return half_backward(block, coupling, u, y, dy, vjp, coupling_autodiff, overwrite)
    sub = block.chunk()
    du = np.empty(u.shape, u.dtype)
    total: dict = {}
    for sl in parts:
        y_c, dy_c = y[:, sl], dy[:, sl]
        x_c, dx_c, du[:, sl], dp = half_backward(sub, coupling, u[:, sl], y_c, dy_c, vjp, coupling_autodiff,
                                                 True)
        if x_c is not y_c:  # a coupling whose inverse_ is not in place
            y_c[...] = x_c
        if dx_c is not dy_c:
            dy_c[...] = dx_c
        for name, value in dp.items():
            total[name] = total[name] + value if name in total else value
    return y, dy, du, total


class Tape:
    """What a forward left for its backward: per layer None (``reverse``) or a ``store`` layer's residuals."""

    def __init__(self, layers: Layers, policies: Sequence[str], kept: list, y1, y2):
        self.layers, self.policies, self.kept = layers, tuple(policies), kept
        self.outputs = (y1, y2)

    def backward(self, dy1, dy2, *, private_outputs: bool = False):
        """Cotangents of the stack's outputs (B, T, d) each -> (dx1, dx2, grads), grads {canonical name: array}
        for every layer parameter. Runs once: the streams are rebuilt and consumed."""
        if self.outputs is None:
            raise ReversibilityError("this forward's backward already ran: each layer's inputs are rebuilt once "
                                     "and consumed (run the forward again)")
        y1, y2 = self.outputs
        self.outputs = None
        if not private_outputs:
            y1, y2 = y1.copy(), y2.copy()
        # The carry is ours from here on (``overwrite``): fresh cotangent buffers, never the caller's.
        dy1, dy2 = np.array(dy1, y1.dtype), np.array(dy2, y2.dtype)
        grads: dict = {}
        for i in reversed(range(len(self.policies))):
            spec = self.layers.spec(i)
            kept, self.kept[i] = self.kept[i], None
            if kept is None:
                y1, y2, dy1, dy2, dpf, dpg = backward_step(y1, y2, dy1, dy2, spec, block_vjp, coupling_autodiff,
                                                           overwrite=True, g_half=chunked_g_half)
            else:
                y1, y2, dy1, dy2, dpf, dpg = _stored_backward(spec, kept, dy1, dy2)
            for half, dp in (("attn", dpf), ("ffn", dpg)):
                pre = self.layers.prefix(i, half)
                grads.update({pre + k: v for k, v in dp.items()})
        return dy1, dy2, grads


def _stored_backward(spec, kept, dy1, dy2):
    """A ``store`` layer's backward from what its forward kept: (x1, x2, dx1, dx2, dparams_f, dparams_g)."""
    x1, x2, fx, gx, pull_f, pull_g = kept
    dx2, dgx = coupling_vjp(spec.cg, x2, gx, dy2, coupling_autodiff)
    dy1_g, dpg = pull_g(dgx)
    dx1, dfx = coupling_vjp(spec.cf, x1, fx, dy1 + dy1_g.astype(dy1.dtype, copy=False), coupling_autodiff)
    dx2_f, dpf = pull_f(dfx)
    return x1, x2, np.array(dx1, dy1.dtype), dx2 + dx2_f.astype(dx2.dtype, copy=False), dpf, dpg


def forward(layers: Layers, policies: Sequence[str], x1, x2, *, keep: bool = True):
    """Run the stack: (x1, x2) -> (y1, y2, tape), streams (B, T, d). ``keep=False``: no backward will be
    asked (no tape, nothing kept by any layer)."""
    kept: list = []
    for i, policy in enumerate(policies):
        spec = layers.spec(i)
        if policy == "store" and keep:
            fx, pull_f = spec.f.vjp(x2)
            y1 = spec.cf.forward(x1, fx)
            gx, pull_g = spec.g.vjp(y1)
            y2 = spec.cg.forward(x2, gx)
            kept.append((x1, x2, fx, gx, pull_f, pull_g))
        else:
            y1 = spec.cf.forward(x1, spec.f(x2))
            y2 = spec.cg.forward(x2, spec.g(y1))
            kept.append(None)
        x1, x2 = y1, y2
    return x1, x2, (Tape(layers, policies, kept, x1, x2) if keep else None)


def run_layers(layers: Layers, policies: Sequence[str], x1, x2):
    """(x1, x2) -> (y1, y2), no backward (the forward of ``model.loss``)."""
    y1, y2, _ = forward(layers, policies, x1, x2, keep=False)
    return y1, y2
