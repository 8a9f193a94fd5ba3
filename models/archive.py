"""The single-file form of a bundle, ``NAME-VERSION.bastion``: a plain tar of the bundle directory.

Archives cross air gaps on USB sticks; they are untrusted input.  Unpacking
refuses — rather than silently skips — absolute paths, ``..``, links, devices
and anything that is not a regular file or directory.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from bastion.errors import ArchiveError
from bastion.models.manifest import MANIFEST_NAME, read_manifest

ARCHIVE_SUFFIX = ".bastion"
MAX_MEMBERS = 1000


def pack(bundle_dir: Path, out: Path) -> Path:
    """Tar ``bundle_dir``'s manifest, signature and payload files (only those) into ``out`` atomically."""
    from bastion.models.signing import SIGNATURE_NAME

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir / MANIFEST_NAME)
    names = [MANIFEST_NAME] + [f.path for f in manifest.files]
    if (bundle_dir / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
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


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    path = PurePosixPath(name)
    if not path.parts or path.is_absolute() or name.startswith(("/", "\\")):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path", "refusing this archive")
    if ".." in path.parts:
        raise ArchiveError(f"{archive.name}: member {name!r} escapes the bundle with '..'", "refusing this archive")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive.name}: member {name!r} is a link", "refusing this archive")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive.name}: member {name!r} is not a regular file", "refusing this archive")


def unpack(archive: Path, dest: Path) -> Path:
    """Safely extract ``archive`` into the new directory ``dest`` (all or nothing)."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"archive not found: {archive}")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive.name} is not a bastion archive ({exc})", "copy it again") from None
    dest = Path(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent if dest.parent.exists() else None))
    try:
        with tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise ArchiveError(f"{archive.name} has {len(members)} members; a bundle has a handful")
            for member in members:
                _check_member(member, archive)
            for member in members:
                target = staging / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise ArchiveError(f"{archive.name}: cannot read member {member.name!r}")
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if not (staging / MANIFEST_NAME).is_file():
            raise ArchiveError(f"{archive.name} holds no manifest.json at its top level", "is it a bastion bundle?")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)
    except tarfile.TarError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArchiveError(f"{archive.name} is truncated or damaged ({exc})", "copy it again") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
