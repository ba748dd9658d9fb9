"""Kernel selection: per (operation, device kind, dtype, shape) one implementation, with a safe fallback.

Implementations are frozen ``KernelImpl`` records. Built-ins and plugins register them the same way, through
the ``register_kernels(register)`` pluggy hook collected by ``revnet_core.registry``. Selection takes the
highest-priority record whose device kinds, dtypes and shape predicate accept the call; records that failed
at run time are skipped from then on.

Each record names the array frameworks it takes (``frameworks``, default torch's): the torch blocks select
among torch records, the numba backend among numpy ones (``select(..., framework="numba")``), so a CPU
kernel of one framework is never handed the other's arrays.

Forcing, for debugging: ``select(..., impl="reference")`` or the environment variable ``REVNET_KERNELS``,
either one name for every operation (``REVNET_KERNELS=reference``) or per operation
(``REVNET_KERNELS=attention=reference,rms_norm=triton``). A forced implementation skips the device check
(that is how the tests run Triton kernels on CPU tensors through the interpreter) and is never replaced by a
fallback: if it fails, the error is raised.

Nothing here imports torch or triton; loaders import their module on first use.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ENV_VAR = "REVNET_KERNELS"
DEVICE_KINDS = ("cuda", "rocm", "cpu", "tpu")
ANY = "*"


class KernelFallbackWarning(RuntimeWarning):
    """An automatically selected kernel failed to compile or launch; the next candidate runs instead."""


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of one operation.

    ``loader`` is ``"package.module:function"``, imported on first use (so a record costs no import).
    ``supports(meta)`` receives the call's shape facts (e.g. ``{"head_dim": 64, "window": None}``) and
    returns whether this implementation handles them. ``requires`` names modules that must be importable.
    """

    op: str
    impl: str
    loader: str
    devices: frozenset[str] = frozenset({ANY})
    dtypes: frozenset[str] = frozenset({ANY})
    supports: Callable[[Mapping[str, Any]], bool] | None = None
    priority: int = 0  # highest wins among those that accept the call
    # A priority that depends on the call's shape facts, for measured crossovers (None: ``priority``).
    ranked: Callable[[Mapping[str, Any]], int] | None = None
    requires: tuple[str, ...] = ()
    is_reference: bool = False  # the ground truth: nothing to fall back to
    description: str = ""
    # The array frameworks whose arrays it takes ("torch", "numba" (numpy arrays), ...); ANY for all.
    frameworks: frozenset[str] = frozenset({"torch"})

    @property
    def name(self) -> str:
        return f"{self.op}:{self.impl}"

    def accepts(self, device: str, dtype: str, meta: Mapping[str, Any], *, check_device: bool = True) -> bool:
        if check_device and ANY not in self.devices and device not in self.devices:
            return False
        if ANY not in self.dtypes and dtype not in self.dtypes:
            return False
        return self.supports is None or bool(self.supports(meta))

    def serves(self, framework: str) -> bool:
        return ANY in self.frameworks or framework in self.frameworks

    def importable(self) -> bool:
        return all(_module_available(m) for m in self.requires)

    def load(self) -> Callable[..., Any]:
        fn = _loaded.get(self.loader)
        if fn is None:
            module, _, attr = self.loader.partition(":")
            fn = getattr(importlib.import_module(module), attr)
            _loaded[self.loader] = fn
        return fn


_loaded: dict[str, Callable[..., Any]] = {}
# The automatically selected record while it runs (None when forced): its autograd backward may fall back.
_auto_selected: contextvars.ContextVar[KernelImpl | None] = contextvars.ContextVar("revnet_kernels_auto",
                                                                                   default=None)
_available: dict[str, bool] = {}
_failed: dict[tuple[str, str, str], str] = {}  # (op, impl, device kind) -> why it was dropped


def _module_available(name: str) -> bool:
    if name not in _available:
        import importlib.util

        _available[name] = importlib.util.find_spec(name) is not None
    return _available[name]


