"""Sealing a bundle to named units, and opening it in memory on one of them.

The model files (``model`` and an INT8 bundle's ``fp32-sibling``) are encrypted with AES-256-GCM under a fresh
content key; the key is wrapped once per recipient unit: ephemeral-static X25519, HKDF-SHA256 over the shared
secret, AES-256-GCM over the content key.  Every AAD binds the clear bundle's manifest hash (and each wrap its
recipient's key id), so nothing can be moved between bundles or recipients.  The sealed manifest lists the
ciphertext's sha256 and is what gets signed: a partner verifies a sealed bundle without any unit key.  A unit
decrypts only bytes that ``Bundle.read_verified`` has just hashed, into memory, never onto disk.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.errors import ConfigError, ModelLoadError
from bastion.models.manifest import (
    SEALED_SUFFIX,
    FileEntry,
    Manifest,
    Sealed,
    SealedRecipient,
    sha256_file,
)
from bastion.models.unit_key import UnitKey, load_unit_key, raw_unit_public, this_unit_id, unit_key_id

SEALED_ROLES = ("model", "fp32-sibling")
NONCE_BYTES = 12
MAX_RECIPIENTS = 64  # as the manifest's bound: a seal names units, not a fleet's worth of them
MAX_SEALED_FILE = (1 << 31) - 1 - 16 - NONCE_BYTES  # one AES-GCM call; models on edge units are far smaller
_FILE_AAD = b"bastion-sealed/1 file\0"
_WRAP_AAD = b"bastion-sealed/1 key\0"
_HKDF_INFO = b"bastion-sealed/1 x25519 key wrap"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_HKDF_INFO).derive(shared)


def _wrap_aad(key_id: str, clear_sha256: str) -> bytes:
    return _WRAP_AAD + key_id.encode() + b"\0" + clear_sha256.encode()


def _file_aad(clear_sha256: str, sealed_path: str) -> bytes:
    return _FILE_AAD + clear_sha256.encode() + b"\0" + sealed_path.encode()


def wrap_for(content_key: bytes, unit: X25519PublicKey, clear_sha256: str, name: str | None) -> SealedRecipient:
    """The content key wrapped for one unit (a fresh ephemeral key each time)."""
    ephemeral = X25519PrivateKey.generate()
    eph_raw, unit_raw = raw_unit_public(ephemeral.public_key()), raw_unit_public(unit)
    kid, nonce = unit_key_id(unit), os.urandom(NONCE_BYTES)
    kek = _kek(ephemeral.exchange(unit), eph_raw, unit_raw)
    wrapped = AESGCM(kek).encrypt(nonce, content_key, _wrap_aad(kid, clear_sha256))
    return SealedRecipient(key_id=kid, name=name, ephemeral=_b64(eph_raw), nonce=_b64(nonce), wrapped_key=_b64(wrapped))


def seal_into(bundle, units: list[tuple[str | None, X25519PublicKey]], staging: Path) -> Manifest:
    """Write ``bundle``'s payload into ``staging`` with its model files encrypted; return the sealed manifest
    (unsigned: the caller writes, checks and signs it). ``bundle`` is an opened (verified) ``Bundle``."""
    manifest: Manifest = bundle.manifest
    if manifest.sealed is not None:
        raise ConfigError(f"{manifest.name}:{manifest.version} is already sealed", "seal the clear bundle instead")
    if not units:
        raise ConfigError("no recipient given", "name each unit that may run it: --to unit.pub")
    if len(units) > MAX_RECIPIENTS:
        raise ConfigError(f"{len(units)} recipients; a bundle is sealed to at most {MAX_RECIPIENTS} units")
    ids = [unit_key_id(u) for _, u in units]
    if len(set(ids)) != len(ids):
        raise ConfigError("the same unit key is given twice with --to")
    clear_sha256, content_key = manifest.sha256(), AESGCM.generate_key(bit_length=256)
    aead, files, sealed_paths = AESGCM(content_key), [], []
    for entry in manifest.files:
        target = staging / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.role not in SEALED_ROLES:
            target.write_bytes(bundle.read_verified(entry))
            files.append(entry)
            continue
        if entry.size > MAX_SEALED_FILE:
            raise ConfigError(f"{entry.path} is {entry.size} bytes; a sealed file holds at most {MAX_SEALED_FILE}")
        sealed_path = entry.path + SEALED_SUFFIX
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + aead.encrypt(nonce, bundle.read_verified(entry), _file_aad(clear_sha256, sealed_path))
        (staging / sealed_path).write_bytes(blob)
        files.append(
            FileEntry(path=sealed_path, sha256=sha256_file(staging / sealed_path), size=len(blob), role=entry.role)
        )
        sealed_paths.append(sealed_path)
    if not sealed_paths:
        raise ConfigError(f"{manifest.name} has no model file to seal")
    recipients = [wrap_for(content_key, unit, clear_sha256, name) for name, unit in units]
    sealed = Sealed(clear_manifest_sha256=clear_sha256, files=sealed_paths, recipients=recipients)
    return manifest.model_copy(update={"files": files, "sealed": sealed})


def unseal_key(manifest: Manifest, unit: UnitKey | None = None) -> bytes:
    """The content key, unwrapped with this unit's key — or a ModelLoadError in one line saying why not."""
    sealed = manifest.sealed
    assert sealed is not None
    name = f"{manifest.name}:{manifest.version}"
    unit = unit or load_unit_key()
    if unit is None:
        raise ModelLoadError(
            f"bundle {name} is sealed to units {sealed.labels()}; this unit has no unit key",
            "make one (bastion keys unit-init) and have the model team seal the bundle to its unit.pub",
        )
    mine = next((r for r in sealed.recipients if r.key_id == unit.key_id), None)
    if mine is None:
        raise ModelLoadError(
            f"bundle {name} is sealed to units {sealed.labels()}; this unit is {unit.key_id}",
            "ask the model team for a bundle sealed to this unit (bastion keys unit-export --out unit.pub)",
        )
    eph_raw = base64.b64decode(mine.ephemeral)
    try:  # a low-order ephemeral point makes exchange() raise ValueError: the same refusal as a bad tag
        kek = _kek(
            unit.private.exchange(X25519PublicKey.from_public_bytes(eph_raw)),
            eph_raw,
            raw_unit_public(unit.private.public_key()),
        )
        return AESGCM(kek).decrypt(
            base64.b64decode(mine.nonce),
            base64.b64decode(mine.wrapped_key),
            _wrap_aad(mine.key_id, sealed.clear_manifest_sha256),
        )
    except (InvalidTag, ValueError):
        raise ModelLoadError(
            f"bundle {name}: the content key wrapped for this unit ({unit.key_id}) does not open with its key",
            "the bundle was sealed to another key with this id, or damaged; ask the model team to seal it again",
        ) from None


