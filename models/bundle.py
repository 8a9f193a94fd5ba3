"""A bundle on disk: a directory with ``manifest.json`` and the payload it lists.

Opening a bundle checks that every payload file exists and matches the size and
sha256 the manifest records, so a truncated copy or a swapped model is refused
before anything runs it.  (Signature checking against the trust store builds on
this; see docs/bundle.md.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import InputNotFoundError, ModelLoadError
from bastion.models.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file
from bastion.models.zoo import zoo_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its manifest."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file().path

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its canonical manifest (which hashes the payload)."""
        return self.manifest.sha256()

    @classmethod
    def open(cls, path: str | Path, verify_files: bool = True) -> "Bundle":
        root = resolve_bundle_dir(path)
        manifest = read_manifest(root / MANIFEST_NAME)
        bundle = cls(root=root, manifest=manifest)
        if verify_files:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        """Every payload file present, right size, right sha256 — or a ModelLoadError naming it."""
        for entry in self.manifest.files:
            path = self.root / entry.path
            if not path.is_file():
                raise ModelLoadError(
                    f"bundle {self.manifest.name}: payload file {entry.path} is missing",
                    "copy the whole bundle directory again",
                )
            size = path.stat().st_size
            if size != entry.size:
                raise ModelLoadError(
                    f"bundle {self.manifest.name}: {entry.path} is {size} bytes, manifest says {entry.size}"
                    " (truncated or replaced)",
                    "copy the bundle again from a trusted source",
                )
            if sha256_file(path) != entry.sha256:
                raise ModelLoadError(
                    f"bundle {self.manifest.name}: {entry.path} does not match its sha256 (modified)",
                    "refusing to run it; copy the bundle again from a trusted source",
                )
        log.debug("bundle files verified", extra={"bundle": self.manifest.name, "files": len(self.manifest.files)})


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept a bundle directory, its manifest.json, or the name of a vendored zoo model."""
    candidate = Path(path)
    if candidate.name == MANIFEST_NAME and candidate.is_file():
        return candidate.parent
    if candidate.is_dir():
        return candidate
    zoo = zoo_path(str(path))
    if zoo is not None:
        return zoo
    raise InputNotFoundError(
        f"model not found: {path}",
        "give a bundle directory, an .onnx file, or a zoo name (see `bastion models list`)",
    )
