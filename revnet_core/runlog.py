"""A training run's files, framework-free: the JSONL log (one record a line: a ``run`` or ``resume`` header,
then ``train`` and ``eval`` records), its plot, and the result file. Every backend's trainer writes the same
records, so one reader and one plot serve them all."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
PLOT_NAME = "train.png"
RESULT_NAME = "run.json"


class RunLog:
    """A trainer's records: each kept in ``history`` and, once opened with a folder, appended to its
    log.jsonl, flushed per record (a resumed run's log cut back to the step it resumes from)."""

    def __init__(self, history: list[dict[str, Any]]):
        self.history = history
        self._file = None

    def open(self, out_dir: Path | None, header: dict[str, Any], start: int) -> None:
        """Start the log with ``header`` (a run or resume record); ``start`` > 0 continues an existing one."""
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / LOG_NAME
            if start > 0 and path.exists():
                truncate_log(path, start)
            self._file = open(path, "a" if start > 0 else "w")
        self.emit(header)

    def emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def sigint_noted():
    """Ctrl-C while a run's last files are written is noted in the yielded list, never raised mid-write (off
    the main thread, where no handler can be set, the list stays empty)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step``: a run that died after its last checkpoint logged steps it will redo."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    _replace(path, "".join(kept))


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, replacing ``path`` atomically."""
    _replace(path, json.dumps(obj, indent=1, default=str) + "\n")


def _replace(path: Path, text: str) -> None:
    # Write beside, then rename: a crash leaves the old file or the new one, never half of one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def eval_line(record: dict[str, Any]) -> str:
    """An ``eval`` record as one line for the console: loss, bits per byte (or token), accuracy."""
    parts = [f"step {record['step']}: eval loss {record['eval_loss']:.4f}"]
    for key in ("eval_bits_per_byte", "eval_bits_per_token"):
        if key in record:
            parts.append(f"{key[5:].replace('_', ' ')} {record[key]:.4f}")
    if "eval_accuracy" in record:
        parts.append(f"accuracy {record['eval_accuracy']:.3f}")
    return ", ".join(parts)


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """A PNG of training loss (and held-out loss) and memory over steps from a ``log.jsonl``; a dashed line
    marks each step a run was resumed from."""
    png_path = Path(png_path)
    log_figure(read_log(log_path)).savefig(png_path, dpi=100)
    return png_path


def log_figure(records: list[dict[str, Any]]):
    """The matplotlib Figure that ``plot_log`` saves, from a log's records."""
    # Imported here: matplotlib takes a while to load and only the end of a run needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    headers = [r for r in records if r.get("kind") in ("run", "resume")]
    mem_kind = headers[-1].get("mem_kind", "") if headers else ""
    fig = Figure(figsize=(9, 6.5), layout="constrained")  # no pyplot: leaves the user's backend alone
    FigureCanvasAgg(fig)
    ax_loss, ax_mem = fig.subplots(2, 1, sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    for i, r in enumerate(x for x in headers if x.get("kind") == "resume"):  # where a run was continued
        for ax in (ax_loss, ax_mem):
            ax.axvline(r["step"], color="gray", ls="--", lw=1, label=None if i or ax is ax_mem else "resumed")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_mem.plot([r["step"] for r in train], [r["mem_bytes"] / 2**20 for r in train], lw=1)
    ax_mem.set_ylabel("peak allocated, MiB" if mem_kind.startswith("cuda") else "process RSS, MiB")
    ax_mem.set_xlabel("step")
    ax_mem.grid(alpha=0.3)
    return fig
