"""A bundle on disk: ``manifest.json``, the payload it lists, and ``signature``.

Loading is verification: ``Bundle.open`` checks every payload file's size and
sha256 against the manifest, then the signature over the manifest against the
trust store.  An unsigned or untrusted bundle is refused unless the caller
passes ``allow_unsigned=True`` (development only; warned about every time).
A sealed bundle (``bastion.models.seal``) is verified the same way, as ciphertext; its model files are
decrypted by ``read_verified``, from the bytes just checked, into memory only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bastion.errors import ConfigError, InputNotFoundError, ModelLoadError, SignatureError
from bastion.models.archive import ARCHIVE_SUFFIX, unpack_cached
from bastion.models.home import bastion_home
from bastion.models.manifest import MANIFEST_NAME, FileEntry, Manifest, read_manifest
from bastion.models.registry import Registry
from bastion.models.safe_read import NotRegular, TooLarge, hash_bounded, read_bounded
from bastion.models.releasability import check_releasable, unit_nation
from bastion.models.signing import Verification, read_signatures, verify_manifest
from bastion.models.trust import TrustStore
from bastion.models.zoo import zoo_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory, its manifest and how it was verified."""

    root: Path
    manifest: Manifest
    verification: Verification
    _content_key: list = field(default_factory=list, compare=False, repr=False)  # a sealed bundle's, once unwrapped

    @property
    def model_path(self) -> Path:
        """Where the model file lies — for display and sizes only: run ``model_bytes()``, which is checked."""
        return self.root / self.manifest.model_file().path

    def read_verified(self, entry: FileEntry) -> bytes:
        """One payload file's bytes, read once and checked against the manifest: what the caller runs.

        ``open`` verified the files, but a path can be rewritten after that (an operator, an attacker, a bad
        copy): whatever is built — a session, a tokenizer, an engine — must be built from bytes hashed here,
        never by opening the path again. A file of a sealed bundle is decrypted after that check, from exactly
        those bytes, into memory only (``bastion.models.seal``)."""
        data = read_verified(self.root, self.manifest, entry)
        if self.manifest.sealed is None or entry.path not in self.manifest.sealed.files:
            return data
        from bastion.models.seal import open_sealed, unseal_key

        if not self._content_key:  # unwrapped once per Bundle: a passphrase-protected unit key is asked once
            self._content_key.append(unseal_key(self.manifest))
        return open_sealed(self.manifest, entry, data, self._content_key[0])

    def model_bytes(self) -> bytes:
        """The model file's verified bytes (``read_verified`` of the manifest's model entry)."""
        return self.read_verified(self.manifest.model_file())

    def fp32_sibling_bytes(self) -> bytes | None:
        """The FP32 sibling's verified bytes (an INT8 bundle's FP32 parent), or None when the bundle carries none.
        Read and hashed once like the model: a session built from it never opens the path again."""
        entry = self.manifest.fp32_sibling_file()
        return None if entry is None else self.read_verified(entry)

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its canonical manifest (which hashes the payload)."""
        return self.manifest.sha256()

    @classmethod
    def open(
        cls,
        path: str | Path,
        trust: TrustStore | None = None,
        allow_unsigned: bool = False,
        nation: str | None = None,
    ) -> "Bundle":
        """Resolve, then verify payload and signatures (against the trust policy in force, if any), then the
        markings against this unit's nation (``nation``, else ``BASTION_NATION``); raise a ModelLoadError
        subclass naming the problem."""
        nation = unit_nation(nation)
        root = resolve_bundle_dir(path)
        manifest = read_manifest(root / MANIFEST_NAME)
        verify_files(root, manifest)
        try:
            verification = verify_manifest(root, manifest, trust or TrustStore())
        except SignatureError as exc:
            if not allow_unsigned:
                raise
            warn_unsigned(f"{manifest.name}:{manifest.version}", exc.message)
            verification = Verification(False, note=exc.message)
        check_releasable(manifest, nation)  # signed markings, checked even under --allow-unsigned
        return cls(root=root, manifest=manifest, verification=verification)

    @classmethod
    def open_fresh(cls, path: str | Path) -> "Bundle":
        """A bundle this process has just written and nobody has signed yet — a pipeline reading back its own
        candidates, students or scratch exports. The payload is verified as always; the signature is not asked
        for, and no ``--allow-unsigned`` warning is printed: the user never gave that flag, and the run's report
        says which outputs are signed."""
        root = resolve_bundle_dir(path)
        manifest = read_manifest(root / MANIFEST_NAME)
        verify_files(root, manifest)
        log.info("reading back a bundle this run wrote", extra={"bundle": f"{manifest.name}:{manifest.version}"})
        return cls(root=root, manifest=manifest, verification=Verification(False, note="written by this run"))

    @classmethod
    def inspect(cls, path: str | Path, trust: TrustStore | None = None) -> "Inspection":
        """Read a bundle for display: signature or payload problems become the status, not an exception."""
        root = resolve_bundle_dir(path)
        manifest = read_manifest(root / MANIFEST_NAME)
        trust = trust or TrustStore()
        try:
            status, verified = cls.open(root, trust).verification.summary, True
        except ModelLoadError as exc:
            status, verified = f"REFUSED: {exc}", False
        return Inspection(root, manifest, verified, status, _signers(root, manifest, trust))


def _signers(root: Path, manifest: Manifest, trust: TrustStore) -> list[dict]:
    """Every signer, named with its role when the policy in force (if one can be read) lists the key."""
    from bastion.models.policy_check import describe_signers
    from bastion.models.policy_store import PolicyStore

    try:
        records = read_signatures(root, manifest.name)
    except SignatureError:
        return []
    try:
        current = PolicyStore(trust).current()
    except ModelLoadError:  # the refusal is already the inspection's status
        current = None
    return describe_signers(records, current.policy if current else None)


@dataclass(frozen=True)
class Inspection:
    root: Path
    manifest: Manifest
    verified: bool
    status: str
    signers: list[dict]

    @property
    def signer_key_id(self) -> str | None:
        """The first signer (the one the ``signature`` file names), as before countersigning."""
        return self.signers[0]["key_id"] if self.signers else None


def warn_unsigned(name: str, why: str) -> None:
    """The development override is loud every single time."""
    log.warning(
        "running a bundle that failed verification because --allow-unsigned was given",
        extra={"bundle": name, "reason": why},
    )
    import sys

    sys.stderr.write(f"WARNING: --allow-unsigned: running {name} although {why}. Development use only.\n")


def read_verified(root: Path, manifest: Manifest, entry: FileEntry) -> bytes:
    """Read ``entry`` once — never more than its manifest size — and return those bytes if they hash right."""
    path = root / entry.path
    try:  # a regular file, never more than the manifest's size (one byte more: grown since verification)
        data = read_bounded(path, entry.size)
    except FileNotFoundError:
        raise ModelLoadError(
            f"bundle {manifest.name}: payload file {entry.path} is missing", "copy the whole bundle directory again"
        ) from None
    except TooLarge as exc:
        raise ModelLoadError(
            f"bundle {manifest.name}: {entry.path} is {exc.size} bytes, manifest says "
            f"{entry.size} (truncated or replaced)",
            "copy the bundle again from a trusted source",
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"bundle {manifest.name}: cannot read {entry.path} ({exc.strerror or exc})") from None
    if len(data) != entry.size:
        raise ModelLoadError(
            f"bundle {manifest.name}: {entry.path} is {len(data)} bytes, manifest says {entry.size}"
            " (truncated or replaced)",
            "copy the bundle again from a trusted source",
        )
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelLoadError(
            f"bundle {manifest.name}: {entry.path} does not match its sha256 (modified)",
            "refusing to run it; copy the bundle again from a trusted source",
        )
    return data


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every payload file present, right size, right sha256 — or a ModelLoadError naming it."""
    for entry in manifest.files:
        try:  # one descriptor: a regular file, stat'ed and hashed through it (a FIFO swapped in is not waited on)
            digest, size = hash_bounded(root / entry.path, entry.size)
        except (FileNotFoundError, NotRegular):
            raise ModelLoadError(
                f"bundle {manifest.name}: payload file {entry.path} is missing", "copy the whole bundle directory again"
            ) from None
        except TooLarge as exc:
            digest, size = "", exc.size
        except OSError as exc:
            raise ModelLoadError(f"bundle {manifest.name}: cannot read {entry.path} ({exc.strerror or exc})") from None
        if size != entry.size:
            raise ModelLoadError(
                f"bundle {manifest.name}: {entry.path} is {size} bytes, manifest says "
                f"{entry.size} (truncated or replaced)",
                "copy the bundle again from a trusted source",
            )
        if digest != entry.sha256:
            raise ModelLoadError(
                f"bundle {manifest.name}: {entry.path} does not match its sha256 (modified)",
                "refusing to run it; copy the bundle again from a trusted source",
            )


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle directory, its manifest.json, a ``.bastion`` archive, a registry ``name[:version]``, or a zoo name."""
    candidate = Path(path)
    if candidate.name == MANIFEST_NAME and candidate.is_file():
        return candidate.parent
    if candidate.is_dir():
        return candidate
    if candidate.is_file() and candidate.suffix == ARCHIVE_SUFFIX:
        return _unpacked_archive(candidate)
    entry = Registry().resolve(str(path))
    if entry is not None:
        return entry.path
    zoo = zoo_path(str(path))
    if zoo is not None:
        return zoo
    if candidate.is_file():  # it exists, it just is not a bundle: say what to make of it
        raise InputNotFoundError(
            f"{path} is a file, not a bundle (a directory with manifest.json, or a .bastion archive)",
            "make one: bastion bundle create --onnx MODEL.onnx … --out DIR (a bare .onnx can also run with "
            "--allow-unsigned, for development)",
        )
    raise InputNotFoundError(
        f"model not found: {path}",
        "give a bundle directory, a .bastion file, a registry name (bastion models list) or a zoo name",
    )


def _unpacked_archive(archive: Path) -> Path:
    """Archives are unpacked once into a cache keyed by their own sha256 (size-checked, then hashed as a stream;
    models/archive.py bounds everything else)."""
    return unpack_cached(archive, bastion_home() / "cache" / "archives")


@contextlib.contextmanager
def staged_bundle(out_dir: Path) -> Iterator[Path]:
    """A private staging directory beside ``out_dir``; ``seal_bundle`` moves it into place, anything else
    (an exception, a kill) leaves ``out_dir`` untouched and the staging directory removed."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists", "choose a new directory; bundles are never overwritten")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp is private; a bundle is meant to be read by the node's service user
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def seal_bundle(staging: Path, manifest: Manifest, out_dir: Path, sign_key=None) -> None:
    """Write the manifest, check every payload file against it, sign if a key is given, rename into place."""
    from bastion.models.manifest import write_manifest
    from bastion.models.signing import sign_manifest

    write_manifest(manifest, staging / MANIFEST_NAME)
    verify_files(staging, manifest)
    if sign_key is not None:
        sign_manifest(staging, manifest, sign_key)
    staging.rename(out_dir)
