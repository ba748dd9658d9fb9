"""The framework-neutral part of memory accounting: a workload, a tape of allocations and frees, a simulated
step's result, byte formatting, the process's resident bytes. Each backend's ``cost`` module writes its own
step onto the tape."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "sgd", "none")
DEVICES = ("cuda", "cpu")
GiB = 2**30


@dataclass(frozen=True)
class Workload:
    """How the model is run: shapes, dtypes, device and optimizer. Defaults: the seed's GPU setting.
    ``attention`` overrides the attention kernel by a backend's own name (its cost model checks it)."""

    batch: int = 1
    seq_len: int = 2048
    param_dtype: str = "float32"
    autocast_dtype: str | None = "bfloat16"  # None: no autocast, blocks compute in the stream dtype
    device: str = "cuda"  # decides the attention kernel's workspace and dropout's mask dtype
    attention: str | None = None  # sdpa | math | reference; None: what the config selects
    optimizer: str = "adamw"  # adamw (fused: no step temporaries) | sgd (no momentum) | none
    training: bool = True  # dropout active (module.train())
    hold_outputs: bool = False  # the caller keeps the final hidden states (return_hidden=True) past the backward

    def __post_init__(self):
        for name in ("batch", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.param_dtype not in DTYPE_BYTES:
            raise ValueError(f"param_dtype={self.param_dtype!r} is not one of {list(DTYPE_BYTES)}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype={self.autocast_dtype!r} must be None, 'bfloat16' or 'float16'")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not one of {list(DEVICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def chunks(total: int, step: int) -> list[int]:
    """Sizes of consecutive chunks of at most ``step`` covering ``total``."""
    step = step if 0 < step < total else total
    return [min(step, total - s) for s in range(0, total, step)]


class Tape:
    """Bytes alive over a sequence of allocations and frees, with owners counted.

    A tensor is ``alloc``-ed with one owner (the Python name or temporary that holds it); ``saved=True``
    adds autograd's ownership (a saved tensor of the node being recorded). ``hold`` adds an owner,
    ``free`` drops one; the bytes go when the last owner does. Saves made in the forward are what
    ``saved_tensors_hooks`` (``revnet_torch.memory.saved_tensor_bytes``) sees.
    """

    def __init__(self, record: bool = False):
        self.live: dict[str, list] = {}  # name -> [bytes, category, owners]
        self.total = 0
        self.peak = 0
        self.peak_label = ""
        self.peak_by_category: dict[str, int] = {}
        self.by_category: dict[str, int] = {}
        self.label = ""
        self.forward = True  # saves count only in the forward; a recompute in the backward is not "saved"
        self.saved: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self.phase_starts: dict[str, int] = {}
        self.record = record
        self.log: list[tuple] = []

    def set_label(self, label: str) -> None:
        self.label = label
        self.phase_starts.setdefault(label, self.total)

    def _change(self, name: str, nbytes: int, cat: str) -> None:
        self.total += nbytes
        self.by_category[cat] = self.by_category.get(cat, 0) + nbytes
        if self.record:
            self.log.append((self.label, name, nbytes, cat))
        if self.total > self.peak:
            self.peak, self.peak_label = self.total, self.label
            self.peak_by_category = dict(self.by_category)
        if self.total > self.phase_peaks.get(self.label, -1):
            self.phase_peaks[self.label] = self.total

    def alloc(self, name: str, nbytes: int, cat: str, saved: bool = False) -> str:
        if nbytes <= 0:
            return name
        if name in self.live:
            raise AssertionError(f"tape: {name} allocated twice")
        self.live[name] = [nbytes, cat, 2 if saved else 1]
        if saved and self.forward:
            self.saved[name] = nbytes
        self._change(name, nbytes, cat)
        return name

    def hold(self, name: str, saved: bool = False) -> None:
        entry = self.live.get(name)
        if entry is None:
            return
        entry[2] += 1
        if saved and self.forward:
            self.saved[name] = entry[0]

    def free(self, *names: str | None) -> None:
        for name in names:
            entry = self.live.get(name) if name else None
            if entry is None:
                continue
            entry[2] -= 1
            if entry[2] == 0:
                del self.live[name]
                self._change(name, -entry[0], entry[1])

    def owners(self, name: str) -> int:
        entry = self.live.get(name)
        return entry[2] if entry else 0


@dataclass
class StepMemory:
    """A simulated step: the peak, the phase it happened in, and what was alive then, by category."""

    peak: int
    phase: str
    breakdown: dict[str, int]
    saved_bytes: int  # what autograd saves in the forward (parameters excluded)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    phase_starts: dict[str, int] = field(default_factory=dict)
    log: list = field(default_factory=list, repr=False)

    def transient(self, phase: str) -> int:
        """Bytes a phase adds above what was alive when it began."""
        return self.phase_peaks.get(phase, 0) - self.phase_starts.get(phase, 0)

    def summary(self) -> str:
        rows = [f"peak {format_bytes(self.peak)} during {self.phase}"]
        for cat, b in sorted(self.breakdown.items(), key=lambda kv: -kv[1]):
            if b:
                rows.append(f"  {cat:<16} {format_bytes(b):>12}")
        return "\n".join(rows)


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def host_rss_bytes() -> int:
    """This process's resident bytes now (Linux /proc), else its peak (``getrusage``): a CPU trainer's memory."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
