"""Issue #15 (items 7, 9 and two Low items): hostile archives are bounded, staging stays in BASTION_HOME,
an older bundle never silently replaces a newer one, and a lost revocation list never lifts revocations."""

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from bastion.errors import ArchiveError, ConfigError, ModelLoadError, RegistryError, SignatureError
from bastion.models import Bundle, zoo_path
from bastion.models.archive import copy_bounded, pack, unpack
from bastion.models.keys import generate_keypair, load_private_key
from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
from bastion.models.registry import Registry
from bastion.models.signing import sign_manifest
from bastion.models.trust import TrustStore
from bastion.models.version import check_not_downgrade, version_key
from conftest import run_cli

GIB = 1 << 30


# -- hostile archives (item 7) ----------------------------------------------------------------------------
def _gzip_bomb(path, declared: int = 2 * GIB):
    """A small gzip tar whose model member really expands to ``declared`` bytes of zeros.

    Built from concatenated gzip members (gzip readers join them), so making it takes milliseconds: the
    headers, then the same compressed 1 MiB of zeros over and over, then the tar's end blocks."""
    manifest = tarfile.TarInfo("manifest.json")
    manifest.size = 2
    model = tarfile.TarInfo("model.onnx")
    model.size = declared
    head = manifest.tobuf(format=tarfile.PAX_FORMAT) + b"{}".ljust(512, b"\0") + model.tobuf(format=tarfile.PAX_FORMAT)
    mib = gzip.compress(bytes(1 << 20), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head))
        for _ in range(declared >> 20):
            fh.write(mib)
        fh.write(gzip.compress(bytes(1024)))
    return path


def _du(path):
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_gzip_bomb_is_refused_before_anything_is_written(tmp_path, bastion_home):
    archive = _gzip_bomb(tmp_path / "bomb.bastion")
    assert archive.stat().st_size < 8_000_000
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="model.onnx.*(expands|declares)"):
        unpack(archive, bastion_home / "out")
    with pytest.raises(ModelLoadError, match="expands|declares"):  # the path `bundle verify` and `reload` take
        Bundle.open(archive)
    assert time.monotonic() - started < 5
    assert _du(bastion_home) < 1_000_000 and not (bastion_home / "out").exists()
    assert not list((bastion_home / "cache").rglob("*.onnx")) if (bastion_home / "cache").exists() else True
    proc = run_cli("models", "add", str(archive))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_node_reload_of_a_bomb_is_refused_quickly_and_keeps_serving(tmp_path, bastion_home):
    from bastion.edge.client import NodeRequestError
    from test_node import client_for, running_node, take

    archive = _gzip_bomb(tmp_path / "bomb.bastion")
    with running_node(tmp_path, imgsz=None) as node, client_for(node) as client:
        started = time.monotonic()
        with pytest.raises(NodeRequestError, match="reload refused"):
            client.reload(str(archive))
        assert time.monotonic() - started < 5
        assert take(client.events(), 1)  # still detecting
    assert _du(bastion_home) < 1_000_000
    audit = (tmp_path / "data" / "audit.log").read_text()
    assert "bundle_refused" in audit and "decompression bomb" in audit


