"""The JAX driver of the core's reversible sweep: one ``custom_vjp`` around a whole ``lax.scan`` of layers.

A ``custom_vjp`` per layer inside a scan would make the scan stack every layer's residuals; wrapping the
whole scan instead keeps only the top outputs. Its backward is a second, reversed scan whose carry is
(y1, y2, dy1, dy2): each step rebuilds the layer's inputs with ``revnet_core.sweep.backward_step`` and emits
the layer's parameter cotangents as the scan's stacked output, so nothing per layer outlives its step.

Runs of layers with the same policy become one scan each (a segment):

* ``reverse``: the reversible scan above;
* ``store``: plain autodiff through the scan (every layer's residuals kept);
* ``checkpoint``: ``jax.checkpoint`` around each layer (the layer's inputs kept, the layer recomputed).

Dropout is driven by explicit keys, one per layer, so the recompute draws exactly the forward's masks.

A layer is either an ordinary one (``LayerStatic``: two blocks and their couplings, parameters stacked on a
leading axis) or a whole-pair coupling (``PairCoupling``, which owns its functions): its backward rebuilds
the inputs with the pair's ``inverse`` and re-runs its ``forward`` for the VJP
(``revnet_core.sweep.pair_backward_step``). ``run_sequence`` stacks both kinds; a reversible segment of it is
still one ``custom_vjp``, over one scan per run of the same layer object.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from revnet_core import policies as policy_table
from revnet_core.errors import ConfigError
from revnet_core.sweep import backward_step, forward_step, half_backward, pair_backward_step

from .blocks import chunk_key, ffn_chunks, ffn_transform
from .layers import Block, LayerStatic, PairCoupling, block_vjp, coupling_autodiff, layer_spec


def loop(body: Callable, carry, xs, *, reverse: bool = False, use_scan: bool = True, length: int | None = None):
    """``lax.scan(body, carry, xs, reverse=reverse, length=length)``, or the same as an unrolled Python loop.
    ``length`` is needed only when ``xs`` has no leaves (a parameterless pair coupling without dropout)."""
    if use_scan:
        return jax.lax.scan(body, carry, xs, reverse=reverse, length=length)
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    ys = [None] * n
    for i in (reversed(range(n)) if reverse else range(n)):
        carry, ys[i] = body(carry, jax.tree.map(lambda a: a[i], xs))
    if ys[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def segments(policies: Sequence[str]) -> list[tuple[str, int, int]]:
    """Maximal runs of equal policy: [(policy, start, stop), ...]."""
    out: list[tuple[str, int, int]] = []
    for i, p in enumerate(policies):
        if out and out[-1][0] == p:
            out[-1] = (p, out[-1][1], i + 1)
        else:
            out.append((p, i, i + 1))
    return out


Layer = LayerStatic | PairCoupling


def layer_step(layer: Layer, p, key, x1, x2):
    """One layer's forward (x1, x2) -> (y1, y2), each (B, T, d); ``p`` its (unstacked) parameters."""
    if isinstance(layer, PairCoupling):
        return layer.forward(p, x1, x2, key)
    return forward_step(x1, x2, layer_spec(layer, p, key))


def _pair_vjp(pair: PairCoupling, p, key, x1, x2):
    """The pair's forward re-run for its VJP: ((y1, y2), pullback((dy1, dy2)) -> (dx1, dx2, dparams))."""
    out, pull = jax.vjp(lambda a, b, q: pair.forward(q, a, b, key), x1, x2, p)

    def pullback(cts):
        return pull(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))

    return out, pullback


def layer_step_back(layer: Layer, p, key, y1, y2, dy1, dy2):
    """One layer of the reversible backward: (x1, x2, dx1, dx2, dparams) from the outputs and cotangents."""
    if isinstance(layer, PairCoupling):
        return pair_backward_step(y1, y2, dy1, dy2, layer, lambda pair, a, b: pair.inverse(p, a, b, key),
                                  lambda pair, a, b: _pair_vjp(pair, p, key, a, b))
    x1, x2, dx1, dx2, dpf, dpg = backward_step(y1, y2, dy1, dy2, layer_spec(layer, p, key), block_vjp,
                                               coupling_autodiff, g_half=chunked_g_half)
    return x1, x2, dx1, dx2, {"attn": dpf, "ffn": dpg}


