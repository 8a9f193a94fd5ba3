"""Signing a bundle and verifying it against the trust store.

The ``signature`` file holds an Ed25519 signature over the manifest's canonical
bytes; the manifest holds the sha256 of every payload file.  So one signature
check plus the payload hashes cover every byte of the bundle.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.errors import SignatureError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.keys import SIGNATURE_BYTES, key_id, verify_signature
from bastion.models.manifest import Manifest
from bastion.models.safe_read import read_bounded
from bastion.models.trust import TrustStore

SIGNATURE_NAME = "signature"
SIGNATURE_FORMAT = "bastion-signature/1"
UNSIGNED_HINT = "sign it with `bastion bundle sign`, or for development only pass --allow-unsigned"


@dataclass(frozen=True)
class SignatureRecord:
    key_id: str
    manifest_sha256: str
    signature: bytes

    def to_json(self) -> bytes:
        return (
            json.dumps(
                {
                    "format": SIGNATURE_FORMAT,
                    "algorithm": "ed25519",
                    "key_id": self.key_id,
                    "manifest_sha256": self.manifest_sha256,
                    "signature": base64.b64encode(self.signature).decode(),
                },
                indent=2,
            ).encode()
            + b"\n"
        )


@dataclass(frozen=True)
class Verification:
    """Outcome of a successful check: who signed (or that an unsigned bundle was explicitly allowed)."""

    signed: bool
    key_id: str | None = None
    key_source: str | None = None
    note: str = ""

    @property
    def summary(self) -> str:
        if self.signed:
            return f"signature OK, key {self.key_id} ({self.key_source})"
        return f"NOT VERIFIED: {self.note}"


def sign_manifest(root: Path, manifest: Manifest, private: Ed25519PrivateKey) -> SignatureRecord:
    """Write ``root/signature`` for ``manifest`` (whose payload the caller has already verified)."""
    record = SignatureRecord(key_id(private.public_key()), manifest.sha256(), private.sign(manifest.canonical_bytes()))
    atomic_write_bytes(Path(root) / SIGNATURE_NAME, record.to_json())
    return record


def read_signature(root: Path, name: str) -> SignatureRecord | None:
    path = Path(root) / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:  # a signature record is ~300 bytes: bounded before it is read, nesting refused
        data = json.loads(read_bounded(path, 4096).decode("utf-8"))
        if data.get("format") != SIGNATURE_FORMAT or data.get("algorithm") != "ed25519":
            raise ValueError("unknown format")
        signature = base64.b64decode(data["signature"], validate=True)
        record = SignatureRecord(str(data["key_id"]), str(data["manifest_sha256"]), signature)
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        binascii.Error,
        UnicodeDecodeError,
        RecursionError,
        OSError,
    ):  # TooLarge and NotRegular are OSErrors
        raise SignatureError(
            f"bundle {name}: the signature file is damaged or not a bastion signature",
            "copy the bundle again from its maker",
        ) from None
    if len(record.signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"bundle {name}: signature is {len(record.signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}",
            "the signature file is damaged; copy the bundle again",
        )
    return record


def verify_manifest(root: Path, manifest: Manifest, trust: TrustStore) -> Verification:
    """Check ``root/signature`` against ``manifest`` and the trust store, or raise a SignatureError naming why."""
    name = f"{manifest.name}:{manifest.version}"
    record = read_signature(root, name)
    if record is None:
        raise SignatureError(f"bundle {name} is not signed", UNSIGNED_HINT)
    if trust.is_revoked(record.key_id):
        raise SignatureError(
            f"bundle {name} is signed by key {record.key_id}, which is revoked on this unit",
            "get a bundle re-signed by a key you trust",
        )
    trusted = trust.lookup(record.key_id)
    if trusted is None:
        raise SignatureError(
            f"bundle {name} is signed by key {record.key_id}, which this unit does not trust",
            "if you trust its maker: bastion keys trust THEIR_KEY.pub",
        )
    if not verify_signature(trusted.public, record.signature, manifest.canonical_bytes()):
        if record.manifest_sha256 != manifest.sha256():
            raise SignatureError(
                f"bundle {name}: the manifest was changed after signing (or the signature belongs to another bundle)",
                "refusing to run it",
            )
        raise SignatureError(
            f"bundle {name}: the signature does not verify with key {record.key_id} (forged or corrupted)",
            "refusing to run it",
        )
    if record.manifest_sha256 != manifest.sha256():  # signed bytes fine, but the record around them was edited
        raise SignatureError(
            f"bundle {name}: the signature file was edited (its manifest hash is wrong)",
            "copy the bundle again from its maker",
        )
    return Verification(True, record.key_id, trusted.source)
