"""The archive cache is keyed by the bytes that were unpacked: a file swapped or rewritten between hashing and
unpacking must not be cached under the first file's hash (#15)."""

import hashlib
import os
import shutil

import pytest

from bastion.errors import ArchiveError
from bastion.models import zoo_path
from bastion.models import archive as archive_mod
from bastion.models.archive import pack, unpack_cached
from bastion.models.manifest import MANIFEST_NAME


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _two_archives(tmp_path):
    first = pack(zoo_path("yolox_nano"), tmp_path / "a")
    other_dir = tmp_path / "other"
    shutil.copytree(zoo_path("yolox_nano"), other_dir)
    manifest = other_dir / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace("0.1.1-coco", "9.9.9-swapped", 1))  # another (unsigned) bundle
    other = pack(other_dir, tmp_path / "b")
    return first, other


def test_an_archive_swapped_after_hashing_is_not_cached_under_the_first_hash(tmp_path, monkeypatch):
    first, other = _two_archives(tmp_path)
    hashed = _sha(first)
    real = archive_mod._hash_stream

    def hash_then_swap(fh):
        digest = real(fh)
        os.replace(other, first)  # an attacker with write access to the USB stick swaps the file now
        return digest

    monkeypatch.setattr(archive_mod, "_hash_stream", hash_then_swap)
    target = unpack_cached(first, tmp_path / "cache")
    assert target.name == hashed
    assert (target / MANIFEST_NAME).is_file()
    assert "swapped" not in (target / MANIFEST_NAME).read_text()  # what was hashed, not the swap


def test_an_archive_rewritten_in_place_after_hashing_is_refused(tmp_path, monkeypatch):
    first, other = _two_archives(tmp_path)
    real = archive_mod._hash_stream

    def hash_then_rewrite(fh):
        digest = real(fh)
        first.write_bytes(other.read_bytes())  # same inode, other bytes
        return digest

    monkeypatch.setattr(archive_mod, "_hash_stream", hash_then_rewrite)
    with pytest.raises(ArchiveError, match="changed while"):
        unpack_cached(first, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[0-9a-f]*"))
