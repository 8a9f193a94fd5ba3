"""The provenance stamp every made bundle carries: the command that made it and when.

One helper so every maker (bundle create, distill, INT8, LM export) records the command the same way —
``bastion`` plus the arguments as typed, shell-quoted so it can be pasted back — and the time in UTC,
second precision, ISO 8601 with a ``Z`` (the format the manifests have always had).
"""

from __future__ import annotations

import shlex
import sys
import time


def stamp() -> dict[str, str]:
    """``{"command": "bastion …", "created": "YYYY-MM-DDTHH:MM:SSZ"}`` for the running process."""
    return {
        "command": shlex.join(["bastion", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
