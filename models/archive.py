"""The single-file form of a bundle, ``NAME-VERSION.bastion``: a plain tar of the bundle directory.

Archives cross air gaps on USB sticks; they are untrusted input.  Unpacking
refuses — rather than silently skips — absolute paths, ``..``, links, devices,
sparse members and anything that is not a regular file or directory, and it is
bounded before a byte is written: at most ``MAX_MEMBERS`` members (read one
header at a time, so a 300k-member archive costs a thousand headers, not all of
them), declared sizes checked against ``max_bundle_bytes()``, against what a
compressed archive can plausibly expand to and against the free space where it
is unpacked; then the bytes are counted again while they are copied, and the
decompressed stream itself is capped (``models/archive_stream.py``: the limits and the
capped stream; this module walks the members).  Staging happens beside the destination
(inside ``BASTION_HOME``), so the final rename never crosses a filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

from bastion.errors import ArchiveError
from bastion.models import archive_cache
from bastion.models.archive_stream import (
    DAMAGED,
    HEADER_ALLOWANCE,
    MAX_BYTES_ENV,
    MAX_EXPANSION,
    human_size,
    max_bundle_bytes,
    open_capped,
)
from bastion.models.atomic import short_of_space
from bastion.models.home import Staging, held_staging
from bastion.models.manifest import MANIFEST_NAME, read_manifest

log = logging.getLogger(__name__)

ARCHIVE_SUFFIX = ".bastion"
MAX_MEMBERS = 1000  # a bundle is a manifest, a signature and a few model files
MAX_DEPTH = 32  # folders inside a bundle; deeper is hostile (and pathlib's mkdir(parents=True) recurses per level)
_CHUNK = 1 << 20


def pack(bundle_dir: Path, out: Path) -> Path:
    """Tar ``bundle_dir``'s manifest, signatures (the first and the countersignatures) and payload files (only
    those) into ``out`` atomically."""
    from bastion.models.signing import COUNTERSIGNATURES_NAME, SIGNATURE_NAME

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir / MANIFEST_NAME)
    names = [MANIFEST_NAME] + [f.path for f in manifest.files]
    names += [n for n in (SIGNATURE_NAME, COUNTERSIGNATURES_NAME) if (bundle_dir / n).is_file()]
    out = Path(out)
    if out.is_dir() or out.suffix != ARCHIVE_SUFFIX:  # a directory, existing or to be made
        out = out / f"{manifest.name}-{manifest.version}{ARCHIVE_SUFFIX}"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    info = tar.gettarinfo(str(bundle_dir / name), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    with open(bundle_dir / name, "rb") as src:
                        tar.addfile(info, src)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# -- bounds ---------------------------------------------------------------------------------------------
def _member_path(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The member's path inside the bundle (``./`` prefixes dropped), None for the archive's own root ``.``."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path", "refusing this archive")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member {name!r} escapes the bundle with '..'", "refusing this archive")
    if len(parts) > MAX_DEPTH:
        raise ArchiveError(
            f"{archive.name}: member {name[:80]!r}… is {len(parts)} folders deep (at most {MAX_DEPTH})",
            "refusing this archive",
        )
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive.name}: member {name!r} is a link", "refusing this archive")
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        raise ArchiveError(f"{archive.name}: member {name!r} is a sparse file", "refusing this archive")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive.name}: member {name!r} is not a regular file", "refusing this archive")
    if not parts:
        if member.isdir():
            return None
        raise ArchiveError(f"{archive.name}: a member has an empty name", "refusing this archive")
    return "/".join(parts)


def _scan(tar: tarfile.TarFile, archive: Path, limit: int, cap: int) -> tuple[list[tuple[tarfile.TarInfo, str]], int]:
    """Read the headers one by one, refusing on the first that breaks a bound; nothing is written yet."""
    members: list[tuple[tarfile.TarInfo, str]] = []
    seen: set[str] = set()
    total = headers = 0
    while (member := tar.next()) is not None:
        headers += 1
        if headers > MAX_MEMBERS:
            raise ArchiveError(
                f"{archive.name} has more than {MAX_MEMBERS} members; a bundle has a manifest, "
                "a signature and a few model files",
                "refusing this archive",
            )
        path = _member_path(member, archive)
        if path is None:
            continue
        if path in seen:
            raise ArchiveError(f"{archive.name}: member {path!r} appears twice", "refusing this archive")
        seen.add(path)
        if member.isfile():
            total += member.size
            if member.size > limit or total > limit:
                raise ArchiveError(
                    f"{archive.name}: {path} declares {human_size(member.size)}, more than the "
                    f"{human_size(limit)} a bundle may hold",
                    f"refusing this archive (raise {MAX_BYTES_ENV} if it is genuine)",
                )
            if total > cap:
                raise ArchiveError(
                    f"{archive.name}: {path} expands to {human_size(member.size)} from a "
                    f"{human_size(archive.stat().st_size)} archive (over {MAX_EXPANSION}:1)",
                    "a decompression bomb, not a model; refusing this archive",
                )
        members.append((member, path))
    return members, total


def _check_free_space(directory: Path, needed: int, archive: Path) -> None:
    free = short_of_space(directory, needed)
    if free is not None:
        raise ArchiveError(
            f"{archive.name} needs {human_size(needed)} but only {human_size(free)} is free in {directory}",
            "free some space (or choose another BASTION_HOME); nothing was written",
        )


def copy_bounded(src: BinaryIO, dst: BinaryIO, size: int, archive: str, member: str) -> None:
    """Copy exactly ``size`` bytes, counting them: a member that yields more (or less) is refused mid-copy."""
    left = size
    while True:
        chunk = src.read(min(_CHUNK, left + 1))  # one byte past the declared end shows a member that lies
        if not chunk:
            break
        if len(chunk) > left:
            raise ArchiveError(
                f"{archive}: {member} holds more than the {size} bytes its header declares", "refusing this archive"
            )
        dst.write(chunk)
        left -= len(chunk)
    if left:
        raise ArchiveError(f"{archive}: {member} is truncated ({size - left} of {size} bytes)", "copy it again")


# -- unpacking ------------------------------------------------------------------------------------------
def unpack(
    archive: Path,
    dest: Path,
    fh: BinaryIO | None = None,
    lock_path: Path | None = None,
    publish: Callable[[Staging, Path], None] | None = None,
) -> Path:
    """Safely extract ``archive`` into the new directory ``dest`` (all or nothing), staging beside it.

    ``fh``: read the archive from this open file (positioned at 0; closed here) instead of opening ``archive``.
    ``lock_path``: the lock a sweep of ``dest``'s folder holds (the staging directory is made under it and flocked
    while in use, so a sweep removes it only once its process has died). ``publish``: moves the finished staging
    directory to ``dest`` (default: a rename; a twin already there is as good as ours)."""
    archive, dest = Path(archive), Path(dest)
    if fh is None and not archive.is_file():
        raise ArchiveError(f"archive not found: {archive}")
    limit = max_bundle_bytes()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)  # staging must share dest's filesystem
    except OSError as exc:
        if fh is not None:
            fh.close()
        raise ArchiveError(f"cannot create {dest.parent}: {exc.strerror or exc}") from None
    tar, fh, cap = open_capped(archive, limit, fh)
    try:
        with fh, tar:
            members, total = _scan(tar, archive, limit, cap)
            _check_free_space(dest.parent, total, archive)
            with held_staging(dest.parent, f".{dest.name}.", lock_path) as staging:  # removed on any failure
                for member, path in members:
                    _extract(tar, member, path, staging.path, archive)
                if not (staging.path / MANIFEST_NAME).is_file():
                    raise ArchiveError(
                        f"{archive.name} holds no manifest.json at its top level", "is it a bastion bundle?"
                    )
                (publish or _publish)(staging, dest)
    except DAMAGED as exc:
        raise ArchiveError(f"{archive.name} is truncated or damaged ({exc})", "copy it again") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ArchiveError(
                f"disk full while unpacking {archive.name}", "free some space; nothing was kept"
            ) from None
        raise ArchiveError(f"cannot unpack {archive.name}: {exc.strerror or exc}", "nothing was kept") from None
    return dest


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, staging: Path, archive: Path) -> None:
    target = staging / path
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(member)
    if src is None:
        raise ArchiveError(f"{archive.name}: cannot read member {path!r}")
    with src, open(target, "xb") as out:
        copy_bounded(src, out, member.size, archive.name, path)


def _publish(staging: Staging, dest: Path) -> None:
    """Rename the finished staging directory into place; a twin that got there first is as good as ours (the
    staging directory is then removed as it is left)."""
    try:
        os.replace(staging.path, dest)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (dest / MANIFEST_NAME).is_file():
            return
        raise


def _hash_stream(fh: BinaryIO) -> str:
    """sha256 of an open file, read in chunks from where it stands."""
    digest = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _identity(fh: BinaryIO) -> tuple[int, int, int, int]:
    """What shows a rewrite in place.  Not ctime: unlinking the name (a swap, harmless here) changes it too."""
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def unpack_cached(archive: Path, cache_dir: Path) -> Path:
    """``archive`` unpacked once into ``cache_dir/<its sha256>`` (hashed as a stream, after its size is checked),
    held by this process while it lives, in a cache kept under its budget (``models/archive_cache.py``).

    Hashed and unpacked through one open file descriptor: a file swapped in under the same name between the two
    (on a USB stick someone else can write) is not what we read, so the cache never holds other bytes than its
    name says.  A rewrite of the same file in place (same inode) shows in its size/mtime, checked after the
    unpack and before publishing under the hash: it is refused, and nothing is cached.
    """
    archive, cache_dir = Path(archive), Path(cache_dir)
    try:
        fh = open(archive, "rb")
    except OSError as exc:
        raise ArchiveError(f"cannot read {archive}: {exc.strerror or exc}") from None
    with fh:
        before = _identity(fh)
        size = before[2]
        if size > max_bundle_bytes() + HEADER_ALLOWANCE:
            raise ArchiveError(
                f"{archive.name} is {human_size(size)}, more than the {human_size(max_bundle_bytes())} a bundle may hold",
                f"refusing this archive (raise {MAX_BYTES_ENV} if it is genuine)",
            )
        target = cache_dir / _hash_stream(fh)
        if not archive_cache.hold(target):
            fh.seek(0)

            def publish(staging: Staging, dest: Path) -> None:
                if _identity(fh) != before:
                    raise ArchiveError(
                        f"{archive.name} changed while it was being unpacked",
                        "copy it again from a source nobody else writes to; nothing was cached",
                    )
                archive_cache.publish_held(staging, dest, cache_dir)

            archive_cache.sweep(cache_dir)  # what a killed unpack left goes first: room for this one
            unpack(
                archive,
                target,
                fh=os.fdopen(os.dup(fh.fileno()), "rb"),
                lock_path=archive_cache.lock_path(cache_dir),
                publish=publish,
            )
    archive_cache.housekeep(cache_dir)
    return target
