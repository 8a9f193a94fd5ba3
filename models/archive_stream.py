"""Opening an untrusted ``.bastion`` archive as a tar stream that cannot cost more than a bundle may hold.

Split from ``models/archive.py`` (which walks the members and writes them out): this module owns the limits —
the payload limit ``max_bundle_bytes()``, what a compressed archive may plausibly expand to — and the capped
stream that enforces them on every byte tarfile reads, headers included, before anything reaches disk.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from bastion.errors import ArchiveError, ConfigError

MAX_BYTES_ENV = "BASTION_MAX_BUNDLE_BYTES"
DEFAULT_MAX_BYTES = 8 << 30  # the largest model a field unit is expected to carry, payload total
MAX_EXPANSION = 100  # model weights compress ~1.1-2x; 100x is a decompression bomb, not a model
EXPANSION_SLACK = 64 << 20  # ...except tiny bundles, whose JSON may compress better
HEADER_ALLOWANCE = 16 << 20  # tar headers and padding on top of the payload
DAMAGED = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)  # what a broken archive raises
_MAX_READ = 16 << 20  # our copy reads 1 MiB at a time; tarfile reads a header whole
_COMPRESSED = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def max_bundle_bytes() -> int:
    """The payload limit for one archive: ``BASTION_MAX_BUNDLE_BYTES`` (bytes) or 8 GiB."""
    return bytes_from_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def bytes_from_env(name: str, default: int, minimum: int = 1) -> int:
    """A byte count set in the environment variable ``name`` (``default`` when unset or empty); anything but a
    whole number of at least ``minimum`` is one ConfigError line naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        what = "a positive number of bytes" if minimum > 0 else "a number of bytes"
        raise ConfigError(f"{name}={raw!r} is not {what}", f"e.g. {name}={default}")
    return value


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _CappedReader:
    """A decompressed stream that refuses to go past ``cap`` bytes, whoever asks (our copy, or tarfile
    reading a header or skipping a member): a lying compressed archive stops here, in memory, not on disk."""

    def __init__(self, raw: BinaryIO, cap: int, archive: Path) -> None:
        self.raw, self.cap, self.archive = raw, cap, archive

    def _check(self, end: int) -> None:
        if end > self.cap:
            raise ArchiveError(
                f"{self.archive.name} expands to more than {human_size(self.cap)}",
                f"refusing this archive (limit: {MAX_BYTES_ENV}, or a compression ratio over {MAX_EXPANSION}:1)",
            )

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > _MAX_READ:  # only a header (pax, GNU long name) is read whole; 4 GiB is an attack
            raise ArchiveError(f"{self.archive.name} holds a {human_size(n)} header", "refusing this archive")
        pos = self.raw.tell()
        if n is None or n < 0:
            n = self.cap - pos + 1  # "all of it" is never more than the cap
        data = self.raw.read(min(n, self.cap - pos + 1))
        self._check(pos + len(data))  # checked on what came, so a short stream near the cap is fine
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self.raw.tell() + pos}.get(whence)
        if target is None:
            raise ArchiveError(f"{self.archive.name}: cannot seek from the end of a compressed archive")
        self._check(target)
        return self.raw.seek(target)

    def tell(self) -> int:
        return self.raw.tell()


def open_capped(archive: Path, limit: int, fh: BinaryIO | None = None) -> tuple[tarfile.TarFile, BinaryIO, int]:
    """The archive as a TarFile over a capped stream; the cap is its expansion allowance.

    ``fh``: an already open file of the archive (read from its start), so that the caller unpacks exactly the
    bytes it hashed; the returned handle is that one and is closed with the TarFile's ``with`` like our own."""
    try:
        if fh is None:
            fh = open(archive, "rb")
        size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        if fh is not None:
            fh.close()
        raise ArchiveError(f"cannot read {archive}: {exc.strerror or exc}") from None
    try:
        head = fh.read(tarfile.BLOCKSIZE)
        fh.seek(0)
        raw: BinaryIO = fh
        cap = limit + HEADER_ALLOWANCE
        for prefix, opener in () if _is_tar_header(head) else _COMPRESSED:  # a member may be called "BZh…"
            if head.startswith(prefix):
                raw = opener(fileobj=fh) if opener is gzip.GzipFile else opener(fh)
                cap = min(cap, MAX_EXPANSION * size + EXPANSION_SLACK)
                break
        if raw is fh and size > cap:
            raise ArchiveError(
                f"{archive.name} is {human_size(size)}, more than the {human_size(limit)} a bundle may hold",
                f"refusing this archive (raise {MAX_BYTES_ENV} if it is genuine)",
            )
        tar = tarfile.open(fileobj=_CappedReader(raw, cap, archive), mode="r:")
    except (*DAMAGED, OSError) as exc:
        fh.close()
        raise ArchiveError(f"{archive.name} is not a bastion archive ({exc})", "copy it again") from None
    except BaseException:
        fh.close()
        raise
    return tar, fh, cap


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True