def _num(params, keys) -> int:
    leaves = jax.tree.leaves((params, keys))
    return leaves[0].shape[0] if leaves else 0


def _forward_scan(static: Layer, use_scan: bool, params, keys, x1, x2, layer_fn=None, length=None):
    def step(carry, xs):
        p, k = xs
        return layer_step(static, p, k, *carry), None

    (y1, y2), _ = loop(layer_fn or step, (x1, x2), (params, keys), use_scan=use_scan, length=length)
    return y1, y2


def chunked_g_half(block: Block, coupling, u, y, dy, vjp, coupling_autodiff=None, overwrite=False):
    """``revnet_core.sweep.half_backward`` of the FFN over its own sequence chunks, in the forward's order.

    Valid because the FFN and the couplings act token by token; only one chunk's (t, d_ff) residuals exist
    at a time, and each chunk is recomputed with its forward key, so the recompute matches the forward.
    Returns (x, dx, du, dparams) like ``half_backward``.
    """
    T = u.shape[1]
    step, n = ffn_chunks(T, block.cfg.ffn_chunk_size)
    if n == 1 and step == T:
        return half_backward(block, coupling, u, y, dy, vjp, coupling_autodiff)

    def chunk(i, u_c, y_c, dy_c):
        sub = Block(ffn_transform, block.params, chunk_key(block.key, i), block.cfg)
        return half_backward(sub, coupling, u_c, y_c, dy_c, vjp, coupling_autodiff)

    def body(dp, i):
        x_c, dx_c, du_c, dp_c = chunk(i, *(jax.lax.dynamic_slice_in_dim(a, i * step, step, axis=1)
                                           for a in (u, y, dy)))
        return jax.tree.map(jnp.add, dp, dp_c), (x_c, dx_c, du_c)

    dp0 = jax.tree.map(jnp.zeros_like, block.params)
    dp, parts = jax.lax.scan(body, dp0, jnp.arange(n))  # each part (n, B, step, d)
    x, dx, du = (jnp.moveaxis(a, 0, 1).reshape(a.shape[1], n * step, *a.shape[3:]) for a in parts)
    if n * step < T:
        x_t, dx_t, du_t, dp_t = chunk(n, u[:, n * step:], y[:, n * step:], dy[:, n * step:])
        x, dx, du = (jnp.concatenate(pair, axis=1) for pair in ((x, x_t), (dx, dx_t), (du, du_t)))
        dp = jax.tree.map(jnp.add, dp, dp_t)
    return x, dx, du, dp


@functools.lru_cache(maxsize=None)
def reversible_groups(layers: tuple, lengths: tuple, use_scan: bool = True) -> Callable:
    """``run(params, keys, x1, x2) -> (y1, y2)`` over runs of layers: run i is ``lengths[i]`` layers of
    ``layers[i]`` (a ``LayerStatic`` or a ``PairCoupling``), ``params[i]`` / ``keys[i]`` stacked (n_i, ...)
    (keys[i] None: no dropout); streams (B, T, d). Its VJP rebuilds every layer's inputs from its outputs:
    the forward keeps the parameters and the top outputs only, the backward is one reversed scan per run."""

    def forward(params, keys, x1, x2):
        for layer, n, p, k in zip(layers, lengths, params, keys):
            x1, x2 = _forward_scan(layer, use_scan, p, k, x1, x2, length=n)
        return x1, x2

    @jax.custom_vjp
    def run(params, keys, x1, x2):
        return forward(params, keys, x1, x2)

    def fwd(params, keys, x1, x2):
        y1, y2 = forward(params, keys, x1, x2)
        return (y1, y2), (params, keys, y1, y2)  # params and outputs only: nothing per layer

    def bwd(res, cts):
        params, keys, y1, y2 = res
        carry = (y1, y2, *cts)
        dparams = [None] * len(layers)
        for i in reversed(range(len(layers))):
            def step(carry, xs, layer=layers[i]):
                p, k = xs
                x1, x2, dx1, dx2, dp = layer_step_back(layer, p, k, *carry)
                return (x1, x2, dx1.astype(y1.dtype), dx2.astype(y2.dtype)), dp

            carry, dparams[i] = loop(step, carry, (params[i], keys[i]), reverse=True, use_scan=use_scan,
                                     length=lengths[i])
        return tuple(dparams), None, carry[2], carry[3]

    run.defvjp(fwd, bwd)
    return run


