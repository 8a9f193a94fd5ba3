"""``bastion bundle sign`` on a bundle that already carries signatures: what happens to the others.

A plain ``signature`` file was always simply overwritten (a nation re-signing a bundle with its own key).  Once a
bundle is countersigned, overwriting it silently could drop a partner's signature (a new key replaced the first
signer's) or leave countersignatures over an earlier manifest beside a signature over the new one (a bundle no
unit loads, discovered only in the field).  So, with countersignatures present:

- signing again with a key already there, manifest unchanged: that key's signature is replaced, the others kept;
- a key not yet there, manifest unchanged: refused — it would replace the first signer's; ``countersign`` adds it;
- signatures over an earlier manifest (the manifest changed since): refused, naming how many, unless
  ``drop_stale`` (``--drop-countersignatures``) — then exactly those are removed and the rest kept.

A ``countersignatures`` file that cannot be read is refused the same way; with ``drop_stale`` it is removed whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import SignatureError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.keys import key_id, verify_signature
from bastion.models.manifest import Manifest
from bastion.models.signer import Signer
from bastion.models.signing import (
    COUNTERSIGNATURES_FORMAT,
    COUNTERSIGNATURES_NAME,
    SignatureRecord,
    raw_public,
    read_signatures,
    sign_manifest,
)

DROP_FLAG = "--drop-countersignatures"


@dataclass(frozen=True)
class Resigned:
    record: SignatureRecord
    signatures: int  # how many the bundle carries now
    dropped: int  # signatures over an earlier manifest (or an unreadable file's) removed


def _covers(record: SignatureRecord, manifest: Manifest, known: dict) -> bool:
    """Does ``record`` sign this very manifest (checked with its public key when one is known)?"""
    if record.manifest_sha256 != manifest.sha256():
        return False
    public = known.get(record.key_id)
    if public is None and record.public is not None:
        public = Ed25519PublicKey.from_public_bytes(record.public)
    return public is None or verify_signature(public, record.signature, manifest.canonical_bytes())


def sign_keeping_countersignatures(
    root: Path, manifest: Manifest, private: Signer, known: dict, drop_stale: bool = False
) -> Resigned:
    """Sign ``root`` (whose payload the caller verified) without losing or voiding anyone's signature silently."""
    root, name = Path(root), f"{manifest.name}:{manifest.version}"
    counter_path = root / COUNTERSIGNATURES_NAME
    if not counter_path.exists():  # the 1-of-1 case: the signature file is replaced, as always
        return Resigned(sign_manifest(root, manifest, private), 1, 0)
    try:
        records = read_signatures(root, name)
    except SignatureError as exc:
        if not drop_stale:
            raise SignatureError(
                f"{exc.message}; signing would leave it beside the new signature",
                f"pass {DROP_FLAG} to remove it and sign alone (its signers countersign again)",
            ) from None
        counter_path.unlink()
        return Resigned(sign_manifest(root, manifest, private), 1, 1)
    kid = key_id(private.public_key())
    stale = [r for r in records if r.key_id != kid and not _covers(r, manifest, known)]
    if stale and not drop_stale:
        raise SignatureError(
            f"bundle {name}: {len(stale)} of its {len(records)} signatures sign an earlier manifest "
            f"(keys {', '.join(r.key_id for r in stale)}); a new signature would leave them void beside it",
            f"pass {DROP_FLAG} to remove those {len(stale)} (their signers countersign the new manifest), "
            "or sign the manifest they signed",
        )
    kept = [r for r in records if r.key_id != kid and r not in stale]
    first_stays = bool(kept) and kept[0] is records[0]
    if first_stays and all(r.key_id != kid for r in records):
        raise SignatureError(
            f"bundle {name} is already signed by key {records[0].key_id} and countersigned; "
            f"signing would replace that key's signature",
            "add yours beside it: bastion bundle countersign BUNDLE --sign KEY",
        )
    signature = private.sign(manifest.canonical_bytes())
    if first_stays:  # this key was a countersigner: its countersignature is replaced where it was
        mine = SignatureRecord(kid, manifest.sha256(), signature, raw_public(private.public_key()))
        counter = [mine if r.key_id == kid else r for r in records[1:] if r.key_id == kid or r in kept]
        _write_counter(root, counter)
        return Resigned(mine, 1 + len(counter), len(stale))
    counter = kept  # countersignatures only: the first signature is this key's, or was over an earlier manifest
    _write_counter(root, counter)
    record = sign_manifest(root, manifest, private)
    return Resigned(record, 1 + len(counter), len(stale))


def _write_counter(root: Path, counter: list[SignatureRecord]) -> None:
    path = root / COUNTERSIGNATURES_NAME
    if not counter:
        path.unlink(missing_ok=True)
        return
    body = {"format": COUNTERSIGNATURES_FORMAT, "signatures": [r.to_dict() for r in counter]}
    atomic_write_bytes(path, json.dumps(body, indent=2).encode() + b"\n")
