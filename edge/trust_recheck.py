"""A running node holds its models to the trust in force now, not to the trust it started with.

A revocation applied from a USB stick (``bastion keys revoke``, a signed ``bastion policy apply``), a signing key
whose validity window has ended, or a policy past its expiry must stop a model that verified at load: otherwise a
unit that runs for months keeps running what its coalition has withdrawn, until someone restarts it. Every
``trust_recheck_s`` the node verifies the signatures of each bundle it runs — the manifest it verified at load,
kept in memory, whose hashes cover the payload that runs — against the trust store and policy as they are now
(milliseconds: the payload is not hashed again). A bundle that no longer verifies stops the node: audited
``model_untrusted``, one line in the log and ``status``, a non-zero exit, and its next start refuses the bundle
as any load would. A node under ``allow_unsigned`` is not re-checked: it would load the same bundle again
at its next start (with the warning that flag always prints), so stopping it would only restart it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bastion.errors import BastionError
from bastion.models.manifest import Manifest


@dataclass(frozen=True)
class RunningBundle:
    """What the node verified at load and runs now."""

    role: str  # "model" or "lm"
    label: str  # name:version
    root: Path
    manifest: Manifest
    sha256: str


def untrusted(running: RunningBundle) -> str | None:
    """None while ``running``'s signatures satisfy the trust in force (this unit's BASTION_HOME), else why not,
    in one line."""
    from bastion.models.signing import verify_manifest
    from bastion.models.trust import TrustStore

    try:
        verify_manifest(running.root, running.manifest, TrustStore())
    except BastionError as exc:
        return str(exc)
    except Exception as exc:  # a trust store that cannot even be read (a file where a folder was): fail closed
        return f"the trust store cannot be read ({type(exc).__name__}: {exc})"
    return None
