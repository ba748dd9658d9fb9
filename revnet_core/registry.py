"""The plugin registry: backends, couplings and kernels, discovered through pluggy entry points.

Nothing is imported at ``import revnet_core``: the first lookup loads the built-ins and every
``revnet_zero`` entry point. A plugin that fails to import, raises while registering, or registers a
coupling that fails its load-time probe (``plugin_checks``) is reported by name with its reason in
``registry().failures`` (and one warning) and skipped; it never takes the others down.

A name is never silently taken over: the built-ins (the ``revnet-zero`` distribution) register first, and
a later backend or coupling of a taken name is refused and reported, unless the user allows that name
(``REVNET_ALLOW_OVERRIDE=torch,additive``, or ``register_plugin(..., override=["torch"])``).
"""

from __future__ import annotations

import os
import dataclasses
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import BackendFeatureError, ConfigError, UnknownNameError
from .plugin_checks import PluginCheckError, check_factory

ENTRY_POINT_GROUP = "revnet_zero"
DEFAULT_PLUGINS = ("revnet_core.builtin_couplings",)
CORE_DISTRIBUTION = "revnet-zero"  # ships revnet_core, hence the DEFAULT_PLUGINS
OVERRIDE_ENV = "REVNET_ALLOW_OVERRIDE"  # comma-separated names a later plugin may take over


@dataclass(frozen=True)
class Entry:
    """One registered thing and where it came from."""

    name: str
    obj: Any
    plugin: str  # the plugin (entry point or module) that registered it
    distribution: str = ""  # "name version" of the installed distribution that ships it; "" if in-process
    replaces: str = ""  # the plugin whose entry of this name it took over (an allowed override), else ""


LOADERS = ("trainer", "bench", "cost", "scheduler", "memory", "options")  # what a backend record may point to


@dataclass(frozen=True)
class BackendRecord:
    """What a backend registers: its name, ``build(config, *, weights=None)`` and, for each part the
    framework-free code may ask for (``LOADERS``), a loader string "package.module" or "package.module:attr"
    imported only when asked (so listing backends imports no framework). ``bench_models``: the names of its
    bench module's built-in models, checked before the framework is imported."""

    name: str
    build: Callable[..., Any]
    trainer: str | None = None  # module with run(settings, data) -> summary dict
    bench: str | None = None  # module with BenchmarkSuite
    cost: str | None = None  # class: cost(config, workload) with peak_bytes(plan), step_time(plan), ...
    scheduler: str | None = None  # module with the backend's memory scheduler
    memory: str | None = None  # module with describe_devices() -> str and device_total_bytes(model) -> int | None
    options: str | None = None  # dataclass of its ModelConfig.backend_options section (importing no framework)
    bench_models: tuple[str, ...] = ()

    def require(self, part: str) -> str:
        """The loader string of ``part``, checked without importing anything; BackendFeatureError naming what
        is missing (and which backends have it) if this backend has none."""
        if part not in LOADERS:
            raise ValueError(f"part={part!r} is not one of {list(LOADERS)}")
        target = getattr(self, part)
        if target is None:
            raise BackendFeatureError(f"the {self.name} backend has no {part} yet; backends with one: "
                                      f"{', '.join(backends_with(part)) or 'none'}")
        return target

    def load(self, part: str) -> Any:
        """The object behind loader ``part`` (imported now); BackendFeatureError if the backend has none."""
        import importlib

        module, _, attr = self.require(part).partition(":")
        obj = importlib.import_module(module)
        return getattr(obj, attr) if attr else obj


def _as_record(name_or_record: Any, build: Any = None, **loaders: Any) -> BackendRecord:
    if isinstance(name_or_record, BackendRecord):
        if build is not None or loaders:
            raise TypeError("register(record) takes no other arguments")
        return name_or_record
    if not isinstance(name_or_record, str) or not callable(build):
        raise TypeError("register_backends: call register(BackendRecord(...)) or register(name, build, **loaders)")
    return BackendRecord(name_or_record, build, **loaders)


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
_overrides: set[str] = set()  # names allowed to be taken over in-process (register_plugin(override=...))
_plugin_overrides: dict[str, tuple[str, ...]] = {}  # plugin name -> the names its registration allowed


