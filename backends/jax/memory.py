"""Memory: what a compiled step needs (``compiled_memory``), whether the device has host memory to offload to,
and the device line of ``revnet info``. The scheduler that uses them is ``revnet_jax.scheduler``.

XLA plans every buffer at compile time, so ``jax.jit(f).lower(*args).compile().memory_analysis()`` states
exactly what a step holds besides its arguments and outputs (``temp``): on CPU as on GPU, no device needed.
"""

from __future__ import annotations

import jax

def compiled_memory(fn, *args, **kwargs) -> dict[str, int]:
    """Bytes XLA plans for ``jax.jit(fn)(*args)``: temp, argument, output, alias and their host parts.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated or run).
    """
    stats = jax.jit(fn).lower(*args, **kwargs).compile().memory_analysis()
    names = ("temp", "argument", "output", "alias")
    out = {n: int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
    out.update({f"host_{n}": int(getattr(stats, f"host_{n}_size_in_bytes", 0)) for n in names})
    return out


def host_memory_available(device=None) -> bool:
    """Whether ``device`` (default: the first) has a pinned host memory space XLA can offload to."""
    device = device or jax.devices()[0]
    try:
        return any(m.kind == "pinned_host" for m in device.addressable_memories())
    except Exception:  # platforms without memory-space support raise rather than return nothing
        return False


def describe_devices() -> str:
    """One line for ``revnet info``: the devices jax sees (platform and kind)."""
    devices = jax.devices()
    return f"{devices[0].platform}: {', '.join(sorted({d.device_kind for d in devices}))} x{len(devices)}"


def device_total_bytes(model) -> int | None:
    """Total memory of the first device where XLA reports it (GPU, TPU); None on the CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")
