"""ONNX Runtime's own telemetry, switched off before it can start.

Official onnxruntime wheels for Linux (1.32 measured) carry a 1DS telemetry client: importing the
package writes a persistent device id and an event queue under ``~/.cache/Microsoft/DeveloperTools``
and holds an uploader for ``mobile.events.data.microsoft.com``. It is initialised when onnxruntime is
*imported*, so ``onnxruntime.disable_telemetry_events()`` afterwards is too late (the id is already
on disk); only the ``ORT_DISABLE_TELEMETRY`` environment variable, set before the import, keeps it
from starting. It also stays silent under CI variables such as ``GITHUB_ACTIONS``, which is why a
test suite run on CI never notices it. bastion promises that nothing calls home, so importing
``bastion`` sets the variable (an operator who set it explicitly keeps their value).
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "ORT_DISABLE_TELEMETRY"
log = logging.getLogger(__name__)


def keep_onnxruntime_quiet() -> None:
    """Set ``ORT_DISABLE_TELEMETRY=1`` for this process and its children, before onnxruntime loads."""
    os.environ.setdefault(ENV, "1")


def imported_too_late() -> bool:
    """True when onnxruntime was imported before bastion could switch its telemetry off."""
    return "onnxruntime" in sys.modules and not _was_set_before_import


def status() -> tuple[bool, str]:
    """(is the client kept off, one line saying why) for ``bastion doctor``."""
    if imported_too_late():
        return False, "onnxruntime was imported before bastion: set ORT_DISABLE_TELEMETRY=1 in the environment"
    if os.environ.get(ENV, "") not in ("1", "true", "True", "TRUE"):
        return False, f"{ENV}={os.environ.get(ENV)!r}: onnxruntime's telemetry client may start"
    return True, f"{ENV}=1: onnxruntime's telemetry client never starts"


_was_set_before_import = "onnxruntime" not in sys.modules or os.environ.get(ENV) == "1"
keep_onnxruntime_quiet()
