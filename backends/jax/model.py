"""ReversibleTransformerJAX: the torch backend's model as pure functions of a parameter pytree."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from revnet_core import policies as policy_table
from revnet_core.config import ModelConfig, model_fields, require_softmax
from revnet_core.errors import ConfigError, InputError
from revnet_core.inputs import check_id_range, check_length, check_loss_length

from .blocks import init_norm, norm
from .engine import run_layers
from .layers import LayerStatic, init_layers
from .loss import IGNORE_INDEX, chunked_lm_loss, logits, shift_targets
from .options import JAXOptions

_FLOATS = ("float32", "float64", "bfloat16", "float16")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["loss", "logits", "last_hidden_state"],
                   meta_fields=[])
@dataclass
class ModelOutput:
    """loss: scalar (None without targets); logits: (B, T, V) only if asked; last_hidden_state: (B, T, d)."""

    loss: Any = None
    logits: Any = None
    last_hidden_state: Any = None


def _dtype_name(dtype: Any, what: str) -> str:
    name = jnp.dtype(dtype).name
    if name not in _FLOATS:
        raise ConfigError(f"{what}={dtype!r} is not one of {list(_FLOATS)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(f"{what}='float64' needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    return name


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class ReversibleTransformerJAX:
    """Token embedding, reversible layers over two streams (both start from the embedding), the mean of the
    streams through a final norm, and an untied LM head: the torch backend's ``ReversibleTransformer``.

    ``ReversibleTransformerJAX(num_layers=24, d_model=1024, num_heads=16)`` or ``(config)``; every field of
    ``revnet_core.ModelConfig`` is accepted, the JAX backend's options (``revnet_jax.options.JAXOptions``)
    going to the config's jax section, plus:

    * ``use_scan``: run the layer stack with ``lax.scan`` (compile time flat in depth) or a Python loop;
    * ``compute_dtype``: the matmul dtype (e.g. "bfloat16"; torch: autocast), None for the params' dtype;
    * ``param_dtype``: dtype of freshly initialised parameters ("float64" needs ``jax_enable_x64``);
    * ``seed``: PRNG seed of the parameters made on first access to ``model.params``.

    The pure functions take the parameters explicitly and work under ``jax.jit`` and ``jax.grad``:
    ``apply(params, inputs)`` -> logits, ``loss(params, inputs, labels)`` -> scalar, ``hidden(...)``.
    ``inputs`` is either token ids (any integer dtype, (B, T) or (T,)) or embeddings (any float dtype,
    (B, T, d_model) or (T, d_model)) that replace the token embedding. Passing ``key`` (a PRNG key) turns
    dropout on (torch's ``model.train()``); without it the model is deterministic.
    """

    def __init__(self, config: ModelConfig | None = None, *, use_scan: bool = True, compute_dtype: Any = None,
                 param_dtype: Any = "float32", seed: int = 0, params: Any = None, **fields):
        config = model_fields(config, fields, "jax", JAXOptions)
        require_softmax(config, "jax")
        # attn_head_chunk needs nothing here: XLA schedules the heads itself (the function is the same).
        self.config = config
        self.use_scan = bool(use_scan)
        self.compute_dtype = None if compute_dtype is None else _dtype_name(compute_dtype, "compute_dtype")
        self.param_dtype = _dtype_name(param_dtype, "param_dtype")
        _dtype_name(config.stream_dtype, "stream_dtype")
        self.seed = seed
        self.policies: tuple[str, ...] = (config.policy,) * config.num_layers
        self.remat_policy = None  # a jax.checkpoint policy for ``checkpoint`` layers (JAXMemoryScheduler)
        self.offload = False  # checkpoint layers keep their inputs in host memory (JAXMemoryScheduler)
        self.static = LayerStatic.from_config(config, self.compute_dtype)
        self._params = params
        self._jitted: dict = {}

    # --- parameters -----------------------------------------------------------------------------------
    def init(self, key, sample_input=None):
        """Fresh parameters (a pytree of arrays in ``param_dtype``); ``sample_input`` is only validated."""
        if sample_input is not None:
            self._check_inputs(sample_input)
        cfg, dtype = self.config, jnp.dtype(self.param_dtype)
        k_embed, k_layers, k_head = jax.random.split(key, 3)
        def table(k):  # (V, d), normal(init_std) like torch's init of the embedding and the head
            return (cfg.init_std * jax.random.normal(k, (cfg.vocab_size, cfg.d_model), jnp.float32)).astype(dtype)

        return {
            "embed": {"weight": table(k_embed)},
            "layers": init_layers(k_layers, cfg, dtype),
            "norm": init_norm(cfg.norm, cfg.d_model, dtype),
            "head": {"weight": table(k_head)},
        }

    @property
    def params(self):
        """The model's parameters, made from ``seed`` on first access."""
        if self._params is None:
            self._params = jax.jit(self.init)(jax.random.key(self.seed))  # one compile, not one per array
        return self._params

    @params.setter
    def params(self, value) -> None:
        self._params = value

    def astype(self, dtype) -> "ReversibleTransformerJAX":
        """Cast the parameters (in place, like torch's ``.double()``); returns the model."""
        name = _dtype_name(dtype, "dtype")
        self.param_dtype = name
        self._params = jax.tree.map(lambda p: p.astype(name), self.params)
        return self

    def num_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.params))

    def save_weights(self, path) -> None:
        """Write the canonical safetensors file any backend can load (see ``revnet_core.build(weights=...)``)."""
        from .weights import save_weights

        save_weights(self.params, path)

    def load_weights(self, path) -> "ReversibleTransformerJAX":
        """Load a canonical weight file into ``model.params`` (in ``param_dtype``); returns the model."""
        from .weights import load_weights

        template = jax.eval_shape(self.init, jax.random.key(0))
        self._params = load_weights(path, template)
        return self

    # --- static options -------------------------------------------------------------------------------
    def set_policy(self, policy: str | Sequence[str]) -> None:
        """One policy for every layer, or one per layer (revnet_core.policies; the block-level ones are torch's
        alone for now). Functions already
        traced (e.g. ``jax.jit(model.loss)``) keep the policy they were traced with."""
        policies = policy_table.check_all(policy, self.config.num_layers)
        for p in policies:
            if p not in policy_table.WHOLE_LAYER:  # block-level remat: not built in JAX yet
                raise ConfigError(f"policy={p!r} is not built in the JAX backend yet; JAX takes "
                                  f"{list(policy_table.WHOLE_LAYER)}")
        self.policies = policies
        self._jitted.clear()

    def set_attention_window(self, window: int | None) -> None:
        """Sliding-window attention in every layer: each token sees itself and the ``window - 1`` before it
        (None: every token before it), as torch's ``set_attention_window``. Functions already traced keep
        the window they were traced with."""
        self.config = self.config.replace(attention_window=window)  # validates
        self.static = dataclasses.replace(self.static, block=dataclasses.replace(self.static.block, window=window))
        self._jitted.clear()

    def replace(self, **options) -> "ReversibleTransformerJAX":
        """A copy sharing config and parameters with some static options changed: ``policies``, ``use_scan``,
        ``remat_policy``, ``offload``, or ``coupling`` (a ``BaseCoupling`` instance, e.g. one not registered,
        taking block outputs of the same width as the config's)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._jitted = {}
        for name, value in options.items():
            if name == "policies":
                new.set_policy(value)
            elif name in ("use_scan", "remat_policy", "offload"):
                setattr(new, name, value)
            elif name == "coupling":
                new.static = new.static.with_coupling(value, self.config.d_model)
            else:
                raise ConfigError(f"replace() cannot change {name!r}; changeable: policies, use_scan, "
                                  "remat_policy, offload, coupling")
        return new

    # --- input checks ---------------------------------------------------------------------------------
    def _check_inputs(self, inputs, what: str = "input_ids"):
        """Validated (B, T) int ids or (B, T, d) float embeddings; ranges checked when values are concrete."""
        if not isinstance(inputs, (jax.Array, np.ndarray)):
            raise InputError(f"{what} must be a jax or numpy array of token ids or embeddings, got "
                             f"{type(inputs).__name__}")
        dtype = jnp.dtype(inputs.dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            if inputs.ndim == 1:
                inputs = inputs[None]
            if inputs.ndim != 2:
                raise InputError(f"{what} must have shape (batch, seq) or (seq,), got {tuple(inputs.shape)}")
        elif jnp.issubdtype(dtype, jnp.floating):
            if inputs.ndim == 2:
                inputs = inputs[None]
            if inputs.ndim != 3 or inputs.shape[-1] != self.config.d_model:
                raise InputError(f"{what} given as float embeddings must have shape (batch, seq, "
                                 f"{self.config.d_model}) or (seq, {self.config.d_model}), got {tuple(inputs.shape)}")
        else:
            raise InputError(f"{what} must hold integer token ids or float embeddings, got dtype {dtype}")
        check_length(inputs.shape[1], self.config.max_seq_len, what)
        if jnp.issubdtype(dtype, jnp.integer):
            self._check_range(inputs, what)
        return inputs

    def _check_range(self, ids, what: str, allow_ignore: bool = False) -> None:
        if not _is_concrete(ids):
            return  # under jit: out-of-range ids give NaN embeddings / loss instead (see ``embed``)
        a = np.asarray(ids)
        real = a[a != IGNORE_INDEX] if allow_ignore else a
        if real.size:
            check_id_range(int(real.min()), int(real.max()), self.config.vocab_size, what)

    def _check_labels(self, labels, inputs):
        if not isinstance(labels, (jax.Array, np.ndarray)) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise InputError(f"labels must be an integer jax or numpy array, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.ndim == 1:
            labels = labels[None]
        if tuple(labels.shape) != tuple(inputs.shape[:2]):
            raise InputError(f"labels shape {tuple(labels.shape)} must match the inputs' (batch, seq) "
                             f"{tuple(inputs.shape[:2])}")
        self._check_range(labels, "labels", allow_ignore=True)
        return labels

    # --- the pure functions ---------------------------------------------------------------------------
    def stream_dtype(self, params) -> jnp.dtype:
        return jnp.promote_types(params["embed"]["weight"].dtype, self.config.stream_dtype)

    def embed(self, params, inputs):
        """Both streams start from the embedding: validated inputs -> two (B, T, d) arrays in the stream dtype.
        Ids outside [0, vocab) give NaN rows (they can only be range-checked outside jit)."""
        dtype = self.stream_dtype(params)
        if jnp.issubdtype(inputs.dtype, jnp.floating):
            x = inputs.astype(dtype)
        else:
            table = params["embed"]["weight"]
            V = table.shape[0]
            bad = (inputs < 0) | (inputs >= V)
            x = jnp.take(table, jnp.clip(inputs, 0, V - 1), axis=0).astype(dtype)
            x = jnp.where(bad[..., None], jnp.asarray(jnp.nan, dtype), x)
        return x, x

    def _layer_keys(self, key):
        cfg = self.config
        if key is None or (cfg.dropout == 0 and cfg.attention_dropout == 0):
            return None
        return jax.random.split(key, cfg.num_layers)

    def hidden(self, params, inputs, *, key=None):
        """Final-norm hidden states (B, T, d) in >= float32."""
        inputs = self._check_inputs(inputs)
        x1, x2 = self.embed(params, inputs)
        y1, y2 = run_layers(self.static, self.policies, params["layers"], self._layer_keys(key), x1, x2,
                            use_scan=self.use_scan, remat_policy=self.remat_policy, offload=self.offload)
        merged = (y1 + y2) * 0.5
        if self.config.stream_merge == "sum":
            # Both streams start from the embedding e: less e / 2, the mean is the residual stream's
            # e + sum F + sum G, halved (torch's merge_streams, rounded alike: halving is exact).
            merged = merged - x1 * 0.5
        return norm(params["norm"], merged, self.config.norm, self.config.norm_eps)

    def apply(self, params, inputs, *, key=None):
        """Logits (B, T, V) in >= float32 for ids (B, T) or embeddings (B, T, d)."""
        return logits(self.hidden(params, inputs, key=key), params["head"]["weight"], self.compute_dtype)

    def _targets(self, inputs, labels):
        if labels is None:
            if jnp.issubdtype(inputs.dtype, jnp.floating):
                raise InputError("labels are required when the inputs are embeddings")
            check_loss_length(inputs.shape[1])
            labels = inputs
        return shift_targets(labels)

    def loss(self, params, inputs, labels=None, *, key=None):
        """Mean next-token cross-entropy (scalar, >= float32), computed over sequence chunks.

        inputs: ids (B, T) / (T,) or embeddings (B, T, d); labels like the ids (default: the ids), shifted
        here, IGNORE_INDEX (-100) for no target.
        """
        inputs = self._check_inputs(inputs)
        if labels is not None:
            labels = self._check_labels(labels, inputs)
        targets = self._targets(inputs, labels)
        h = self.hidden(params, inputs, key=key)
        return chunked_lm_loss(h, params["head"]["weight"], targets, self.config.loss_chunk_size,
                               self.compute_dtype)

    def outputs(self, params, inputs, labels=None, *, key=None, return_logits: bool = False,
                compute_loss: bool = True) -> ModelOutput:
        """Everything ``__call__`` returns, as a pure function."""
        inputs = self._check_inputs(inputs)
        if labels is not None:
            labels = self._check_labels(labels, inputs)
        targets = self._targets(inputs, labels) if compute_loss else None
        h = self.hidden(params, inputs, key=key)
        loss = None
        if compute_loss:
            loss = chunked_lm_loss(h, params["head"]["weight"], targets, self.config.loss_chunk_size,
                                   self.compute_dtype)
        lg = logits(h, params["head"]["weight"], self.compute_dtype) if return_logits else None
        return ModelOutput(loss=loss, logits=lg, last_hidden_state=h)

    def __call__(self, input_ids, labels=None, *, key=None, return_logits: bool = False,
                 compute_loss: bool = True, params=None) -> ModelOutput:
        """Like the torch model's forward: a ``ModelOutput`` with ``.loss`` (and ``.logits`` if asked).

        Uses ``model.params`` unless ``params`` is given; validates eagerly, then runs a jitted function.
        """
        params = self.params if params is None else params
        input_ids = self._check_inputs(input_ids)
        if labels is not None:
            labels = self._check_labels(labels, input_ids)
        elif compute_loss:
            self._targets(input_ids, None)  # raise here rather than inside the trace
        sig = (return_logits, compute_loss)
        if sig not in self._jitted:
            self._jitted[sig] = jax.jit(functools.partial(self.outputs, return_logits=return_logits,
                                                          compute_loss=compute_loss))
        return self._jitted[sig](params, input_ids, labels, key=key)

    def __repr__(self) -> str:
        c = self.config
        return (f"ReversibleTransformerJAX(num_layers={c.num_layers}, d_model={c.d_model}, num_heads={c.num_heads}, "
                f"vocab_size={c.vocab_size}, coupling={c.coupling!r}, policies={sorted(set(self.policies))}, "
                f"use_scan={self.use_scan}, compute_dtype={self.compute_dtype})")
