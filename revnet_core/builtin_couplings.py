"""The built-in couplings, registered through the same hook as any plugin's."""

from .couplings import AdditiveCoupling, AffineCoupling
from .hookspecs import hookimpl


@hookimpl
def register_couplings(register):
    register("additive", AdditiveCoupling)
    register("affine", AffineCoupling)
