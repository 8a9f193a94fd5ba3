"""The trust store: which public keys may sign the bundles this unit runs.

Two sources of keys: the built-in anchors shipped in ``models/anchors/`` (the
project zoo key) and keys the operator trusted, under
``BASTION_HOME/trust/keys``.  A revocation list (``trust/revoked.json``) beats
both, so a nation drops our anchor with ``bastion keys revoke <id>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import ConfigError, KeyFileError
from bastion.models.atomic import atomic_write_bytes, file_lock
from bastion.models.home import bastion_home
from bastion.models.keys import PUBLIC_SUFFIX, key_id, load_public_key, public_pem

ANCHORS_DIR = Path(__file__).resolve().parent / "anchors"


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    source: str  # "built-in" or "local"
    path: Path
    revoked: bool = False


class TrustStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else bastion_home() / "trust"
        self.keys_dir = self.root / "keys"
        self.revoked_path = self.root / "revoked.json"
        self.lock_path = self.root / ".lock"

    # -- reading -----------------------------------------------------------------------------------
    def revoked(self) -> dict[str, dict]:
        if not self.revoked_path.is_file():
            return {}
        try:
            return json.loads(self.revoked_path.read_text()).get("revoked", {})
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"revocation list {self.revoked_path} is damaged",
                              "restore it from backup; refusing to guess which keys are revoked") from None

    def keys(self) -> dict[str, TrustedKey]:
        revoked = self.revoked()
        found: dict[str, TrustedKey] = {}
        for source, directory in (("built-in", ANCHORS_DIR), ("local", self.keys_dir)):
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
                public = load_public_key(path)
                kid = key_id(public)
                found[kid] = TrustedKey(kid, public, source, path, kid in revoked)
        return found

    def lookup(self, kid: str) -> TrustedKey | None:
        return self.keys().get(kid)

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked()

    # -- writing -----------------------------------------------------------------------------------
    def trust(self, public_key_file: Path) -> str:
        public = load_public_key(public_key_file)
        kid = key_id(public)
        with file_lock(self.lock_path):
            if kid in self.revoked():
                raise KeyFileError(f"key {kid} was revoked on this unit",
                                   f"if that was a mistake, remove it from {self.revoked_path} by hand")
            atomic_write_bytes(self.keys_dir / f"{kid}{PUBLIC_SUFFIX}", public_pem(public))
        return kid

    def resolve_id(self, prefix: str) -> str:
        matches = [k for k in self.keys() if k.startswith(prefix)]
        if len(matches) != 1:
            raise ConfigError(f"{'no' if not matches else 'more than one'} trusted key matches {prefix!r}",
                              "see: bastion keys list")
        return matches[0]

    def revoke(self, prefix: str, reason: str = "") -> str:
        kid = self.resolve_id(prefix)
        with file_lock(self.lock_path):
            revoked = self.revoked()
            revoked[kid] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason}
            atomic_write_bytes(self.revoked_path, json.dumps({"revoked": revoked}, indent=2).encode())
        return kid