def test_declared_size_limit_is_configurable(tmp_path, monkeypatch):
    archive = pack(zoo_path("yolox_nano"), tmp_path)
    monkeypatch.setenv("BASTION_MAX_BUNDLE_BYTES", "1000000")  # yolox_nano is 3.6 MB
    with pytest.raises(ArchiveError, match="BASTION_MAX_BUNDLE_BYTES"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [archive.name]
    monkeypatch.setenv("BASTION_MAX_BUNDLE_BYTES", "lots")
    with pytest.raises(Exception, match="BASTION_MAX_BUNDLE_BYTES"):
        unpack(archive, tmp_path / "out")
    monkeypatch.delenv("BASTION_MAX_BUNDLE_BYTES")
    assert Bundle.open(unpack(archive, tmp_path / "out")).verification.signed


def test_bytes_are_counted_while_copying_a_member():
    """A member stream that yields more than its header declared is stopped at the declared size."""
    out = io.BytesIO()
    with pytest.raises(ArchiveError, match="more than the 10 bytes"):
        copy_bounded(io.BytesIO(bytes(10_000)), out, 10, "evil.bastion", "model.onnx")
    assert out.tell() <= 10 + (1 << 20)
    out = io.BytesIO()
    copy_bounded(io.BytesIO(b"0123456789"), out, 10, "ok.bastion", "model.onnx")
    assert out.getvalue() == b"0123456789"


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to make a sparse member")
def test_sparse_member_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    with open(src / "model.onnx", "wb") as fh:
        fh.truncate(3 * GIB)
    archive = tmp_path / "holes.bastion"
    subprocess.run(["tar", "--sparse", "--format=pax", "-C", str(src), "-cf", str(archive), "."], check=True)
    (src / "model.onnx").unlink()  # a 3 GiB hole is nothing on disk, but no tool copying tmp dirs should meet it
    assert archive.stat().st_size < 100_000
    with pytest.raises(ArchiveError, match="model.onnx' is a sparse file"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _du(tmp_path) < 1_000_000


def test_member_count_is_bounded_without_reading_every_header(tmp_path, monkeypatch):
    path = tmp_path / "many.bastion"
    # 100k directory members, built from one template header (fast); gzip keeps the file small
    template = tarfile.TarInfo("x")
    template.type = tarfile.DIRTYPE
    with gzip.open(path, "wb", compresslevel=1) as fh:
        for i in range(100_000):
            template.name = f"d{i:06d}"
            fh.write(template.tobuf(format=tarfile.USTAR_FORMAT))
        fh.write(bytes(1024))
    parsed = {"n": 0}
    real = tarfile.TarInfo.fromtarfile.__func__

    def counting(cls, tar):
        parsed["n"] += 1
        return real(cls, tar)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counting))
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="more than 1000 members"):
        unpack(path, tmp_path / "out")
    assert parsed["n"] <= 1002 and time.monotonic() - started < 3


def _bundle_dir(tmp_path, name="yolox_nano"):
    dst = tmp_path / name
    shutil.copytree(zoo_path(name), dst)
    return dst


def test_dot_slash_prefixed_archive_from_plain_tar_is_accepted(tmp_path):
    src = _bundle_dir(tmp_path)
    archive = tmp_path / "dotted.bastion"
    with tarfile.open(archive, "w") as tar:  # what `tar -C src -cf dotted.bastion .` writes
        tar.add(src, arcname=".")
    assert tarfile.open(archive).getnames()[:2] == [".", "./manifest.json"] or "." in tarfile.open(archive).getnames()
    assert Bundle.open(archive).verification.signed
    assert Registry().add(archive, Bundle.open).name == "yolox_nano"
    if shutil.which("tar"):
        gnu = tmp_path / "gnu.bastion"
        subprocess.run(["tar", "-C", str(src), "-cf", str(gnu), "."], check=True)
        assert Bundle.open(unpack(gnu, tmp_path / "gnu")).verification.signed


@pytest.mark.parametrize(
    "name,message",
    [
        ("./../escape", "escapes the bundle"),
        ("a/../../escape", "escapes the bundle"),
        ("/abs", "absolute path"),
    ],
)
def test_dot_prefix_does_not_open_a_way_out(tmp_path, name, message):
    archive = tmp_path / "evil.bastion"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveError, match=message):
        unpack(archive, tmp_path / "out")


