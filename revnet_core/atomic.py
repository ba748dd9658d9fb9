"""Files replaced atomically: a crash or a kill leaves the old file or the new one, never part of either."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def temp_name(path: Path, pid: int | None = None) -> Path:
    """Where a save of ``path`` by process ``pid`` (default: this one) writes first: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write the new file to. When the block ends normally the file
    is fsynced, renamed over ``path`` and the folder synced; on an error the temporary file is removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (its entry on disk); a platform that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