def allowed_overrides() -> set[str]:
    """Names a later registration may take over: ``REVNET_ALLOW_OVERRIDE`` plus in-process ones."""
    return {n.strip() for n in os.environ.get(OVERRIDE_ENV, "").split(",") if n.strip()} | _overrides


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("revnet_zero")
        pm.add_hookspecs(hookspecs)
        import importlib

        core = _installed(CORE_DISTRIBUTION)
        for modname in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(modname), name=modname)
            _distributions[modname] = core
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            if ep.dist is not None:  # known before loading, so a plugin that fails to import is still traceable
                _distributions[ep.name] = f"{ep.dist.metadata['Name']} {ep.dist.version}"
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                _load_failures[ep.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"revnet_zero plugin {ep.name!r} failed to load and was skipped: {exc}", stacklevel=2)
        _manager = pm
    return _manager


def registry() -> Registry:
    """Everything the plugins registered. Rebuilt by ``reset()`` (tests register plugins on the fly)."""
    global _registry
    if _registry is None:
        pm = plugin_manager()  # first: loading the entry points fills _load_failures
        reg = Registry(failures=dict(_load_failures))
        # Built-ins first (a stable sort keeps every other plugin in registration order): first come wins.
        ordered = sorted(pm.list_name_plugin(),
                         key=lambda np: _distributions.get(np[0], "").partition(" ")[0] != CORE_DISTRIBUTION)
        allowed = allowed_overrides()
        for plugin_name, plugin in ordered:
            problems = _add_plugin(reg, plugin_name, plugin, allowed)
            if problems:
                reason = "; ".join(problems)
                reg.failures[plugin_name] = reason
                warnings.warn(f"revnet_zero plugin {plugin_name!r}: {reason}", stacklevel=2)
        _registry = reg
    return _registry


_HOOKS = ("register_backends", "register_couplings", "register_kernels")


def _add_plugin(reg: Registry, plugin_name: str, plugin: Any, allowed: set[str] = frozenset()) -> list[str]:
    """Add one plugin's registrations to ``reg``; returns what was wrong (empty if nothing).

    A hook that raises drops everything the plugin registered (half a plugin is worse than none); a backend
    or coupling that reuses a taken name (unless in ``allowed``), or a coupling that fails its probe, is
    dropped alone, the plugin's other registrations kept.
    """
    dist = _distributions.get(plugin_name, "")
    staged: dict[str, list[Entry]] = {hook: [] for hook in _HOOKS}
    for hook in _HOOKS:
        impl = getattr(plugin, hook, None)
        if impl is None:
            continue
        out = staged[hook]
        if hook == "register_kernels":
            def register(k: Any, _out=out) -> None:
                _out.append(Entry(getattr(k, "name", str(k)), k, plugin_name, dist))
        elif hook == "register_backends":
            def register(name_or_record: Any, build: Any = None, _out=out, **loaders: Any) -> None:
                record = _as_record(name_or_record, build, **loaders)
                _out.append(Entry(record.name, record, plugin_name, dist))
        else:
            def register(name: str, obj: Any, _out=out) -> None:
                _out.append(Entry(name, obj, plugin_name, dist))
        try:
            impl(register=register)
        except Exception as exc:  # a broken plugin must not take the others down
            return [f"{hook} raised {type(exc).__name__}: {exc}; the plugin was skipped"]

    problems = []
    for kind, table in (("backend", reg.backends), ("coupling", reg.couplings)):
        for entry in staged[f"register_{kind}s"]:
            taken = table.get(entry.name)
            if taken is not None and entry.name not in allowed:
                # First come wins: a plugin must not silently swap what every model of that name runs.
                problems.append(f"{kind} {entry.name!r} refused: the name is already registered by {taken.plugin!r}"
                                f" ({taken.distribution or 'in-process'}); set {OVERRIDE_ENV}={entry.name} to let "
                                f"{plugin_name!r} replace it")
                continue
            if kind == "coupling":
                try:
                    check_factory(entry.obj)
                except Exception as exc:
                    why = str(exc) if isinstance(exc, PluginCheckError) else f"{type(exc).__name__}: {exc}"
                    problems.append(f"coupling {entry.name!r} skipped: it failed its load-time check: {why}")
                    continue
            if taken is not None:
                entry = dataclasses.replace(entry, replaces=taken.plugin)
                warnings.warn(f"revnet_zero plugin {plugin_name!r} replaces {kind} {entry.name!r} of "
                              f"{taken.plugin!r} ({OVERRIDE_ENV} allows it)", stacklevel=3)
            table[entry.name] = entry
    reg.kernels.extend(staged["register_kernels"])
    return problems


