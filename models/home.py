"""Where bastion keeps its state: ``BASTION_HOME`` (default ``~/.local/share/bastion``)."""

from __future__ import annotations

import os
from pathlib import Path


def bastion_home() -> Path:
    """The state directory: trust store, registry, caches. Read from the environment on every call."""
    configured = os.environ.get("BASTION_HOME")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bastion"
