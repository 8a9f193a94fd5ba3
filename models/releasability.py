"""Whether a bundle may run on this unit's nation, from the signed markings in its manifest.

A unit knows its nation from the node config (``nation:``), the SDK (``Detector.load(..., nation=)``) or the
``BASTION_NATION`` environment variable (``bastion detect``, scripts).  A bundle whose ``releasable_to`` list is
not empty and lacks that nation is refused in one line — after the signature check, so the markings read are
the ones the signers signed, and also under ``--allow-unsigned``: a development override never releases a model
across a national line.  A unit with no nation configured checks nothing.
"""

from __future__ import annotations

import os
import re

from bastion.errors import ConfigError, ModelLoadError
from bastion.models.manifest import Manifest

NATION_ENV = "BASTION_NATION"
NATION_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{1,9}$")


class ReleasabilityError(ModelLoadError):
    """The bundle's signed markings do not release it to this unit's nation."""


def unit_nation(explicit: str | None = None) -> str | None:
    """The nation this unit runs for: ``explicit`` if given, else ``BASTION_NATION``, else None."""
    raw = explicit if explicit is not None else os.environ.get(NATION_ENV, "")
    value = raw.strip().upper()
    if not value:
        return None
    if not NATION_PATTERN.match(value):
        raise ConfigError(
            f"nation {raw!r} is not a country code",
            "use an ISO 3166 alpha-3 code such as CAN or GBR, or a group code such as NATO (2-10 letters or digits)",
        )
    return value


def check_releasable(manifest: Manifest, nation: str | None) -> None:
    """Refuse ``manifest`` when ``nation`` is set and its markings do not release the bundle to it."""
    if nation is None or manifest.markings is None or not manifest.markings.releasable_to:
        return
    if nation not in manifest.markings.releasable_to:
        raise ReleasabilityError(
            f"bundle {manifest.name}:{manifest.version} is marked {manifest.markings.summary()}: "
            f"not releasable to {nation}, this unit's nation",
            "refusing to load it; ask its owners for a release to your nation",
        )