def describe() -> list[dict[str, str]]:
    """What ``revnet plugins`` prints: a row per backend, coupling and kernel, then one per failed plugin.

    Row keys: kind ("backend" | "coupling" | "kernel" | "failed"), name, plugin (entry point or module
    name), distribution ("name version"; "in-process" for a plugin registered by ``register_plugin``),
    reason (why a plugin failed or what it had refused; for an allowed override, whose entry it replaced).
    """
    reg = registry()
    rows = []
    for kind, entries in (("backend", reg.backends.values()), ("coupling", reg.couplings.values()),
                          ("kernel", reg.kernels)):
        rows += [dict(kind=kind, name=e.name, plugin=e.plugin, distribution=e.distribution or "in-process",
                      reason=f"replaces {e.replaces!r} ({OVERRIDE_ENV})" if e.replaces else "")
                 for e in sorted(entries, key=lambda e: e.name)]
    rows += [dict(kind="failed", name=p, plugin=p, distribution=_distributions.get(p, "in-process"), reason=why)
             for p, why in sorted(reg.failures.items())]
    return rows


def _installed(name: str) -> str:
    """"name version" of an installed distribution; the bare name when running from a source tree."""
    try:
        return f"{name} {metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def reset() -> None:
    """Forget the computed registry (plugins registered or unregistered since are picked up)."""
    global _registry
    _registry = None


def register_plugin(plugin: Any, name: str | None = None, *, override: tuple[str, ...] | list[str] = ()) -> str:
    """Register a plugin object in-process (tests, notebooks); returns its name. ``override``: backend or
    coupling names it may take over from an earlier plugin (else such a registration is refused)."""
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    _overrides.update(override)
    _plugin_overrides[registered] = tuple(override)
    reset()
    return registered


def unregister_plugin(name: str) -> None:
    plugin_manager().unregister(name=name)
    _overrides.difference_update(_plugin_overrides.pop(name, ()))
    reset()


def _lookup(table: dict[str, Entry], kind: str, name: str) -> Entry:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownNameError(f"unknown {kind} {name!r}; installed {kind}s: {known}") from None


def get_backend(name: str) -> Callable[..., Any]:
    """The ``build`` function of backend ``name``."""
    return backend_record(name).build


def backend_record(name: str) -> BackendRecord:
    """Everything backend ``name`` registered (``BackendRecord``); UnknownNameError lists the installed ones."""
    return _lookup(registry().backends, "backend", name).obj


def backend_of(model: Any) -> BackendRecord | None:
    """The record of the backend whose package defines ``type(model)`` (None for a foreign object)."""
    package = type(model).__module__.partition(".")[0]
    for entry in registry().backends.values():
        if getattr(entry.obj.build, "__module__", "").partition(".")[0] == package:
            return entry.obj
    return None


def backends_with(part: str) -> list[str]:
    """Names of the installed backends whose record has loader ``part``."""
    return sorted(n for n, e in registry().backends.items() if getattr(e.obj, part, None))


def option_names() -> dict[str, tuple[str, ...]]:
    """{backend: the names of its ModelConfig.backend_options section} for installed backends with one."""
    return {n: tuple(f.name for f in dataclasses.fields(registry().backends[n].obj.load("options")))
            for n in backends_with("options")}


def get_coupling(name: str, **options: Any):
    """A fresh coupling instance by registered name."""
    import inspect

    factory = _lookup(registry().couplings, "coupling", name).obj
    try:  # an unknown option is the user's typo, not a TypeError deep inside the plugin
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"coupling {name!r} does not take options {sorted(options)} ({exc}); "
                          f"it takes {list(inspect.signature(factory).parameters)}") from None
    except ValueError:  # no signature to read (a builtin): let the factory judge
        pass
    return factory(**options)