@dataclass
class _Table:
    records: list[KernelImpl] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # record name -> plugin that registered it
    by_op: dict[tuple, list[KernelImpl]] = field(default_factory=dict)  # implementations(), memoised
    # select()'s answers by (op, device kind, dtype, forced name, meta items): blocks call an op per layer
    # per step, and a cold selection (scan, predicates, import checks) costs about 13 us. Cleared when a
    # kernel failure is recorded or forgotten; a new plugin registry builds a new table.
    selected: dict[tuple, KernelImpl] = field(default_factory=dict)
    source: Any = None  # the revnet_core Registry this table was built from


_current: _Table | None = None
_plugin_registry: Callable[[], Any] | None = None  # revnet_core.registry.registry, imported on first use


def _table() -> _Table:
    global _current, _plugin_registry
    if _plugin_registry is None:
        from revnet_core.registry import registry  # the shared plugin registry (pluggy only, no framework)

        _plugin_registry = registry
    reg = _plugin_registry()
    if _current is None or _current.source is not reg:  # reset() (plugins changed) makes a new Registry
        table = _Table(source=reg)
        for entry in reg.kernels:
            if isinstance(entry.obj, KernelImpl):
                table.records.append(entry.obj)
                table.plugins[entry.obj.name] = entry.plugin
        _add_builtin_records(table)
        _current = table
    return _current


# Linear attention (``linear_attn``): its records, until ``plugin.BUILTIN_KERNELS`` lists them; ``_table`` adds
# any of them that no plugin registered, so the op exists either way (and never twice).
LINEAR_ATTENTION_MAX_WIDTH = 256  # feature width and head dim of the Triton kernel: one register tile each


def _linear_attention_shapes(meta) -> bool:
    return (meta.get("feature_width", 0) <= LINEAR_ATTENTION_MAX_WIDTH
            and meta.get("head_dim", 0) <= LINEAR_ATTENTION_MAX_WIDTH and not meta.get("floor_grad", False))


LINEAR_ATTENTION_KERNELS = (
    KernelImpl("linear_attention", "triton", "revnet_kernels.linear_attn_triton:triton_impl",
               frozenset({"cuda", "rocm"}), frozenset({"float16", "bfloat16", "float32"}), _linear_attention_shapes,
               priority=20, requires=("triton",),
               description="chunked causal linear attention, normaliser with floor, forward+backward"),
    KernelImpl("linear_attention", "reference", "revnet_kernels.linear_attn:reference_impl", is_reference=True,
               description="PyTorch over chunks, autograd"),
)


def _add_builtin_records(table: _Table) -> None:
    if "revnet_kernels" not in table.plugins.values():  # the built-in plugin was not loaded (blocked, failed)
        return
    for rec in LINEAR_ATTENTION_KERNELS:
        if rec.name not in table.plugins:
            table.records.append(rec)
            table.plugins[rec.name] = "revnet_kernels"


def _forget_selections() -> None:
    if _current is not None:
        _current.selected.clear()


def implementations(op: str | None = None, framework: str | None = "torch") -> list[KernelImpl]:
    """Every registered record (of ``op``) that serves ``framework`` (None: any), highest priority first."""
    table = _table()
    key = (op, framework)
    if key not in table.by_op:
        recs = [r for r in table.records
                if (op is None or r.op == op) and (framework is None or r.serves(framework))]
        table.by_op[key] = sorted(recs, key=lambda r: -r.priority)
    return list(table.by_op[key])


def operations() -> list[str]:
    return sorted({r.op for r in _table().records})


def device_kind(device: Any) -> str:
    """cuda, rocm, cpu or tpu for a torch device/tensor, a jax device, or one of those strings."""
    if isinstance(device, str) and device in DEVICE_KINDS:
        return device
    device = getattr(device, "device", device)  # a tensor -> its device
    platform = getattr(device, "platform", None)  # jax devices
    if platform is not None:
        if platform == "gpu":  # jax names CUDA and ROCm devices alike; its client says which
            version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
            return "rocm" if "rocm" in version else "cuda"
        return "rocm" if platform == "rocm" else platform
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        import torch  # the caller already holds a torch device, so this import is free

        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    if kind == "xla":
        return "tpu"
    return kind


