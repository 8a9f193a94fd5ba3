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


class SnapshotVault:
    def __init__(self, directory: Path, key: bytes, node_id: str, quality: int = 85) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aead = AESGCM(key)
        self.node_id = node_id
        self.quality = quality

    def _aad(self, seq: int) -> bytes:
        return f"bastion-snapshot:{self.node_id}:{seq}".encode()

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}{SUFFIX}"

    def save(self, seq: int, image: np.ndarray) -> Path:
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise BastionError(f"cannot encode snapshot for event {seq}")
        nonce = os.urandom(12)
        path = self.path(seq)
        atomic_write_bytes(path, nonce + self.aead.encrypt(nonce, jpeg.tobytes(), self._aad(seq)))
        return path

    def load(self, seq: int) -> bytes:
        """The JPEG bytes of event ``seq``'s snapshot."""
        path = self.path(seq)
        try:
            blob = read_bounded(path, MAX_SNAPSHOT_BYTES)
        except FileNotFoundError:
            raise BastionError(f"no snapshot for event {seq}") from None
        except OSError as exc:  # too large, not a file, unreadable: never buffered whole
            raise BastionError(f"snapshot {path.name} cannot be read ({exc})") from None
        try:
            return self.aead.decrypt(blob[:12], blob[12:], self._aad(seq))
        except InvalidTag:
            raise BastionError(f"snapshot {path.name} does not decrypt (wrong key, or modified)") from None

    def delete_before(self, seq: int) -> int:
        removed = 0
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                if int(path.name[: -len(SUFFIX)]) < seq:
                    path.unlink()
                    removed += 1
            except ValueError:
                continue
        return removed
