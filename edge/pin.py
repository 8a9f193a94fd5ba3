"""The model an admin pinned: a ``reload`` with ``persist: true`` survives the node's restart.

``STORAGE/pin.json`` names the bundle (as the reload gave it, a path made
absolute) and the sha256 that was verified then; it is written atomically
(temp file, fsync, rename) before the reload is audited, and only an ``admin``
may reload (edge/roles.py).  At start the node loads the pinned bundle instead of
its config's ``model`` — verified like any load (signature, trust, revocation,
releasability), and it must still be the very bundle pinned (same sha256).

If it is not (gone, revoked, replaced, the file damaged), the node says so in one
line, audits ``pin_refused`` and runs its config's model, which is verified too:
a pin only ever chooses among bundles the unit would load anyway, so falling back
runs nothing the trust store did not allow, while refusing to start would take a
field unit down over a file its admin can fix remotely only through the control
socket of a running node.  The pin stays, and ``status`` shows it refused, until
an admin reloads again or someone clears it (``bastion node pin --clear``).

The file is not signed: a pin.json written by hand is held to the same checks
(tests/test_roles_attack.py), so only a verified bundle runs and the load is
audited — but it may name any bundle the unit verifies, an older one included.
Under the shipped systemd unit the node can write the storage dir but not
node.yaml, nor the trust store and unit key (docs/security.md, roles).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.edge.audit import AuditLog
from bastion.errors import BastionError, ConfigError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.safe_read import read_bounded
from bastion.runtime.detect import Detector

log = logging.getLogger(__name__)
PIN_FILE = "pin.json"
MAX_PIN_BYTES = 16 * 1024


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: int = Field(1, ge=1, le=1)
    bundle: str = Field(min_length=1, max_length=4096)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field(max_length=200)
    version: str = Field(max_length=200)
    by: str = Field(max_length=200)  # the client label (CurveZMQ key id) that asked
    at: float


def bundle_ref(bundle: str) -> str:
    """What to load again after a restart: a path that exists here made absolute (the node's cwd may differ), else
    the name as given (a registry or zoo name)."""
    path = Path(bundle)
    try:
        return str(path.resolve()) if path.exists() else bundle
    except (OSError, RuntimeError):  # a name too long, a symlink loop: kept as given, refused at load
        return bundle


def read_pin(storage: Path) -> Pin | None:
    """The pin in ``storage``, None without one; a damaged file is a ``ConfigError`` naming it."""
    path = Path(storage) / PIN_FILE
    try:
        return Pin.model_validate_json(read_bounded(path, MAX_PIN_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError, BastionError) as exc:
        raise ConfigError(
            f"{path} is damaged ({type(exc).__name__}), not the pin a node writes",
            "remove it (bastion node pin --clear) or reload again with persist",
        ) from None


def write_pin(storage: Path, pin: Pin) -> None:
    atomic_write_bytes(Path(storage) / PIN_FILE, pin.model_dump_json(indent=1).encode(), 0o640)


def clear_pin(storage: Path) -> bool:
    """Remove the pin; True if there was one. The node runs its config's model from its next start."""
    path = Path(storage) / PIN_FILE
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def new_pin(bundle: str, detector: Detector, by: str) -> Pin:
    m = detector.manifest
    return Pin(
        bundle=bundle_ref(bundle),
        sha256=detector.bundle_sha256,
        name=m.name,
        version=str(m.version),
        by=by,
        at=time.time(),
    )


def load_start_model(
    storage: Path,
    config_model: str,
    audit: AuditLog,
    load: Callable[[str], Detector],
    fits: Callable[[Detector], None] = lambda detector: None,
) -> tuple[Detector, dict[str, Any] | None]:
    """The detector a starting node runs (the pinned bundle if it still verifies and ``fits`` the node's config —
    which may have changed since the pin: a zone naming a class the pinned model lacks — else the config's) and the
    pin's state for ``status`` (None without a pin)."""
    try:
        pin = read_pin(storage)
    except ConfigError as exc:
        return _fall_back(config_model, audit, load, None, str(exc))
    if pin is None:
        return load(config_model), None
    try:
        detector = load(pin.bundle)
    except BastionError as exc:
        return _fall_back(config_model, audit, load, pin, str(exc))
    if detector.bundle_sha256 != pin.sha256:
        got = detector.bundle_sha256
        detector.close()
        reason = f"{pin.bundle} is now bundle {got[:12]}, not the {pin.sha256[:12]} pinned"
        return _fall_back(config_model, audit, load, pin, reason)
    try:
        fits(detector)
    except BastionError as exc:
        detector.close()
        return _fall_back(config_model, audit, load, pin, f"it does not fit this node's config: {exc}")
    audit.append("pin_loaded", bundle=pin.bundle, sha256=pin.sha256, pinned_by=pin.by, pinned_at=pin.at)
    return detector, {**pin.model_dump(), "state": "running"}


def _fall_back(
    config_model: str, audit: AuditLog, load: Callable[[str], Detector], pin: Pin | None, reason: str
) -> tuple[Detector, dict[str, Any]]:
    bundle = pin.bundle if pin is not None else PIN_FILE
    log.error(
        "pinned model %s refused (%s); running the config's model %s — reload again with persist, or clear the pin "
        "(bastion node pin --clear)",
        bundle,
        reason,
        config_model,
    )
    audit.append("pin_refused", bundle=bundle, reason=reason, running=str(config_model))
    state = {**(pin.model_dump() if pin is not None else {}), "state": "refused", "reason": reason}
    return load(config_model), state


def pin_summary(storage: Path) -> dict[str, Any] | None:
    """The pin as the CLI shows it (``bastion node pin``)."""
    pin = read_pin(storage)
    return json.loads(pin.model_dump_json()) if pin is not None else None
