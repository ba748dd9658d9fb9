"""``revnet train``'s flags and ``--config`` TOML file into a ``revnet_core.settings.TrainSettings``, and
the run folder they name. Only the CLI reads files and flags; every backend's trainer takes the settings."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from revnet_core.errors import ConfigError
from revnet_core.settings import TrainSettings


def settings_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainSettings)}


def load_config_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file (top level or a ``[train]`` table); unknown keys raise ConfigError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    if "train" in raw and isinstance(raw["train"], dict):
        extra = sorted(k for k in raw if k != "train")
        if extra:
            raise ConfigError(f"config file {path!r}: keys {extra} lie outside the [train] table")
        raw = raw["train"]
    known = settings_fields()
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path!r}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if name == "data" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


def build_settings(args: Any) -> TrainSettings:
    """Defaults, then the ``--config`` file, then the flags given on the command line (``args``: an
    ``argparse.Namespace``; a missing attribute means the flag was not given)."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_config_file(config_path))
    for name in settings_fields():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    settings = TrainSettings(**values)
    settings.validate()
    return settings


def resolve_out(settings: TrainSettings) -> None:
    # --resume with no value continues the --out folder; --resume PATH writes next to that checkpoint.
    if settings.resume == "":
        if settings.out is None:
            raise ConfigError("--resume without a path needs --out DIR (the run folder to continue)")
        settings.resume = settings.out
    if settings.resume is not None and not Path(settings.resume).exists():
        raise ConfigError(f"nothing to resume at {settings.resume!r}")
    if settings.out is None:
        if settings.resume is not None:
            p = Path(settings.resume)
            settings.out = os.fspath(p if p.is_dir() else p.parent)
        else:
            base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
            out, n = base, 1
            while out.exists():
                n += 1
                out = base.with_name(f"{base.name}-{n}")
            settings.out = os.fspath(out)