def test_duplicate_members_are_refused(tmp_path):
    archive = tmp_path / "dup.bastion"
    with tarfile.open(archive, "w") as tar:
        for data in (b"{}", b"[]"):
            info = tarfile.TarInfo("manifest.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="twice"):
        unpack(archive, tmp_path / "out")


@pytest.fixture
def tmpfs_home(tmp_path, monkeypatch):
    """BASTION_HOME on its own small filesystem (a real tmpfs), or skip where mount is not allowed."""
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(home)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    monkeypatch.setenv("BASTION_HOME", str(home))
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_fresh_home_on_its_own_filesystem_unpacks_and_adds(tmp_path, tmpfs_home):
    archive = pack(zoo_path("yolox_nano"), tmp_path / "usb")
    assert Bundle.open(archive).verification.signed  # was: OSError Invalid cross-device link
    assert Registry().add(archive, Bundle.open).name == "yolox_nano"
    assert not [p for p in tmpfs_home.rglob(".*") if p.name != ".lock"]  # no staging left behind


def test_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path, tmpfs_home):
    archive = tmp_path / "big.bastion"
    with tarfile.open(archive, "w") as tar:
        for name, size in (("manifest.json", 2), ("model.onnx", 64 << 20)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    with pytest.raises(ArchiveError, match="free"):
        unpack(archive, tmpfs_home / "out")
    assert _du(tmpfs_home) < 1_000_000


def test_registry_add_checks_space_for_its_own_copy_too(tmp_path, monkeypatch):
    """Adding an archive needs room twice (unpacked, then the registry's verified copy): both are checked
    before writing, so a disk that fits one copy refuses up front instead of filling up mid-copy."""
    home = tmp_path / "small"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(home)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    monkeypatch.setenv("BASTION_HOME", str(home))
    try:
        archive = pack(zoo_path("yolox_nano"), tmp_path)  # 3.6 MB payload: fits once in 6 MB, not twice
        with pytest.raises(RegistryError, match="is free in"):
            Registry().add(archive, Bundle.open)
        assert Registry().entries() == []
        assert not [p for p in (home / "registry").iterdir() if p.name != ".lock"]
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


# -- downgrades (item 9) ----------------------------------------------------------------------------------
@pytest.fixture
def team_key(tmp_path):
    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    return pair


def signed_version(tmp_path, pair, version, name="pv"):
    root = tmp_path / f"{name}-{version}"
    shutil.copytree(zoo_path("yolox_nano"), root)
    manifest = read_manifest(root / MANIFEST_NAME).model_copy(update={"name": name, "version": version})
    write_manifest(manifest, root / MANIFEST_NAME)
    sign_manifest(root, manifest, load_private_key(pair.private_path))
    return root


def test_versions_order_numerically():
    assert version_key("1.10") > version_key("1.9") > version_key("1.0") > version_key("0.9.9")
    assert version_key("2.0") > version_key("2.0-rc1") > version_key("1.99")
    assert version_key("1.0") == version_key("1.0.0") and version_key("v1.2") == version_key("1.2")
    assert version_key("0.1.1-coco") > version_key("0.1.0")


def test_adding_an_older_version_needs_allow_downgrade_and_is_recorded(tmp_path, team_key):
    reg = Registry()
    new = reg.add(signed_version(tmp_path, team_key, "2.0"), Bundle.open)
    before = reg.index_path.read_bytes()
    with pytest.raises(RegistryError, match="older than pv:2.0.*--allow-downgrade"):
        reg.add(signed_version(tmp_path, team_key, "1.0"), Bundle.open)
    assert reg.index_path.read_bytes() == before and reg.resolve("pv").sha256 == new.sha256
    old = reg.add(tmp_path / "pv-1.0", Bundle.open, allow_downgrade=True)
    assert reg.resolve("pv").version == "2.0" and reg.resolve("pv:1.0").sha256 == old.sha256
    records = [json.loads(line) for line in reg.audit_path.read_text().splitlines()]
    assert records[-1]["event"] == "downgrade_added" and records[-1]["version"] == "1.0"
    assert records[-1]["newest"] == "2.0"


def test_bare_name_resolves_to_the_highest_version_not_the_last_added(tmp_path, team_key):
    reg = Registry()
    reg.add(signed_version(tmp_path, team_key, "1.9"), Bundle.open)
    reg.add(signed_version(tmp_path, team_key, "1.10"), Bundle.open)
    assert reg.resolve("pv").version == "1.10"
    with pytest.raises(RegistryError, match="--allow-downgrade"):
        reg.add(signed_version(tmp_path, team_key, "1.2"), Bundle.open)


def test_cli_models_add_older_version(tmp_path, team_key):
    assert run_cli("models", "add", str(signed_version(tmp_path, team_key, "2.0"))).returncode == 0
    old = signed_version(tmp_path, team_key, "1.0")
    proc = run_cli("models", "add", str(old))
    assert proc.returncode == 1 and "--allow-downgrade" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("models", "add", str(old), "--allow-downgrade")
    assert proc.returncode == 0, proc.stderr
    assert "older" in proc.stderr or "downgrade" in (proc.stdout + proc.stderr).lower()
    assert run_cli("models", "path", "pv").stdout.strip().endswith(Registry().resolve("pv:2.0").sha256)


def test_check_not_downgrade(tmp_path, team_key):
    new = read_manifest(signed_version(tmp_path, team_key, "2.0") / MANIFEST_NAME)
    old = read_manifest(signed_version(tmp_path, team_key, "1.0") / MANIFEST_NAME)
    other = read_manifest(zoo_path("yolox_nano") / MANIFEST_NAME)
    assert check_not_downgrade(old, new, allow=False) is False  # an upgrade
    assert check_not_downgrade(new, other, allow=False) is False  # another model altogether
    with pytest.raises(ModelLoadError, match="older than the running pv:2.0"):
        check_not_downgrade(new, old, allow=False)
    assert check_not_downgrade(new, old, allow=True) is True


# -- a lost revocation list (Low) -------------------------------------------------------------------------
def test_missing_revocation_list_refuses_until_recreated(tmp_path, bastion_home):
    store = TrustStore()
    store.revoke(next(iter(store.keys())), "replaced by national key")
    with pytest.raises(SignatureError, match="revoked"):
        Bundle.open("yolox_nano")
    store.revoked_path.unlink()  # an accident, or someone lifting every revocation at once
    with pytest.raises(SignatureError, match="revocation list .* is missing"):
        Bundle.open("yolox_nano")
    proc = run_cli("bundle", "verify", "yolox_nano")
    assert proc.returncode == 1 and "revocation list" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("keys", "reset-revocations", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(store.revoked_path.read_text()) == {"revoked": {}}
    events = [json.loads(line)["event"] for line in store.audit_path.read_text().splitlines()]
    assert "revocations_reset" in events and "revoked" in events
    assert Bundle.open("yolox_nano").verification.signed  # the operator chose to start again


def test_a_store_being_created_right_now_is_waited_for_not_called_lost(tmp_path):
    """Another process's first use holds the lock with its temp file in trust/ before the rename:
    a reader must wait for that lock, not read the half-made store as one that lost its list."""
    import threading

    from bastion.models.atomic import atomic_write_bytes, file_lock

    store = TrustStore(tmp_path / "trust")
    result: list = []
    with file_lock(store.lock_path):
        (store.root / f".{store.revoked_path.name}.abc.tmp").write_bytes(b"")  # the writer's temp file
        reader = threading.Thread(target=lambda: result.append(_revoked_or_error(TrustStore(store.root))))
        reader.start()
        time.sleep(0.3)
        assert not result, result  # still waiting on the lock, not refused
        (store.root / f".{store.revoked_path.name}.abc.tmp").unlink()
        atomic_write_bytes(store.revoked_path, json.dumps({"revoked": {}}).encode())
    reader.join(10)
    assert result == [{}]


def _revoked_or_error(store):
    try:
        return store.revoked()
    except SignatureError as exc:
        return repr(exc)


def test_fresh_unit_trust_store_is_created_with_an_empty_list(bastion_home):
    assert Bundle.open("yolox_nano").verification.signed
    assert json.loads(TrustStore().revoked_path.read_text()) == {"revoked": {}}


def test_unsigned_override_still_loud_when_list_missing(tmp_path, bastion_home):
    store = TrustStore()
    store.revoked()  # creates the store
    store.revoked_path.unlink()
    assert Bundle.open("yolox_nano", allow_unsigned=True).verification.signed is False


def test_node_reload_to_an_older_version_is_refused_unless_allowed(tmp_path, team_key):
    from bastion.edge.client import NodeRequestError
    from test_node import client_for, running_node

    new, old = signed_version(tmp_path, team_key, "2.0"), signed_version(tmp_path, team_key, "1.0")
    with running_node(tmp_path, model=str(new), imgsz=None) as node, client_for(node) as client:
        with pytest.raises(NodeRequestError, match="older than the running pv:2.0"):
            client.reload(str(old))
        assert client.status()["model"]["version"] == "2.0"
        assert client.reload(str(old), allow_downgrade=True)["model"]["name"] == "pv"
        assert client.status()["model"]["version"] == "1.0"
        assert client.reload(str(new))["model"]["name"] == "pv"  # forward needs nothing
    records = [json.loads(x) for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    reloads = [r for r in records if r["kind"] == "reload"]
    assert [r["fields"].get("downgrade_from") for r in reloads] == ["2.0", None]
    assert any(r["kind"] == "bundle_refused" and "older" in json.dumps(r) for r in records)


def test_plain_tar_whose_first_name_looks_like_compression_magic(tmp_path):
    archive = tmp_path / "odd.bastion"
    with tarfile.open(archive, "w") as tar:
        for name in ("BZh9-notes", "manifest.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    out = unpack(archive, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["BZh9-notes", "manifest.json"]


def test_an_older_revocation_list_put_back_is_refused(tmp_path, team_key):
    """Restoring last month's revoked.json (or deleting a line by hand) must not quietly lift a revocation:
    the store's journal knows what was revoked since."""
    store = TrustStore()
    store.revoke(team_key.key_id, "lost laptop")
    before = store.revoked_path.read_bytes()
    anchor = Bundle.open("yolov5n").verification.key_id
    store.revoke(anchor, "national key replaces the project's")
    store.revoked_path.write_bytes(before)  # an old backup
    with pytest.raises(SignatureError, match=f"lacks .*{anchor}"):
        Bundle.open("yolov5n")
    proc = run_cli("bundle", "verify", "yolov5n")
    assert proc.returncode == 1 and anchor in proc.stderr and "Traceback" not in proc.stderr
    store.revoke(anchor, "again")  # the way back: revoke it again
    with pytest.raises(SignatureError, match="revoked on this unit"):
        Bundle.open("yolov5n")
    signed = signed_version(tmp_path, team_key, "1.0")
    with pytest.raises(SignatureError, match="revoked on this unit"):
        Bundle.open(signed)
    proc = run_cli("keys", "unrevoke", team_key.key_id[:8], "--yes")  # lifting one on purpose is recorded
    assert proc.returncode == 0, proc.stderr
    assert Bundle.open(signed).verification.signed
    events = [json.loads(line)["event"] for line in store.audit_path.read_text().splitlines()]
    assert events[-1] == "unrevoked"


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_archives_of_a_real_bundle_are_accepted(tmp_path, mode):
    archive = tmp_path / f"yolox.{mode[2:]}.bastion"
    with tarfile.open(archive, mode) as tar:
        tar.add(zoo_path("yolox_nano"), arcname=".")
    assert Bundle.open(unpack(archive, tmp_path / "out")).verification.signed


def test_a_deeply_nested_member_path_is_refused_in_one_line(tmp_path, bastion_home):
    """Adversarial pass: a member 1,500 directories deep made `models add` die with `internal error:
    RecursionError` (pathlib's mkdir(parents=True) recurses once per missing parent)."""
    archive = tmp_path / "deep.bastion"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("/".join(["d"] * 1500) + "/f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    proc = run_cli("models", "add", str(archive))
    assert proc.returncode == 1 and "internal error" not in proc.stderr, proc.stderr
    assert "deep" in proc.stderr
    assert not any((bastion_home / "registry").rglob("f"))


@pytest.mark.parametrize("which", ["revoked", "journal", "index"])
@pytest.mark.parametrize("how", ["huge", "fifo"])
def test_store_files_read_whole_are_bounded_first(bastion_home, monkeypatch, which, how):
    """revoked.json, the trust journal and the registry index are read whole on every load: a file swapped for a
    huge one or a FIFO (which would block open() forever) is refused as damaged with one line, never buffered."""
    import os

    from bastion.errors import BastionError
    from bastion.models import registry as registry_module
    from bastion.models import trust as trust_module

    reg = Registry()
    reg.add(zoo_path("yolox_nano"), Bundle.open)
    store = TrustStore()
    path = {"revoked": store.revoked_path, "journal": store.audit_path, "index": reg.index_path}[which]
    monkeypatch.setattr(trust_module, "MAX_REVOKED_BYTES", 4096)
    monkeypatch.setattr(trust_module, "MAX_JOURNAL_BYTES", 4096)
    monkeypatch.setattr(registry_module, "MAX_INDEX_BYTES", 4096)
    if how == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        valid = {"revoked": b'{"revoked": {}}', "journal": path.read_bytes(), "index": path.read_bytes()}[which]
        path.write_bytes(b" " * 5000 + valid)  # still valid: only its size is wrong
    with pytest.raises(BastionError, match="damaged|missing"):  # a FIFO list is not a file: missing
        Bundle.open(zoo_path("yolox_nano")) if which != "index" else reg.entries()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_in_place_of_the_revocation_list_is_damage_not_missing(tmp_path, bastion_home, kind):
    """Saying "missing" sends the soldier to reset-revocations, which would refuse anyway: say what is there instead."""
    store = TrustStore()
    store.keys()  # the store exists, with its list
    store.revoked_path.unlink()
    if kind == "folder":
        store.revoked_path.mkdir()
    else:
        os.mkfifo(store.revoked_path)  # never opened blocking: read_bounded refuses it
    with pytest.raises(ConfigError) as err:  # as a damaged list's contents are
        Bundle.open("yolox_nano")
    assert "is damaged" in str(err.value) and "missing" not in str(err.value)
