"""Encrypted JPEG snapshots of frames that produced events (AES-256-GCM, key from a key file).

A stolen disk from a field unit must not hand over the imagery: each snapshot
is ``nonce (12 bytes) || AES-GCM(JPEG)`` with the node id and seq as associated
data, so a file renamed to another seq or node fails to decrypt.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import cv2
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.errors import BastionError, KeyFileError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.keys import MAX_KEY_FILE_BYTES
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded

SUFFIX = ".jpg.enc"
# One encrypted JPEG (a 4K frame at quality 95 is ~5 MB): a file past this was not written by the vault.
MAX_SNAPSHOT_BYTES = 32 * 2**20


def generate_key_file(path: Path) -> Path:
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists", "choose another path; keys are never overwritten")
    atomic_write_bytes(path, secrets.token_hex(32).encode() + b"\n", mode=0o600)
    return path


def load_key(path: Path) -> bytes:
    try:
        text = read_bounded(path, MAX_KEY_FILE_BYTES).decode().strip()  # never /dev/zero or a FIFO read forever
    except (TooLarge, NotRegular, UnicodeDecodeError):
        text = ""
    except OSError as exc:
        raise KeyFileError(f"cannot read snapshot key {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise KeyFileError(f"{path} is not a 256-bit hex key", "make one with: bastion node snapshot-key --out FILE")
    return key


class SealedFiles:
    """Files ``<seq><suffix>`` in one directory, each ``nonce (12 bytes) || AES-GCM(data)`` with
    ``bastion-<label>:<node>:<seq>`` as associated data: the one way the node encrypts what it keeps at rest
    (snapshots here, evidence clips in edge/clip_store.py), so a file moved to another seq, node or kind
    fails to decrypt. Reads are bounded by ``limit()``: a file past it was not written here."""

    label = "file"
    suffix = ".enc"

    def __init__(self, directory: Path, key: bytes, node_id: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aead = AESGCM(key)
        self.node_id = node_id

    def limit(self) -> int:
        raise NotImplementedError

    def _aad(self, seq: int) -> bytes:
        return f"bastion-{self.label}:{self.node_id}:{seq}".encode()

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}{self.suffix}"

    def seal(self, seq: int, data: bytes) -> Path:
        """Encrypt ``data`` for event ``seq`` and write it (temp file, fsync, rename)."""
        nonce = os.urandom(12)
        path = self.path(seq)
        atomic_write_bytes(path, nonce + self.aead.encrypt(nonce, data, self._aad(seq)))
        return path

    def unseal(self, seq: int) -> bytes:
        """The decrypted bytes kept for event ``seq``; BastionError (one line) when missing, unreadable, forged."""
        path = self.path(seq)
        try:
            blob = read_bounded(path, self.limit())
        except FileNotFoundError:
            raise BastionError(f"no {self.label} for event {seq}") from None
        except OSError as exc:  # too large, not a file, unreadable: never buffered whole
            raise BastionError(f"{self.label} {path.name} cannot be read ({exc})") from None
        try:
            return self.aead.decrypt(blob[:12], blob[12:], self._aad(seq))
        except InvalidTag:
            raise BastionError(f"{self.label} {path.name} does not decrypt (wrong key, or modified)") from None

    def seqs(self) -> list[int]:
        """The seqs that have a file here, ascending (names that are not ``<seq><suffix>`` are ignored)."""
        found = []
        for path in self.dir.glob(f"*{self.suffix}"):
            try:
                found.append(int(path.name[: -len(self.suffix)]))
            except ValueError:
                continue
        return sorted(found)

    def delete_before(self, seq: int) -> int:
        removed = 0
        for found in self.seqs():
            if found >= seq:
                break
            self.path(found).unlink(missing_ok=True)
            removed += 1
        return removed


class SnapshotVault(SealedFiles):
    label = "snapshot"
    suffix = SUFFIX

    def __init__(self, directory: Path, key: bytes, node_id: str, quality: int = 85) -> None:
        super().__init__(directory, key, node_id)
        self.quality = quality

    def limit(self) -> int:
        return MAX_SNAPSHOT_BYTES

    def save(self, seq: int, image: np.ndarray) -> Path:
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise BastionError(f"cannot encode snapshot for event {seq}")
        return self.seal(seq, jpeg.tobytes())

    def load(self, seq: int) -> bytes:
        """The JPEG bytes of event ``seq``'s snapshot."""
        return self.unseal(seq)
