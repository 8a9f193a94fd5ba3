"""Is a directory on an encrypted block device (dm-crypt / LUKS)? For ``bastion doctor``.

Why it matters: a sealed bundle is ciphertext, but the unit key that opens it, the trust store, the event store
and snapshots sit in clear under BASTION_HOME unless the disk is encrypted. A stolen, powered-off unit with an
unencrypted disk and a key without a passphrase gives all of that up.

Read-only and best effort: the mount holding the path (longest mount point in /proc/mounts), its block device,
and whether that device, or any device below it (LVM on LUKS), is a dm-crypt target (``/sys/block/dm-N/dm/uuid``
starting ``CRYPT-``). Anything it cannot resolve (overlay, tmpfs, NFS, a container) is "unknown", never a guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 8  # device stacking (LVM on LUKS on RAID…) is never this deep


@dataclass(frozen=True)
class StorageCrypt:
    state: str  # encrypted | clear | unknown
    detail: str


def _mount_for(path: Path, mounts_text: str) -> tuple[str, str] | None:
    """(device, mount point) of the longest mount point containing ``path``."""
    best: tuple[str, str] | None = None
    target = str(path)
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, point = fields[0], fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = (device, point)
    return best


def _is_crypt(block: str, sys_block: Path, depth: int = 0) -> bool:
    """``block`` (a /sys/block name such as dm-0 or sda) is a dm-crypt target, or stacked on one."""
    if depth > MAX_DEPTH:
        return False
    try:
        if (sys_block / block / "dm" / "uuid").read_text().startswith("CRYPT-"):
            return True
    except OSError:
        pass
    slaves = sys_block / block / "slaves"
    return slaves.is_dir() and any(_is_crypt(s.name, sys_block, depth + 1) for s in slaves.iterdir())


def _block_name(device: str, dev_dir: Path) -> str | None:
    """/dev/mapper/x → dm-0, /dev/sda2 → sda2 (a partition: its /sys/block parent is found by the caller)."""
    if not device.startswith("/dev/"):
        return None
    real = os.path.realpath(dev_dir / device[len("/dev/") :]) if dev_dir != Path("/dev") else os.path.realpath(device)
    return Path(real).name


def _sys_entry(name: str, sys_block: Path) -> str | None:
    """The /sys/block entry for a device name: itself (disk, dm-N) or the disk a partition belongs to."""
    if (sys_block / name).exists():
        return name
    for disk in sys_block.iterdir() if sys_block.is_dir() else []:
        if (disk / name).is_dir():
            return disk.name
    return None


def storage_crypt(
    path: Path, mounts: Path = Path("/proc/mounts"), sys_block: Path = Path("/sys/block"), dev_dir: Path = Path("/dev")
) -> StorageCrypt:
    """Where ``path`` (or its nearest existing parent) is stored, and whether that is dm-crypt."""
    path = Path(os.path.abspath(path))
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    path = Path(os.path.realpath(existing)) / path.relative_to(existing)  # links resolved; the rest may come later
    try:
        found = _mount_for(path, mounts.read_text())
    except OSError:
        return StorageCrypt("unknown", f"cannot read {mounts}")
    if found is None:
        return StorageCrypt("unknown", f"no mount holds {path}")
    device, point = found
    name = _block_name(device, dev_dir)
    entry = _sys_entry(name, sys_block) if name else None
    if entry is None:
        return StorageCrypt("unknown", f"{path} is on {device} ({point}), not a block device this can inspect")
    if _is_crypt(entry, sys_block):
        return StorageCrypt("encrypted", f"{path} is on {device} ({point}), a dm-crypt/LUKS device")
    return StorageCrypt("clear", f"{path} is on {device} ({point}), which is not encrypted (dm-crypt/LUKS)")