def reversible_stack(static: LayerStatic, use_scan: bool = True) -> Callable:
    """``run(params, keys, x1, x2) -> (y1, y2)`` for stacked layer params (L, ...), keys (L, ...) or None and
    streams (B, T, d); its VJP rebuilds every layer's inputs from its outputs instead of storing them."""

    def run(params, keys, x1, x2):
        n = _num(params, keys)
        return reversible_groups((static,), (n,), use_scan)((params,), (keys,), x1, x2)

    return run


@functools.lru_cache(maxsize=None)
def offloaded_stack(static: LayerStatic, use_scan: bool = True) -> Callable:
    """``run(params, keys, x1, x2) -> (y1, y2)`` that checkpoints every layer and keeps each layer's inputs
    in host memory (``jax.memory.Space.Host``) between the forward and the backward, which recomputes the
    layer from them: the checkpoint + offload baseline, GPU memory flat in depth at the price of host memory
    and transfers. Only for platforms with a host memory space."""

    def step(carry, xs):
        p, k = xs
        return forward_step(*carry, layer_spec(static, p, k))

    @jax.custom_vjp
    def run(params, keys, x1, x2):
        return _forward_scan(static, use_scan, params, keys, x1, x2)

    def fwd(params, keys, x1, x2):
        def body(carry, xs):
            host = tuple(jax.device_put(a, jax.memory.Space.Host) for a in carry)
            return step(carry, xs), host

        (y1, y2), inputs = loop(body, (x1, x2), (params, keys), use_scan=use_scan)
        return (y1, y2), (params, keys, inputs)

    def bwd(res, cts):
        params, keys, inputs = res

        def body(dy, xs):
            p, k, host = xs
            x = tuple(jax.device_put(a, jax.memory.Space.Device) for a in host)
            _, pull = jax.vjp(lambda p_, x_: step(x_, (p_, k)), p, x)
            dp, dx = pull(dy)
            return dx, dp

        (dx1, dx2), dparams = loop(body, tuple(cts), (params, keys, inputs), reverse=True, use_scan=use_scan)
        return dparams, None, dx1, dx2

    run.defvjp(fwd, bwd)
    return run


def _checkpoint_step(static: Layer, use_scan: bool, remat_policy=None):
    def layer(carry, xs):
        p, k = xs
        return layer_step(static, p, k, *carry), None

    # Inside a scan the loop boundary already stops XLA from merging forward and recompute.
    return jax.checkpoint(layer, policy=remat_policy, prevent_cse=not use_scan)


def _slice(tree, start: int, stop: int, total: int):
    if start == 0 and stop == total:
        return tree
    return jax.tree.map(lambda a: a[start:stop], tree)


