"""Signing a bundle and verifying it against the trust store (or the signed trust policy in force).

The ``signature`` file holds an Ed25519 signature over the manifest's canonical
bytes; the manifest holds the sha256 of every payload file.  So one signature
check plus the payload hashes cover every byte of the bundle.

Countersignatures (``bastion bundle countersign``) sign the very same bytes and
live in a second file, ``countersignatures``, so the first signer's file keeps
its format and a bastion that predates countersigning still reads it (as the
1-of-1 case).  Each countersignature carries its signer's public key, so any
holder can check it cryptographically even before trusting the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import SignatureError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.keys import SIGNATURE_BYTES, key_id, verify_signature
from bastion.models.manifest import Manifest
from bastion.models.safe_read import read_bounded
from bastion.models.signer import Signer
from bastion.models.trust import TrustStore

SIGNATURE_NAME = "signature"
SIGNATURE_FORMAT = "bastion-signature/1"
COUNTERSIGNATURES_NAME = "countersignatures"
COUNTERSIGNATURES_FORMAT = "bastion-countersignatures/1"
MAX_SIGNATURES = 32  # the first signature and its countersignatures: a coalition, not a crowd
MAX_COUNTERSIGNATURES_BYTES = 32 * 1024  # one record is ~350 bytes
UNSIGNED_HINT = "sign it with `bastion bundle sign`, or for development only pass --allow-unsigned"


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_key_id(raw: bytes) -> str:
    """The key id (models/keys.py ``key_id``) of a raw 32-byte public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SignatureRecord:
    key_id: str
    manifest_sha256: str
    signature: bytes
    public: bytes | None = None  # raw Ed25519 public key; countersignatures carry it

    def to_dict(self) -> dict:
        data = {
            "format": SIGNATURE_FORMAT,
            "algorithm": "ed25519",
            "key_id": self.key_id,
            "manifest_sha256": self.manifest_sha256,
            "signature": base64.b64encode(self.signature).decode(),
        }
        if self.public is not None:
            data["public"] = base64.b64encode(self.public).decode()
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: dict) -> "SignatureRecord":
        """Parse one record; ValueError/KeyError/TypeError/binascii.Error on anything malformed."""
        if data.get("format") != SIGNATURE_FORMAT or data.get("algorithm") != "ed25519":
            raise ValueError("unknown format")
        signature = base64.b64decode(data["signature"], validate=True)
        public = base64.b64decode(data["public"], validate=True) if data.get("public") is not None else None
        record = cls(str(data["key_id"]), str(data["manifest_sha256"]), signature, public)
        if len(signature) != SIGNATURE_BYTES:
            raise ValueError("signature length")
        if public is not None and (len(public) != 32 or raw_key_id(public) != record.key_id):
            raise ValueError("public key does not match the key id")
        return record


@dataclass(frozen=True)
class Verification:
    """Outcome of a successful check: who signed (or that an unsigned bundle was explicitly allowed)."""

    signed: bool
    key_id: str | None = None
    key_source: str | None = None
    note: str = ""
    signers: tuple[str, ...] = ()  # every key id whose signature counted
    policy: str = ""  # "policy v3, rule 'coalition-*'" when a signed trust policy decided

    @property
    def summary(self) -> str:
        if not self.signed:
            return f"NOT VERIFIED: {self.note}"
        if self.policy:
            return f"signatures OK under {self.policy}: keys {', '.join(self.signers)}"
        if len(self.signers) > 1:
            return f"signatures OK, {len(self.signers)} trusted keys: {', '.join(self.signers)}"
        return f"signature OK, key {self.key_id} ({self.key_source})"


def sign_manifest(root: Path, manifest: Manifest, private: Signer) -> SignatureRecord:
    """Write ``root/signature`` for ``manifest`` (whose payload the caller has already verified); ``private`` is a
    key file's key or a key on a token (models/signer.py)."""
    record = SignatureRecord(key_id(private.public_key()), manifest.sha256(), private.sign(manifest.canonical_bytes()))
    atomic_write_bytes(Path(root) / SIGNATURE_NAME, record.to_json())
    return record


# what a damaged, hostile or non-bastion signature file raises while read and parsed (TooLarge and NotRegular
# are OSErrors): each becomes one SignatureError a soldier can act on, never a traceback
_DAMAGED = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    binascii.Error,
    UnicodeDecodeError,
    RecursionError,
    OSError,
)


def read_signature(root: Path, name: str) -> SignatureRecord | None:
    path = Path(root) / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:  # a signature record is ~300 bytes: bounded before it is read, nesting refused
        data = json.loads(read_bounded(path, 4096).decode("utf-8"))
        signature = base64.b64decode(data["signature"], validate=True)
        if len(signature) != SIGNATURE_BYTES:
            raise _bad_length(name, len(signature))
        record = SignatureRecord.from_dict(data)
    except _DAMAGED:
        raise SignatureError(
            f"bundle {name}: the signature file is damaged or not a bastion signature",
            "copy the bundle again from its maker",
        ) from None
    return record


def _bad_length(name: str, size: int) -> SignatureError:
    return SignatureError(
        f"bundle {name}: signature is {size} bytes, an Ed25519 signature is {SIGNATURE_BYTES}",
        "the signature file is damaged; copy the bundle again",
    )


