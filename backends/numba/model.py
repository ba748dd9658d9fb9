"""ReversibleTransformerNumba: the torch backend's model on numpy arrays, numba kernels and numpy's BLAS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from revnet_core.config import ModelConfig, model_fields, require_softmax
from revnet_core.errors import ConfigError, InputError, ReversibilityError
from revnet_core.inputs import check_id_range, check_labels_shape, check_length, check_loss_length

from .blocks import final_norm_vjp
from .engine import check_policies, forward, run_layers
from .layers import Layers, init_params, parameter_shapes
from .loss import IGNORE_INDEX, chunked_lm_loss, shift_targets
from .options import NumbaOptions, options

DTYPES = ("float32", "float64")


@dataclass
class ModelOutput:
    """loss: a float (None without targets); logits: (B, T, V) only if asked; last_hidden_state: (B, T, d)."""

    loss: float | None = None
    logits: np.ndarray | None = None
    last_hidden_state: np.ndarray | None = None


def _dtype(value, what: str) -> np.dtype:
    try:
        name = np.dtype(value).name
    except TypeError:  # a name numpy does not know, such as "bfloat16"
        name = str(value)
    if name not in DTYPES:
        raise ConfigError(f"{what}={value!r} is not one of {list(DTYPES)} (numpy has no bfloat16 matmuls)")
    return np.dtype(name)


class ReversibleTransformerNumba:
    """Token embedding, reversible layers over two streams (both start from the embedding), the streams
    merged (``config.stream_merge``: their sum less the embedding, halved, or their mean) through a final
    norm, and an untied LM head: the torch backend's ``ReversibleTransformer``.

    ``ReversibleTransformerNumba(num_layers=4, d_model=256, num_heads=4)`` or ``(config)``; every field of
    ``revnet_core.ModelConfig`` is accepted, the numba options (``revnet_numba.options.NumbaOptions``:
    ``threads``, ``attn_block``, ``blas_threads``, ``matmul_split``) going to the config's numba section, plus ``param_dtype`` ("float32" or
    "float64") and ``seed`` (of the initial parameters). ``params`` maps canonical names to arrays.
    Inputs are numpy integer arrays of token ids, (B, T) or (T,).
    """

    def __init__(self, config: ModelConfig | None = None, *, param_dtype="float32", seed: int = 0, **fields):
        config = model_fields(config, fields, "numba", NumbaOptions)
        require_softmax(config, "numba")
        for name, value, why in (("dropout", config.dropout, "dropout"),
                                 ("attention_dropout", config.attention_dropout, "dropout"),
                                 ("attention_window", config.attention_window, "sliding-window attention")):
            if value:
                raise ConfigError(f"{name}={value!r}: {why} is not built in the numba backend yet")
        self.config = config
        self.options = options(config)
        if self.options.threads:
            import numba

            numba.set_num_threads(self.options.threads)  # raises if above NUMBA_NUM_THREADS
        if self.options.blas_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(self.options.blas_threads, user_api="blas")  # process-wide, see NumbaOptions
        self.dtype = _dtype(param_dtype, "param_dtype")
        self.stream_dtype = np.promote_types(self.dtype, _dtype(config.stream_dtype, "stream_dtype"))
        self.params = init_params(config, seed, self.dtype)
        self.layers = Layers(config, self.params)
        self.policies = check_policies(config.policy, config.num_layers)

    # --- parameters -----------------------------------------------------------------------------------
    def astype(self, dtype) -> "ReversibleTransformerNumba":
        """Cast the parameters in place (torch's ``.double()``); returns the model."""
        self.dtype = _dtype(dtype, "dtype")
        self.stream_dtype = np.promote_types(self.dtype, _dtype(self.config.stream_dtype, "stream_dtype"))
        for k, v in self.params.items():
            self.params[k] = v.astype(self.dtype)
        return self

    def num_params(self) -> int:
        return sum(v.size for v in self.params.values())

    def save_weights(self, path) -> None:
        """Write the canonical safetensors file any backend can load."""
        from .weights import save_weights

        save_weights(self.params, path)

    def load_weights(self, path) -> "ReversibleTransformerNumba":
        """Load a canonical weight file (torch's, JAX's or ours) in the model's dtype; returns the model."""
        from .weights import load_weights

        loaded = load_weights(path, parameter_shapes(self.config), self.dtype)
        self.params.update(loaded)  # in place: the layers' blocks read this very dict
        return self

    def set_policy(self, policy: str | Sequence[str]) -> None:
        """One policy for every layer, or one per layer: "reverse" or "store" (the core's names)."""
        self.policies = check_policies(policy, self.config.num_layers)

    # --- input checks (torch's rules and messages, revnet_core.inputs) ------------------------------------
    def _check_ids(self, ids, what: str) -> np.ndarray:
        if not isinstance(ids, np.ndarray):
            raise InputError(f"{what} must be a numpy array of token ids, got {type(ids).__name__}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise InputError(f"{what} must have shape (batch, seq) or (seq,), got {tuple(ids.shape)}")
        check_length(ids.shape[1], self.config.max_seq_len, what)
        return ids

    def _check_range(self, ids: np.ndarray, what: str, allow_ignore: bool = False) -> None:
        real = ids[ids != IGNORE_INDEX] if allow_ignore else ids
        if real.size:
            check_id_range(int(real.min()), int(real.max()), self.config.vocab_size, what)

    def _inputs(self, input_ids, labels, compute_loss: bool):
        ids = self._check_ids(input_ids, "input_ids")
        self._check_range(ids, "input_ids")
        if labels is not None:
            labels = self._check_ids(labels, "labels")
            check_labels_shape(labels.shape, ids.shape)
            self._check_range(labels, "labels", allow_ignore=True)
        targets = None
        if compute_loss:
            if labels is None:
                check_loss_length(ids.shape[1])
            targets = shift_targets(ids if labels is None else labels)
        return ids, targets

    # --- forward and backward -------------------------------------------------------------------------
    def _streams(self, ids):
        x = self.params["embed.weight"][ids].astype(self.stream_dtype)
        return x, x.copy()  # two buffers: the backward may rebuild each stream in place

    def _final_norm(self, y1, y2, ids):
        b = self.params.get("norm.bias")
        mean = y1 * 0.5 + y2 * 0.5  # the same rounding as (y1 + y2) * 0.5: halving is exact
        if self.config.stream_merge == "sum":  # less e / 2: the residual stream e + sum F + sum G, halved
            mean -= self.params["embed.weight"][ids].astype(self.stream_dtype) * 0.5
        return final_norm_vjp(self.params["norm.weight"], b, mean.astype(self.dtype, copy=False),
                              self.config.norm, self.config.norm_eps)

    def __call__(self, input_ids, labels=None, *, return_logits: bool = False,
                 compute_loss: bool = True) -> ModelOutput:
        """Like the torch model's forward, without a backward: ``ModelOutput`` with ``.loss`` (a float),
        ``.logits`` (B, T, V) if asked and ``last_hidden_state`` (B, T, d)."""
        ids, targets = self._inputs(input_ids, labels, compute_loss)
        x1, x2 = self._streams(ids)
        y1, y2 = run_layers(self.layers, self.policies, x1, x2)
        h, _ = self._final_norm(y1, y2, ids)
        w = self.params["head.weight"]
        loss = None
        if compute_loss:
            loss = chunked_lm_loss(h, w, targets, self.config.loss_chunk_size, need_grad=False)[0]
        return ModelOutput(loss=loss, logits=h @ w.T if return_logits else None, last_hidden_state=h)

    def loss(self, input_ids, labels=None) -> float:
        """Mean next-token cross-entropy; labels like the ids (default: the ids), shifted here, -100 ignored."""
        return self(input_ids, labels).loss

    def value_and_grad(self, input_ids, labels=None) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, grads): grads maps every canonical parameter name to its gradient (the parameter's dtype).
        Each ``reverse`` layer rebuilds its inputs from its outputs in the backward."""
        return self.forward_backward(input_ids, labels).backward()

    def grads(self, input_ids, labels=None) -> dict[str, np.ndarray]:
        """The gradients of ``loss`` alone (see ``value_and_grad``)."""
        return self.value_and_grad(input_ids, labels)[1]

    def forward_backward(self, input_ids, labels=None) -> "PendingBackward":
        """The forward of a training step, its backward pending: ``.loss`` now, ``.backward()`` -> (loss, grads).
        What it holds between the two is what ``memory.live_array_bytes`` measures."""
        ids, targets = self._inputs(input_ids, labels, True)
        x1, x2 = self._streams(ids)
        y1, y2, tape = forward(self.layers, self.policies, x1, x2)
        del x1, x2
        h, norm_pull = self._final_norm(y1, y2, ids)
        loss, dh, dw_head = chunked_lm_loss(h, self.params["head.weight"], targets, self.config.loss_chunk_size)
        return PendingBackward(self, ids, loss, tape, norm_pull, dh, dw_head)


class PendingBackward:
    """A forward's loss and what its backward needs: the layer tape, the final norm's pullback, the head's
    gradients (computed with the loss, as in every backend's chunked head)."""

    def __init__(self, model, ids, loss, tape, norm_pull, dh, dw_head):
        self.model, self.ids, self.loss = model, ids, loss
        self.tape, self.norm_pull, self.dh, self.dw_head = tape, norm_pull, dh, dw_head

    def backward(self) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, grads {canonical name: array in the parameter's dtype}); runs once."""
        if self.dh is None:
            raise ReversibilityError("this forward's backward already ran: each layer's inputs are rebuilt once "
                                     "and consumed (run the forward again)")
        model = self.model
        dmean, dnorm = self.norm_pull(self.dh)
        self.dh = None
        half = dmean * 0.5
        merged_e = -half if model.config.stream_merge == "sum" else None  # a copy: the tape may reuse half
        dx1, dx2, grads = self.tape.backward(half, half, private_outputs=True)
        # both streams start from the same embedding (and the sum merge subtracts it): its cotangent is theirs
        dx = dx1 + dx2
        if merged_e is not None:
            dx += merged_e
        dx = dx.reshape(-1, dx2.shape[-1])
        d_embed = np.zeros(model.params["embed.weight"].shape, model.dtype)
        np.add.at(d_embed, self.ids.reshape(-1), dx.astype(model.dtype, copy=False))
        grads["embed.weight"] = d_embed
        grads.update({f"norm.{k}": v for k, v in dnorm.items()})
        grads["head.weight"] = self.dw_head
        return self.loss, {k: grads[k].astype(model.dtype, copy=False) for k in model.params}