def run_layers(static: LayerStatic, policies: Sequence[str], params, keys, x1, x2, *, use_scan: bool = True,
               remat_policy: Any = None, offload: bool = False):
    """Run the stack: (x1, x2) -> (y1, y2), each (B, T, d), with one policy per layer.

    ``params``: stacked layer parameters (L, ...); ``keys``: (L, ...) PRNG keys or None (no dropout).
    ``checkpoint`` layers take ``remat_policy`` (a ``jax.checkpoint_policies`` entry; None saves nothing but
    the layer's inputs); ``offload=True`` keeps their inputs in host memory instead (``offloaded_stack``).
    ``JAXMemoryScheduler`` sets both.
    """
    L = len(policies)
    for policy, start, stop in segments(policies):
        p = _slice(params, start, stop, L)
        k = None if keys is None else _slice(keys, start, stop, L)
        if policy == "reverse":
            x1, x2 = reversible_stack(static, use_scan)(p, k, x1, x2)
        elif policy == "checkpoint" and offload:
            x1, x2 = offloaded_stack(static, use_scan)(p, k, x1, x2)
        elif policy == "checkpoint":
            step = _checkpoint_step(static, use_scan, remat_policy)
            x1, x2 = _forward_scan(static, use_scan, p, k, x1, x2, layer_fn=step)
        elif policy == "store":
            x1, x2 = _forward_scan(static, use_scan, p, k, x1, x2)
        else:
            raise ValueError(f"unknown policy {policy!r}")
    return x1, x2


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _runs(layers: Sequence[Layer], start: int, stop: int) -> list[tuple[int, int]]:
    """Maximal runs of the very same layer object within [start, stop): [(start, stop), ...]."""
    out: list[tuple[int, int]] = []
    for i in range(start, stop):
        if out and layers[out[-1][0]] is layers[i]:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def run_sequence(layers: Sequence[Layer], policies: str | Sequence[str], params: Sequence[Any], x1, x2, *,
                 keys: Sequence[Any] | None = None, use_scan: bool = True, remat_policy: Any = None):
    """Run a stack mixing ordinary layers and whole-pair couplings: (x1, x2) -> (y1, y2), each (B, T, d).

    ``layers``: ``LayerStatic`` (e.g. ``model.static``) or ``PairCoupling`` instances, one per layer;
    ``params``: one (unstacked) parameter pytree per layer; ``policies``: a name or one per layer, among
    ``store``, ``checkpoint``, ``reverse``; ``keys``: one PRNG key per layer (dropout), or None. Runs of the
    very same layer object are stacked and scanned; a segment of ``reverse`` layers is one ``custom_vjp``
    that keeps only the segment's parameters and top outputs (the stacked copy of the parameters is the
    price of the mix; the model's own stack, ``run_layers``, has its parameters stacked already).
    """
    L = len(layers)
    policies = policy_table.check_all(policies, L)
    if len(params) != L:
        raise ConfigError(f"run_sequence takes one parameter pytree per layer: {L} layers, {len(params)} given")
    if keys is not None and len(keys) != L:
        raise ConfigError(f"run_sequence takes one key per layer or None: {L} layers, {len(keys)} keys")
    for i, (layer, policy) in enumerate(zip(layers, policies)):
        if not isinstance(layer, (LayerStatic, PairCoupling)):
            raise ConfigError(f"layer {i}: {type(layer).__name__} is neither a LayerStatic nor a PairCoupling")
        if policy not in policy_table.WHOLE_LAYER:
            raise ConfigError(f"layer {i}: policy={policy!r} is not built in the JAX backend yet; JAX takes "
                              f"{list(policy_table.WHOLE_LAYER)}")
    for policy, start, stop in segments(policies):
        runs = _runs(layers, start, stop)
        group_layers = tuple(layers[a] for a, _ in runs)
        lengths = tuple(b - a for a, b in runs)
        ps = tuple(_stack(params[a:b]) for a, b in runs)
        ks = tuple(None if keys is None else jnp.stack(keys[a:b]) for a, b in runs)
        if policy == "reverse":
            x1, x2 = reversible_groups(group_layers, lengths, use_scan)(ps, ks, x1, x2)
            continue
        for layer, n, p, k in zip(group_layers, lengths, ps, ks):
            fn = _checkpoint_step(layer, use_scan, remat_policy) if policy == "checkpoint" else None
            x1, x2 = _forward_scan(layer, use_scan, p, k, x1, x2, layer_fn=fn, length=n)
    return x1, x2