def read_countersignatures(root: Path, name: str) -> list[SignatureRecord]:
    """The records of ``root/countersignatures`` (none when the file is absent); bounded in bytes and count."""
    path = Path(root) / COUNTERSIGNATURES_NAME
    if not path.exists():
        return []
    damaged = SignatureError(
        f"bundle {name}: the countersignatures file is damaged, too large or holds more than "
        f"{MAX_SIGNATURES - 1} signatures",
        "copy the bundle again from its maker",
    )
    try:  # bounded before it is read (TooLarge, NotRegular are OSErrors), nesting refused
        data = json.loads(read_bounded(path, MAX_COUNTERSIGNATURES_BYTES).decode("utf-8"))
        if data.get("format") != COUNTERSIGNATURES_FORMAT or not isinstance(data.get("signatures"), list):
            raise ValueError("unknown format")
        if len(data["signatures"]) > MAX_SIGNATURES - 1:
            raise damaged
        records = [SignatureRecord.from_dict(item) for item in data["signatures"]]
    except _DAMAGED:
        raise damaged from None
    if any(r.public is None for r in records):
        raise damaged
    return records


def read_signatures(root: Path, name: str) -> list[SignatureRecord]:
    """Every signature of the bundle: the first signer's, then the countersignatures; distinct signers."""
    first = read_signature(root, name)
    counter = read_countersignatures(root, name)
    if first is None:
        if counter:
            raise SignatureError(
                f"bundle {name} has countersignatures but no signature file", "copy the bundle again from its maker"
            )
        return []
    records = [first, *counter]
    seen = [r.key_id for r in records]
    if len(set(seen)) != len(seen):
        raise SignatureError(
            f"bundle {name}: the same key signed it twice (a replayed countersignature)",
            "copy the bundle again from its maker",
        )
    return records


def check_record(record: SignatureRecord, public: Ed25519PublicKey | None, manifest: Manifest, name: str) -> None:
    """Raise a SignatureError unless ``record`` signs this very manifest (checked with ``public`` when known)."""
    if record.manifest_sha256 != manifest.sha256():
        raise SignatureError(
            f"bundle {name}: the signature by key {record.key_id} covers another manifest "
            "(changed after signing, or copied from another bundle)",
            "refusing to run it",
        )
    if public is None and record.public is not None:
        public = Ed25519PublicKey.from_public_bytes(record.public)
    if public is not None and not verify_signature(public, record.signature, manifest.canonical_bytes()):
        raise SignatureError(
            f"bundle {name}: the signature does not verify with key {record.key_id} (forged or corrupted)",
            "refusing to run it",
        )


def countersign(root: Path, manifest: Manifest, private: Signer, known_keys: dict) -> SignatureRecord:
    """Add a countersignature over the same canonical manifest bytes; the payload and manifest are untouched.

    Refused when the bundle is unsigned, when this key already signed it, when the list is full, or when any
    signature already there does not sign this manifest (``known_keys``: key id → public key, for records that
    carry no public key of their own)."""
    name = f"{manifest.name}:{manifest.version}"
    records = read_signatures(root, name)
    if not records:
        raise SignatureError(f"bundle {name} is not signed yet", "sign it first: bastion bundle sign BUNDLE --key KEY")
    for record in records:
        check_record(record, known_keys.get(record.key_id), manifest, name)
    kid = key_id(private.public_key())
    if any(r.key_id == kid for r in records):
        raise SignatureError(f"bundle {name} is already signed by key {kid}", "each key signs a bundle once")
    if len(records) >= MAX_SIGNATURES:
        raise SignatureError(f"bundle {name} already carries {MAX_SIGNATURES} signatures, the most a bundle may")
    record = SignatureRecord(
        kid, manifest.sha256(), private.sign(manifest.canonical_bytes()), raw_public(private.public_key())
    )
    counter = [*records[1:], record]
    body = {"format": COUNTERSIGNATURES_FORMAT, "signatures": [r.to_dict() for r in counter]}
    atomic_write_bytes(Path(root) / COUNTERSIGNATURES_NAME, json.dumps(body, indent=2).encode() + b"\n")
    return record


def verify_manifest(root: Path, manifest: Manifest, trust: TrustStore) -> Verification:
    """Check the bundle's signatures against ``manifest`` and this unit's trust: the signed trust policy in force
    (``bastion policy apply``), or without one the trust store, where one trusted signature is enough (1-of-1).
    Raise a SignatureError naming why not."""
    from bastion.models.policy_store import PolicyStore

    name = f"{manifest.name}:{manifest.version}"
    records = read_signatures(root, name)
    if not records:
        raise SignatureError(f"bundle {name} is not signed", UNSIGNED_HINT)
    policy = PolicyStore(trust).in_force()
    if policy is not None:
        from bastion.models.policy_check import verify_with_policy

        return verify_with_policy(policy, records, manifest, trust)
    if len(records) == 1:
        return _verify_one(records[0], manifest, trust, name)
    return _verify_any(records, manifest, trust, name)


def _verify_any(records: list[SignatureRecord], manifest: Manifest, trust: TrustStore, name: str) -> Verification:
    """No policy: every signature must sign this manifest; those by trusted, unrevoked keys count; one is enough."""
    keys, good, skipped = trust.keys(), [], []
    for record in records:
        known = keys.get(record.key_id)
        check_record(record, known.public if known else None, manifest, name)
        if known is None:
            skipped.append(f"{record.key_id} not trusted")
        elif known.revoked:
            skipped.append(f"{record.key_id} revoked")
        else:
            good.append(known)
    if not good:
        raise SignatureError(
            f"bundle {name}: none of its {len(records)} signatures is by a key this unit trusts ({'; '.join(skipped)})",
            "if you trust one of its signers: bastion keys trust THEIR_KEY.pub",
        )
    return Verification(True, good[0].key_id, good[0].source, signers=tuple(k.key_id for k in good))


def _verify_one(record: SignatureRecord, manifest: Manifest, trust: TrustStore, name: str) -> Verification:
    """The 1-of-1 case, as bastion has always checked it."""
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
    return Verification(True, record.key_id, trusted.source, signers=(record.key_id,))
