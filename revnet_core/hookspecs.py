"""Plugin hooks. Built-ins register through these too, so there is one path for ours and theirs.

A plugin is a module or object with ``@hookimpl`` functions, published under the ``revnet_zero`` entry
point group.
"""

import pluggy

hookspec = pluggy.HookspecMarker("revnet_zero")
hookimpl = pluggy.HookimplMarker("revnet_zero")


@hookspec
def register_backends(register):
    """Call ``register(BackendRecord(name, build, trainer=..., ...))`` (or ``register(name, build, **loaders)``);
    ``build(config, **options)`` returns the framework's native model (see ``registry.BackendRecord``)."""


@hookspec
def register_couplings(register):
    """Call ``register(name, factory)``; ``factory(**options)`` returns a ``BaseCoupling``."""


@hookspec
def register_kernels(register):
    """Call ``register(impl)`` with kernel implementation records (see ``revnet_kernels.registry``)."""
