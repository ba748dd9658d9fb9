"""The plugin registry: backends, couplings and kernels, discovered through pluggy entry points.

Nothing is imported at ``import revnet_core``: the first lookup loads the built-ins and every
``revnet_zero`` entry point. A plugin that fails to load is reported by name with its reason and skipped;
it never takes the others down.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import UnknownNameError

ENTRY_POINT_GROUP = "revnet_zero"
DEFAULT_PLUGINS = ("revnet_core.builtin_couplings",)


@dataclass(frozen=True)
class Entry:
    """One registered thing and where it came from."""

    name: str
    obj: Any
    plugin: str  # the plugin (entry point or module) that registered it
    distribution: str = ""  # the installed distribution that ships it, with version


@dataclass
class Registry:
    backends: dict[str, Entry] = field(default_factory=dict)
    couplings: dict[str, Entry] = field(default_factory=dict)
    kernels: list[Entry] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # plugin -> why it was skipped


_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None
_distributions: dict[str, str] = {}  # plugin name -> "distribution version"
_load_failures: dict[str, str] = {}  # entry point name -> why it did not load


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("revnet_zero")
        pm.add_hookspecs(hookspecs)
        import importlib

        for modname in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(modname), name=modname)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                if ep.dist is not None:
                    _distributions[ep.name] = f"{ep.dist.metadata['Name']} {ep.dist.version}"
            except Exception as exc:  # a broken plugin must not take the others down
                _load_failures[ep.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"revnet_zero plugin {ep.name!r} failed to load and was skipped: {exc}", stacklevel=2)
        _manager = pm
    return _manager


def registry() -> Registry:
    """Everything the plugins registered. Rebuilt by ``reset()`` (tests register plugins on the fly)."""
    global _registry
    if _registry is None:
        pm = plugin_manager()
        reg = Registry(failures=dict(_load_failures))
        for plugin_name, plugin in pm.list_name_plugin():
            hooks = (
                ("register_backends", reg.backends),
                ("register_couplings", reg.couplings),
            )
            for hook_name, table in hooks:
                impl = getattr(plugin, hook_name, None)
                if impl is None:
                    continue

                def register(name: str, obj: Any, _table=table, _plugin=plugin_name) -> None:
                    _table[name] = Entry(name, obj, _plugin, _distributions.get(_plugin, ""))

                _call_plugin(reg, plugin_name, impl, register)
            impl = getattr(plugin, "register_kernels", None)
            if impl is not None:
                _call_plugin(
                    reg,
                    plugin_name,
                    impl,
                    lambda k, _p=plugin_name: reg.kernels.append(Entry(getattr(k, "name", str(k)), k, _p)),
                )
        _registry = reg
    return _registry


def _call_plugin(reg: Registry, plugin_name: str, impl: Callable, register: Callable) -> None:
    try:
        impl(register=register)
    except Exception as exc:
        reg.failures[plugin_name] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"revnet_zero plugin {plugin_name!r} failed while registering and was skipped: {exc}", stacklevel=3)


def reset() -> None:
    """Forget the computed registry (plugins registered or unregistered since are picked up)."""
    global _registry
    _registry = None


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object in-process (tests, notebooks); returns its name."""
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    reset()
    return registered


def unregister_plugin(name: str) -> None:
    plugin_manager().unregister(name=name)
    reset()


def _lookup(table: dict[str, Entry], kind: str, name: str) -> Entry:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownNameError(f"unknown {kind} {name!r}; installed {kind}s: {known}") from None


def get_backend(name: str) -> Callable[..., Any]:
    return _lookup(registry().backends, "backend", name).obj


def get_coupling(name: str, **options: Any):
    """A fresh coupling instance by registered name."""
    factory = _lookup(registry().couplings, "coupling", name).obj
    return factory(**options)
