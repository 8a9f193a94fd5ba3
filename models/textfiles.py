"""Reading the small YAML/JSON files users hand us, with one-line errors (one helper, used everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.errors import ConfigError, InputNotFoundError


def read_yaml_mapping(path: Path, what: str, missing_hint: str | None = None) -> dict[str, Any]:
    """``path`` parsed as YAML (JSON is YAML) that must be a mapping; an empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}", missing_hint)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)", "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping ({what})")
    return data


def first_error(exc: ValidationError, default: str = "value") -> str:
    """'field.path: message' of a pydantic error's first problem."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or default
    return f"{where}: {first['msg']}"
