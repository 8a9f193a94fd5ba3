"""The .bastion archive and the content-addressed registry: safe, atomic, and left intact on failure."""

import errno
import io
import json
import multiprocessing
import tarfile
from functools import partial

import pytest

from bastion import Detector
from bastion.errors import ArchiveError, RegistryError, SignatureError
from bastion.models import Bundle, zoo_path
from bastion.models import registry as registry_module
from bastion.models.archive import pack, unpack
from bastion.models.registry import Registry
from conftest import PERSON_IMAGE, run_cli

open_verified = Bundle.open


def evil_archive(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("manifest.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def test_pack_unpack_round_trip_and_load_archive(tmp_path):
    archive = pack(zoo_path("yolox_nano"), tmp_path)
    assert archive.name == "yolox_nano-0.1.1-coco.bastion"
    with Detector.load(archive, threads=1) as det:
        assert det.detect(PERSON_IMAGE).counts().get("person") == 1
    unpacked = unpack(archive, tmp_path / "x")
    assert Bundle.open(unpacked).verification.signed


@pytest.mark.parametrize(
    "make_member,message",
    [
        (lambda: tarfile.TarInfo("../escape.txt"), "escapes the bundle"),
        (lambda: tarfile.TarInfo("/etc/passwd"), "absolute path"),
        (lambda: _link("evil", tarfile.SYMTYPE), "is a link"),
        (lambda: _link("hard", tarfile.LNKTYPE), "is a link"),
        (lambda: _fifo(), "not a regular file"),
    ],
)
def test_hostile_archives_are_refused_whole(tmp_path, make_member, message):
    archive = evil_archive(tmp_path / "evil.bastion", make_member())
    with pytest.raises(ArchiveError, match=message):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()
    proc = run_cli("models", "add", str(archive))
    assert proc.returncode == 1 and message in " ".join(proc.stderr.split())


def _link(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd"
    return info


def _fifo():
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    return info


def test_truncated_archive(tmp_path):
    archive = pack(zoo_path("yolox_nano"), tmp_path)
    cut = tmp_path / "cut.bastion"
    cut.write_bytes(archive.read_bytes()[:1_000_000])
    with pytest.raises(ArchiveError, match="truncated or damaged"):
        unpack(cut, tmp_path / "out")


def test_registry_add_resolve_list_remove(tmp_path):
    reg = Registry()
    entry = reg.add(zoo_path("yolox_nano"), open_verified)
    assert entry.path.name == entry.sha256 and (entry.path / "manifest.json").is_file()
    assert reg.add(pack(zoo_path("yolox_nano"), tmp_path), open_verified).sha256 == entry.sha256  # idempotent
    assert [e.name for e in reg.entries()] == ["yolox_nano"]
    assert reg.resolve("yolox_nano:0.1.1-coco").sha256 == entry.sha256
    assert reg.resolve("yolox_nano:9") is None
    with Detector.load("yolox_nano:0.1.1-coco", warmup=False) as det:  # name:version goes through the registry
        assert det.bundle_sha256 == entry.sha256
    reg.remove("yolox_nano")
    assert reg.entries() == [] and not entry.path.exists()
    with pytest.raises(RegistryError, match="no bundle"):
        reg.remove("yolox_nano")


def test_registry_refuses_unsigned_unless_allowed(tmp_path):
    import shutil

    src = tmp_path / "b"
    shutil.copytree(zoo_path("yolox_nano"), src)
    (src / "signature").unlink()
    with pytest.raises(SignatureError):
        Registry().add(src, open_verified)
    assert Registry().entries() == []
    assert Registry().add(src, partial(Bundle.open, allow_unsigned=True)).name == "yolox_nano"


def test_full_disk_leaves_registry_unchanged(tmp_path, monkeypatch):
    reg = Registry()
    reg.add(zoo_path("yolox_nano"), open_verified)
    before = reg.index_path.read_bytes()
    calls = {"n": 0}
    real = registry_module._copy_synced

    def failing_copy(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(registry_module, "_copy_synced", failing_copy)
    with pytest.raises(RegistryError, match="disk full"):
        reg.add(zoo_path("yolov5n"), open_verified)
    assert reg.index_path.read_bytes() == before
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", "bundles", "index.json"]  # no staging left
    assert len(list(reg.bundles.iterdir())) == 1


def _add_in_child(home, name, queue):
    import os

    os.environ["BASTION_HOME"] = home
    try:
        queue.put(Registry().add(zoo_path(name), Bundle.open).sha256)
    except Exception as exc:  # report, don't hang the parent
        queue.put(repr(exc))


def test_two_writers_at_once_keep_the_index_consistent(bastion_home):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_add_in_child, args=(str(bastion_home), n, queue))
        for n in ("yolox_nano", "yolov5n", "yolox_nano", "yolov5n")
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(len(r) == 64 for r in results), results
    index = json.loads(Registry().index_path.read_text())["bundles"]
    assert sorted(e["name"] for e in index.values()) == ["yolov5n", "yolox_nano"]
    for sha in index:
        assert Bundle.open(Registry().bundles / sha).sha256 == sha
