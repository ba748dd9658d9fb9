"""Memory: live array bytes reachable from an object (what a forward leaves for its backward), and the
device line of ``revnet info``.

numpy arrays are not tracked by the garbage collector, so ``live_array_bytes`` walks the references from a
root (a ``PendingBackward``, a tape) through containers, objects, closures and cells, counting each
underlying buffer once however many views point at it.
"""

from __future__ import annotations

import gc
import os
import platform
import types
from typing import Iterable

import numpy as np

_LEAVES = (str, bytes, int, float, complex, bool, type(None), type)


def _buffer(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (the end of its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:  # a cell whose variable was deleted
        return None


def live_array_bytes(root, exclude: Iterable[np.ndarray] = ()) -> int:
    """Bytes of the distinct numpy buffers reachable from ``root``, minus those of ``exclude`` (parameters).

    Modules, classes and functions' globals are not entered: they are not what a forward keeps."""
    skip = {id(_buffer(a)) for a in exclude}
    seen_obj: set[int] = set()
    buffers: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_obj or isinstance(obj, _LEAVES) or type(obj).__name__ == "module":
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, np.ndarray):
            owner = _buffer(obj)
            if id(owner) not in skip:
                buffers[id(owner)] = owner.nbytes
        elif isinstance(obj, types.FunctionType):  # what a closure keeps, not its module's globals
            stack.extend(_cell(c) for c in obj.__closure__ or ())
            stack.extend(obj.__defaults__ or ())
        else:
            stack.extend(gc.get_referents(obj))
    return sum(buffers.values())


def describe_devices() -> str:
    """One line for ``revnet info``: the CPU and how many threads numba's kernels run on."""
    from .plugin import require_numba

    numba = require_numba()
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores), numba {numba.__version__}, "
            f"{numba.get_num_threads()} threads")


def device_total_bytes(model) -> int | None:
    """The machine's physical memory where the OS reports it (Linux, macOS); None elsewhere."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
