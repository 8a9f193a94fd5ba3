"""The local model registry: verified bundles stored by content under ``BASTION_HOME/registry``.

``bundles/<sha256>/`` holds a bundle whose sha256 (of its canonical manifest,
which hashes every payload file) names it; ``index.json`` maps names and
versions to those hashes.  Adding copies into a private staging directory,
verifies the copy, then renames it into place and rewrites the index under an
exclusive lock — so two writers at once, a killed process or a full disk leave
the registry exactly as it was.  The staging directories (``add-…``, ``rm-…``)
are flocked while in use; what a killed add left is swept by the next add or
remove (``bastion.models.home``).

A bare name resolves to the highest version (``1.10`` above ``1.9``), never to
whichever was added last, and adding a version older than one already present
is refused unless ``allow_downgrade`` — re-adding an old, validly signed bundle
is how a rollback looks.  Allowed downgrades and removals are appended to
``audit.jsonl`` beside the index.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import RegistryError
from bastion.models.archive import ARCHIVE_SUFFIX, unpack
from bastion.models.atomic import append_record, atomic_write_bytes, file_lock, short_of_space
from bastion.models.home import bastion_home, held_staging, sweep_staging
from bastion.models.manifest import MANIFEST_NAME
from bastion.models.safe_read import read_bounded
from bastion.models.version import is_older, version_key

log = logging.getLogger(__name__)
MAX_INDEX_BYTES = 16 * 2**20  # read whole on every lookup: bounded first (~50,000 entries)


@dataclass(frozen=True)
class Entry:
    sha256: str
    name: str
    version: str
    task: str
    added: str
    path: Path


def split_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name:version'."""
    name, _, version = ref.partition(":")
    return name, (version or None)


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else bastion_home() / "registry"
        self.bundles = self.root / "bundles"
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / ".lock"
        self.audit_path = self.root / "audit.jsonl"

    # -- reading -----------------------------------------------------------------------------------
    def _index(self) -> dict[str, dict]:
        try:
            return json.loads(read_bounded(self.index_path, MAX_INDEX_BYTES))["bundles"]
        except FileNotFoundError:
            return {}
        # too large or not a regular file (TooLarge, NotRegular are OSErrors), nested too deep: damage
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError, OSError):
            raise RegistryError(
                f"registry index {self.index_path} is damaged", "restore it from backup or re-add the bundles"
            ) from None

    def entries(self) -> list[Entry]:
        return sorted(
            (
                Entry(sha, e["name"], e["version"], e.get("task", "?"), e["added"], self.bundles / sha)
                for sha, e in self._index().items()
            ),
            key=lambda e: (e.name, version_key(e.version), e.added),
        )

    def resolve(self, ref: str) -> Entry | None:
        """The highest version with this name (or exactly this version, if given), or None; among equal versions
        the one added last."""
        name, version = split_ref(ref)
        matches = [e for e in self.entries() if e.name == name and (version is None or e.version == version)]
        return max(matches, key=lambda e: (version_key(e.version), e.added)) if matches else None

    def _refuse_downgrade(self, manifest, allow: bool) -> Entry | None:
        """The newer entry ``manifest`` would roll back from (when allowed), or raise when not allowed."""
        newest = self.resolve(manifest.name)
        if newest is None or not is_older(manifest.version, newest.version):
            return None
        if not allow:
            raise RegistryError(
                f"{manifest.name}:{manifest.version} is older than {newest.name}:{newest.version} "
                "already in the registry",
                "a rollback must be deliberate: add it with --allow-downgrade (it is recorded); "
                f"'{manifest.name}' keeps resolving to the highest version either way",
            )
        return newest

    # -- writing -----------------------------------------------------------------------------------
    def add(self, source: Path, open_bundle, allow_downgrade: bool = False) -> Entry:
        """Verify ``source`` (bundle dir or .bastion), copy it in, and index it. Returns the entry.

        ``open_bundle`` is ``Bundle.open`` (injected to avoid an import cycle). A version older than one already
        here is refused unless ``allow_downgrade`` (then recorded in ``audit.jsonl``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_staging(self.root, _is_staging, self.lock_path)  # what a killed add or remove left
        held = contextlib.ExitStack()
        staging = held.enter_context(held_staging(self.root, "add-", self.lock_path)).path
        try:
            source = Path(source)
            if source.is_file() and source.suffix == ARCHIVE_SUFFIX:
                src_dir = unpack(source, staging / "unpacked")
            else:
                src_dir = source
            bundle = open_bundle(src_dir)  # verifies payload and signature (or the explicit override)
            if bundle.sha256 not in self._index():  # early, before copying anything; re-adding is a no-op
                self._refuse_downgrade(bundle.manifest, allow_downgrade)
            needed = sum(f.size for f in bundle.manifest.files)
            if (free := short_of_space(self.root, needed)) is not None:  # before copying, not when the disk is full
                raise RegistryError(
                    f"{bundle.manifest.name}:{bundle.manifest.version} needs {needed / 1e6:.1f} MB "
                    f"but only {free / 1e6:.1f} MB is free in {self.root}",
                    "free some space and retry; the registry is unchanged",
                )
            copy = staging / "bundle"
            copy.mkdir()
            names = [MANIFEST_NAME, *(f.path for f in bundle.manifest.files)]
            names += [n for n in ("signature", "countersignatures") if (src_dir / n).is_file()]  # every signature
            for name in names:
                _copy_synced(src_dir / name, copy / name)
            open_bundle(copy)  # what landed on our disk is what was verified
            sha = bundle.sha256
            with file_lock(self.lock_path):
                index = self._index()
                target = self.bundles / sha
                if sha not in index:
                    rolled_back_from = self._refuse_downgrade(bundle.manifest, allow_downgrade)
                    self.bundles.mkdir(parents=True, exist_ok=True)
                    if target.exists():  # left over from an interrupted add: replace it
                        shutil.rmtree(target)
                    os.replace(copy, target)
                    index[sha] = {
                        "name": bundle.manifest.name,
                        "version": bundle.manifest.version,
                        "task": bundle.manifest.task,
                        "added": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z",
                    }
                    self._write_index(index)
                    log.info("bundle added to registry", extra={"bundle": bundle.manifest.name, "sha256": sha})
                    if rolled_back_from is not None:
                        self._record_downgrade(bundle, rolled_back_from, source)
            e = index[sha]
            return Entry(sha, e["name"], e["version"], e.get("task", "?"), e["added"], target)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise RegistryError(
                    f"disk full while adding {source} to the registry",
                    "free some space and retry; the registry is unchanged",
                ) from None
            raise RegistryError(f"cannot add {source}: {exc.strerror or exc}", "the registry is unchanged") from None
        finally:
            held.close()  # the staging directory is removed

    def remove(self, ref: str) -> Entry:
        with contextlib.ExitStack() as held:  # the trash is emptied once the lock is released
            with file_lock(self.lock_path):
                sweep_staging(self.root, _is_staging)  # under the lock held here
                entry = self.resolve(ref)
                if entry is None:
                    raise RegistryError(f"no bundle {ref!r} in the registry", "see: bastion models list")
                index = self._index()
                del index[entry.sha256]
                self._write_index(index)
                trash = held.enter_context(held_staging(self.root, "rm-")).path  # made under the lock held here
                os.replace(entry.path, trash / "bundle")
                self._record("removed", name=entry.name, version=entry.version, sha256=entry.sha256)
        return entry

    def _record_downgrade(self, bundle, newest: Entry, source: Path) -> None:
        m = bundle.manifest
        log.warning(
            "older bundle added with --allow-downgrade",
            extra={"bundle": f"{m.name}:{m.version}", "newest": newest.version, "sha256": bundle.sha256},
        )
        self._record(
            "downgrade_added",
            name=m.name,
            version=m.version,
            sha256=bundle.sha256,
            newest=newest.version,
            newest_sha256=newest.sha256,
            source=str(source),
        )

    def _record(self, event: str, **fields: str) -> None:
        """One line in ``audit.jsonl``; the index change it describes has already happened, so a failure
        to record is logged loudly rather than undoing it."""
        record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        try:
            append_record(self.audit_path, record)
        except OSError as exc:
            log.error("cannot record a registry change", extra={"record": record, "error": str(exc)})

    def _write_index(self, index: dict[str, dict]) -> None:
        atomic_write_bytes(self.index_path, json.dumps({"bundles": index}, indent=2, sort_keys=True).encode())


def _is_staging(name: str) -> bool:
    """The registry's own staging directories: ``add-…`` (a bundle being added), ``rm-…`` (one being deleted)."""
    return name.startswith(("add-", "rm-"))


def _copy_synced(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
