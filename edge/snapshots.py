"""Encrypted JPEG snapshots of frames that produced events (AES-256-GCM, key from a key file).

A stolen disk from a field unit must not hand over the imagery: each snapshot
is ``nonce (12 bytes) || AES-GCM(JPEG)`` with the node id and seq as associated
data, so a file renamed to another seq or node fails to decrypt.

Large files (evidence clips, up to 48 MiB) are sealed as a stream of independently sealed pieces instead
(``SealedFiles.seal_stream``/``open_stream``), so reading one piece decrypts that piece only: the node serves a
clip 4 MiB at a time without decrypting the whole clip for every answer.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from types import TracebackType
from typing import Callable, TypeVar

import cv2
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.errors import BastionError, KeyFileError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.keys import MAX_KEY_FILE_BYTES
from bastion.models.safe_read import NotRegular, TooLarge, open_regular, read_bounded

T = TypeVar("T")

SUFFIX = ".jpg.enc"
# One encrypted JPEG (a 4K frame at quality 95 is ~5 MB): a file past this was not written by the vault.
MAX_SNAPSHOT_BYTES = 32 * 2**20
# A sealed stream's file header: format version, a random salt (the file's own key is derived from it),
# the head piece's and the data pieces' plaintext sizes. It is in every piece's associated data.
STREAM_VERSION = 2
STREAM_HEADER = struct.Struct(">B16sII")
TAG_BYTES = 16  # AES-GCM's tag, after each piece
MIN_PIECE_BYTES = 4096  # bounds the pieces (and tags) a file of a given size can have
MAX_PIECE_BYTES = 16 * 2**20  # one piece is decrypted whole: a header asking for more was not written here
MAX_HEAD_BYTES = 64 * 1024


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
        self.key = key
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
        blob = self._opened(seq, read_bounded)
        try:
            return self.aead.decrypt(blob[:12], blob[12:], self._aad(seq))
        except InvalidTag:
            raise BastionError(
                f"{self.label} {self.path(seq).name} does not decrypt (wrong key, or modified)"
            ) from None

    def seal_stream(self, seq: int, head: bytes, data: bytes, piece_bytes: int) -> Path:
        """Write ``head`` (small: what describes ``data``) and ``data`` as a sealed stream for event ``seq``
        (temp file, fsync, rename); ``open_stream`` reads any one piece back without the others.

        The STREAM construction (Hoang et al. 2015; what age and Tink's streaming AEAD do): a key of the file's own,
        HKDF-SHA256 of the vault key and a random salt; piece ``i`` (0 = ``head``, 1..n = ``data`` in pieces of
        ``piece_bytes``) sealed with AES-GCM under nonce ``i || final`` and associated data naming the node, the
        seq, the file header, ``i`` and whether it is the last piece. So a piece moved to another index, another
        file or another event does not decrypt, and a file cut after any piece fails at its new last one.
        """
        if not (MIN_PIECE_BYTES <= piece_bytes <= MAX_PIECE_BYTES) or len(head) > MAX_HEAD_BYTES or not data:
            raise BastionError(f"{self.label} of event {seq} cannot be sealed as a stream (bad sizes)")
        header = STREAM_HEADER.pack(STREAM_VERSION, os.urandom(16), len(head), piece_bytes)
        aead = self._stream_aead(header)
        pieces = [head] + [data[at : at + piece_bytes] for at in range(0, len(data), piece_bytes)]
        last = len(pieces) - 1
        sealed = [
            aead.encrypt(_nonce(i, i == last), piece, self._piece_aad(seq, header, i, i == last))
            for i, piece in enumerate(pieces)
        ]
        path = self.path(seq)
        atomic_write_bytes(path, header + b"".join(sealed))
        return path

    def open_stream(self, seq: int) -> SealedStream:
        """The sealed stream of event ``seq``, open for reading pieces one at a time (a context manager).
        BastionError (one line): missing, not a file, too large, not a stream this node writes."""
        fd = self._opened(seq, open_regular)
        try:
            return SealedStream(self, seq, fd)
        except BaseException:
            os.close(fd)
            raise

    def _opened(self, seq: int, opener: Callable[[Path, int], T]) -> T:
        """``opener(path, limit)`` on event ``seq``'s file, its refusals as one BastionError line each: missing;
        too large, not a regular file or unreadable (never buffered whole)."""
        path = self.path(seq)
        try:
            return opener(path, self.limit())
        except FileNotFoundError:
            raise BastionError(f"no {self.label} for event {seq}") from None
        except OSError as exc:
            raise BastionError(f"{self.label} {path.name} cannot be read ({exc})") from None

    def _stream_aead(self, header: bytes) -> AESGCM:
        salt = header[1:17]
        info = f"bastion-{self.label}-stream".encode()
        return AESGCM(HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(self.key))

    def _piece_aad(self, seq: int, header: bytes, index: int, final: bool) -> bytes:
        return self._aad(seq) + b"|" + header + struct.pack(">IB", index, final)

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


def _nonce(index: int, final: bool) -> bytes:
    """STREAM's nonce: the piece's index and the last-piece flag (the key is the file's own, so never reused)."""
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class SealedStream:
    """One sealed stream file, open: its header read and bounded, its layout known; ``piece(i)`` reads and decrypts
    piece ``i`` alone (0: the head, 1..``pieces``: the data). The layout comes from the file's size, which no tag
    covers: that is what the last-piece flag is for (a file cut short or grown fails at its last piece)."""

    def __init__(self, files: SealedFiles, seq: int, fd: int) -> None:
        self.files, self.seq, self.fd = files, seq, fd
        self.name = files.path(seq).name
        self.header = os.pread(fd, STREAM_HEADER.size, 0)
        if len(self.header) != STREAM_HEADER.size or self.header[0] != STREAM_VERSION:
            raise BastionError(
                f"{files.label} {self.name} is not in a format this node reads "
                f"(written before {files.label}s were sealed in pieces, or damaged)"
            )
        _, _, self.head_bytes, self.piece_bytes = STREAM_HEADER.unpack(self.header)
        if self.head_bytes > MAX_HEAD_BYTES or not MIN_PIECE_BYTES <= self.piece_bytes <= MAX_PIECE_BYTES:
            raise BastionError(f"{files.label} {self.name} has a damaged header")
        self.data_at = STREAM_HEADER.size + self.head_bytes + TAG_BYTES
        data = os.fstat(fd).st_size - self.data_at
        sealed_piece = self.piece_bytes + TAG_BYTES
        self.pieces = -(-data // sealed_piece)  # the last one may be short, never empty
        if data <= TAG_BYTES or 0 < data % sealed_piece <= TAG_BYTES:
            raise BastionError(f"{files.label} {self.name} is cut short or damaged")
        self.aead = files._stream_aead(self.header)

    def piece(self, index: int) -> bytes:
        """Piece ``index``, decrypted: BastionError when it does not decrypt (another key, moved, cut, modified)."""
        if not 0 <= index <= self.pieces:
            raise BastionError(f"{self.files.label} {self.name} has no piece {index}")
        if index == 0:
            at, size = STREAM_HEADER.size, self.head_bytes + TAG_BYTES
        else:
            at = self.data_at + (index - 1) * (self.piece_bytes + TAG_BYTES)
            size = self.piece_bytes + TAG_BYTES
        blob = os.pread(self.fd, size, at)
        final = index == self.pieces
        if len(blob) < TAG_BYTES or (not final and len(blob) != size):
            raise BastionError(f"{self.files.label} {self.name} is cut short")
        aad = self.files._piece_aad(self.seq, self.header, index, final)
        try:
            return self.aead.decrypt(_nonce(index, final), blob, aad)
        except InvalidTag:
            raise BastionError(
                f"{self.files.label} {self.name} does not decrypt (wrong key, or modified: piece {index})"
            ) from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> SealedStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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
