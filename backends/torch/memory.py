"""Device-independent memory accounting: what a forward leaves alive for the backward.

``saved_tensor_bytes`` sees what autograd saves (``saved_tensors_hooks``); ``live_tensor_bytes`` sees every
tensor reachable by the garbage collector, which includes tensors stashed on ``ctx`` or in Python lists that
the hooks cannot see. Storages are counted once however many views point at them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
from typing import Iterable

import torch


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr()), s.nbytes()


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()):
    """Count bytes of distinct storages autograd saves inside the block; yields a dict filled on exit
    as ``{"bytes": int, "count": int}``. Storages of ``exclude`` (e.g. parameters) are not counted."""
    skip = {_storage_key(t)[0] for t in exclude}
    seen: dict = {}
    result = {"bytes": 0, "count": 0}

    def pack(t):
        if t.numel():
            key, nbytes = _storage_key(t)
            if key not in skip:
                seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["count"] = len(seen)


def saved_tensor_hooks_active() -> bool:
    """Whether the caller has saved-tensor hooks installed (``torch.autograd.graph.saved_tensors_hooks``,
    ``save_on_cpu``, ...). Hooks of our own would replace theirs, not nest. Asked through public autograd:
    a saved tensor already packed by default hooks refuses ``register_hooks``; the probe saves one 1-element
    tensor, which the caller's pack hook sees once."""
    probe = torch.zeros(1, requires_grad=True)
    with torch.enable_grad():
        out = probe.exp()  # saves its result
    try:
        out.grad_fn._raw_saved_result.register_hooks(lambda t: t, lambda t: t)
    except RuntimeError:
        return True
    return False


def live_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages of every tensor the garbage collector can reach, minus ``exclude``."""
    gc.collect()
    skip = {_storage_key(t)[0] for t in exclude}
    seen: dict = {}
    for obj in gc.get_objects():
        # Plain tensors only: parameters are excluded by design, and tensor subclasses such as the fake and
        # functional tensors torch.compile's tracing leaves behind own no memory of their own.
        if type(obj) is torch.Tensor and obj.numel():
            key, nbytes = _storage_key(obj)
            if key not in skip:
                seen[key] = nbytes
    return sum(seen.values())


def describe_devices() -> str:
    """One line for ``revnet info``: the GPUs torch sees, else the CPU."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA: {', '.join(names)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def device_total_bytes(model) -> int | None:
    """Total memory of the GPU holding ``model``'s parameters; None on the CPU (the caller asks the OS)."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(p.device).total_memory