def dtype_name(dtype: Any) -> str:
    """'float32', 'bfloat16', ... for a torch or numpy/jax dtype, or the name itself."""
    name = str(dtype)
    return name.removeprefix("torch.")


def forced_impl(op: str) -> str | None:
    """The implementation that ``REVNET_KERNELS`` forces for ``op``, if any."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value or value == "auto":
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        key, _, name = item.partition("=")
        if key.strip() == op:
            return name.strip() or None
    return None


def select(op: str, device: Any, dtype: Any, meta: Mapping[str, Any] | None = None, impl: str | None = None,
           framework: str = "torch") -> KernelImpl:
    """The implementation of ``op`` for this device, dtype and shape facts, among ``framework``'s records.

    ``impl`` (or ``REVNET_KERNELS``) forces one by name; otherwise the highest-priority record that accepts
    the call and has not failed on this device kind. Answers are cached per (op, device kind, dtype, forced
    name, meta, framework), so a record's ``supports`` must depend on ``meta`` alone.
    """
    return _cached_select(op, device_kind(device), dtype_name(dtype), meta, impl or forced_impl(op), framework)


def _cached_select(op: str, kind: str, dname: str, meta: Mapping[str, Any] | None, forced: str | None,
                   framework: str = "torch") -> KernelImpl:
    table = _table()
    try:
        key = (op, kind, dname, forced, tuple(meta.items()) if meta else (), framework)
        hit = table.selected.get(key)
    except TypeError:  # an unhashable fact: select without the cache
        key, hit = None, None
    if hit is not None:
        return hit
    rec = _select(op, kind, dname, dict(meta or {}), forced, framework)
    if key is not None:
        table.selected[key] = rec
    return rec


def _select(op: str, kind: str, dname: str, meta: dict[str, Any], forced: str | None, framework: str = "torch"
            ) -> KernelImpl:
    from revnet_core.errors import UnknownNameError

    records = implementations(op, framework)
    if not records:
        where = "" if framework == "torch" else f" for framework {framework!r}"
        raise UnknownNameError(f"unknown kernel operation {op!r}{where}; registered: "
                               f"{', '.join(operations()) or 'none'}")
    if forced is not None:
        for rec in records:
            if rec.impl == forced:
                if not rec.accepts(kind, dname, meta, check_device=False):
                    raise ValueError(f"{op} implementation {forced!r} does not support dtype={dname}, {meta}")
                return rec
        names = ", ".join(r.impl for r in records)
        raise UnknownNameError(f"unknown {op} implementation {forced!r}; registered: {names}")
    if any(r.ranked is not None for r in records):  # stable: ties keep the registered order
        records = sorted(records, key=lambda r: -(r.ranked(meta) if r.ranked is not None else r.priority))
    for rec in records:
        if (op, rec.impl, kind) in _failed or not rec.importable():
            continue
        if rec.accepts(kind, dname, meta):
            return rec
    raise ValueError(f"no {op} implementation accepts device={kind}, dtype={dname}, {meta}")


def dispatch(op: str, args: tuple, kwargs: Mapping[str, Any], *, device: Any, dtype: Any,
             meta: Mapping[str, Any] | None = None, impl: str | None = None, framework: str = "torch") -> Any:
    """Run the selected implementation of ``op`` on ``args``; on a kernel failure warn once and run the next.

    Inputs must be validated before this is called: every exception raised here is taken to be the
    kernel's (a compile error, out of shared memory, a launch failure), except out-of-memory errors.
    """
    name = impl or forced_impl(op)
    forced = name is not None
    rec = _cached_select(op, device_kind(device), dtype_name(dtype), meta, name, framework)
    while True:
        token = _auto_selected.set(None if forced else rec)
        try:
            return rec.load()(*args, **kwargs)
        except Exception as exc:
            if forced or rec.is_reference or type(exc).__name__ == "OutOfMemoryError":
                raise
            _failed[(op, rec.impl, device_kind(device))] = f"{type(exc).__name__}: {exc}"
            _forget_selections()
            try:
                nxt = select(op, device, dtype, meta, framework=framework)
            except ValueError:
                raise exc from None
            _warn_fallback(rec, device, exc, nxt)
            rec = nxt
        finally:
            _auto_selected.reset(token)


def auto_selected() -> KernelImpl | None:
    """The record running now if the registry chose it (None if forced or called directly). Autograd
    functions keep it from their forward: only then may a failing backward fall back to the reference."""
    return _auto_selected.get()


def _warn_fallback(rec: KernelImpl, device: Any, exc: BaseException, nxt: KernelImpl) -> None:
    warnings.warn(
        f"revnet_kernels: {rec.op} kernel {rec.impl!r} failed on {device_kind(device)} "
        f"({type(exc).__name__}: {str(exc)[:300]}); using {nxt.impl!r} for {rec.op} from now on",
        KernelFallbackWarning,
        stacklevel=3,
    )


def backward_failed(rec: KernelImpl | None, device: Any, exc: BaseException) -> bool:
    """For an autograd backward whose kernel raised: True if it may recompute its gradients with the
    reference (warning once per record and device kind, and deselecting the record from then on), False if
    it must re-raise (the implementation was forced, or the error is out-of-memory)."""
    if rec is None or type(exc).__name__ == "OutOfMemoryError":
        return False
    key = (rec.op, rec.impl, device_kind(device))
    if key not in _failed:
        _failed[key] = f"{type(exc).__name__}: {exc}"
        _forget_selections()
        warnings.warn(
            f"revnet_kernels: {rec.op} backward kernel {rec.impl!r} failed on {device_kind(device)} "
            f"({type(exc).__name__}: {str(exc)[:300]}); gradients recomputed with the reference, and "
            f"{rec.op} no longer selects {rec.impl!r}",
            KernelFallbackWarning,
            stacklevel=3,
        )
    return True


def failures() -> dict[tuple[str, str, str], str]:
    """Kernels dropped after failing, (op, impl, device kind) -> reason."""
    return dict(_failed)


def reset_failures() -> None:
    """Forget failures (tests; or after fixing the environment in a long-lived process)."""
    _failed.clear()
    _forget_selections()


# Shape facts of the seed model (head dim 64, d_model 1024, vocab 50257) for describe().
EXAMPLE_META: dict[str, dict[str, Any]] = {
    "attention": {"head_dim": 64, "num_heads": 16, "num_kv_heads": 16, "causal": True, "window": None,
                  "return_lse": False},
    "layer_norm": {"hidden": 1024},
    "rms_norm": {"hidden": 1024},
    "activation": {"kind": "gelu", "width": 4096},
    "linear_cross_entropy": {"hidden": 1024, "vocab": 50257},
    "linear_attention": {"feature_width": 64, "head_dim": 64, "has_state": False, "floor_grad": False},
}


def describe(device: Any = "cpu", dtype: Any = "bfloat16", meta: Mapping[str, Mapping[str, Any]] | None = None,
             framework: str = "torch") -> list[dict[str, str]]:
    """What each operation of ``framework`` selects on ``device`` for ``dtype`` (for ``revnet info``), one
    dict per op.

    ``meta`` gives per-op shape facts; by default the seed model's (``EXAMPLE_META``).
    """
    rows = []
    table = _table()
    meta = EXAMPLE_META if meta is None else meta
    for op in operations():
        candidates = [r.impl for r in implementations(op, framework)]
        if not candidates:
            continue
        try:
            rec = select(op, device, dtype, meta.get(op, {}), framework=framework)
            chosen, plugin = rec.impl, table.plugins.get(rec.name, "")
        except ValueError as exc:
            chosen, plugin = f"none ({exc})", ""
        rows.append({"op": op, "device": device_kind(device), "dtype": dtype_name(dtype), "impl": chosen,
                     "plugin": plugin, "candidates": ", ".join(candidates)})
    return rows