def open_sealed(manifest: Manifest, entry: FileEntry, verified: bytes, content_key: bytes) -> bytes:
    """Decrypt one sealed payload file's verified bytes, in memory."""
    sealed = manifest.sealed
    assert sealed is not None
    try:
        return AESGCM(content_key).decrypt(
            verified[:NONCE_BYTES], verified[NONCE_BYTES:], _file_aad(sealed.clear_manifest_sha256, entry.path)
        )
    except (InvalidTag, ValueError):
        raise ModelLoadError(
            f"bundle {manifest.name}: {entry.path} does not decrypt (sealed for another bundle, or damaged)",
            "ask the model team to seal it again",
        ) from None


def is_sealed_entry(manifest: Manifest, entry: FileEntry) -> bool:
    return manifest.sealed is not None and entry.path in manifest.sealed.files


def describe(manifest: Manifest) -> dict | None:
    """What ``bundle inspect`` shows of a seal, without decrypting: recipients, and whether this unit is one."""
    sealed = manifest.sealed
    if sealed is None:
        return None
    this = this_unit_id()
    recipient = any(r.key_id == this for r in sealed.recipients)
    return {
        "files": list(sealed.files),
        "recipients": [{"key_id": r.key_id, "name": r.name} for r in sealed.recipients],
        "this_unit": this,
        "this_unit_is_recipient": recipient,
    }
