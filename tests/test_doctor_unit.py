"""`bastion doctor` says what this unit is to a coalition: its nation (releasability) and its unit key (sealed
bundles), and fails on the settings that would refuse or expose what arrives. Real unit keys under a per-test
BASTION_HOME (conftest)."""

from __future__ import annotations

import json
import os

from bastion.doctor import run_checks
from bastion.models.unit_key import home_key_path, init_unit_key
from conftest import run_cli


def unit_check():
    return next(c for c in run_checks() if c.name == "unit")


def test_a_fresh_unit_says_no_nation_and_no_unit_key_and_how_to_set_them(monkeypatch):
    monkeypatch.delenv("BASTION_NATION", raising=False)
    check = unit_check()
    assert check.status == "ok" and "no nation set" in check.detail and "BASTION_NATION=CODE" in check.detail
    assert "no unit key" in check.detail and "bastion keys unit-init" in check.detail


def test_nation_and_a_passphrase_protected_key_are_shown_and_a_clear_key_warns(monkeypatch):
    monkeypatch.setenv("BASTION_NATION", "can")
    unit = init_unit_key(b"field passphrase")
    check = unit_check()
    assert check.status == "ok", check
    assert "nation CAN: bundles not releasable to it are refused" in check.detail
    assert f"unit key {unit.key_id}" in check.detail and "passphrase-protected" in check.detail
    home_key_path().unlink()
    home_key_path().with_suffix(".pub").unlink()
    clear = init_unit_key(None)
    check = unit_check()
    assert check.status == "warn" and f"unit key {clear.key_id}" in check.detail and "in clear" in check.detail


def test_a_bad_nation_or_an_exposed_unit_key_fails_doctor_in_one_line(monkeypatch):
    monkeypatch.setenv("BASTION_NATION", "not a code")
    check = unit_check()
    assert check.status == "fail" and "BASTION_NATION" in check.detail and "not a country code" in check.detail
    monkeypatch.setenv("BASTION_NATION", "GBR")
    init_unit_key(b"pw")
    home_key_path().chmod(0o644)
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 1, proc.stdout
    unit = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "unit")
    assert unit["status"] == "fail" and "accessible by other users (mode 0644): chmod 600" in unit["detail"]


def test_a_key_that_is_not_the_one_its_pub_names_or_not_a_file_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("BASTION_NATION", raising=False)
    init_unit_key(None)
    ours = os.environ["BASTION_HOME"]  # this test's own (conftest)
    monkeypatch.setenv("BASTION_HOME", str(tmp_path / "other-home"))
    init_unit_key(None)  # another unit's key, copied over this one
    stranger = home_key_path().read_bytes()
    monkeypatch.setenv("BASTION_HOME", ours)
    home_key_path().write_bytes(stranger)
    check = unit_check()
    assert check.status == "fail" and "unit.pub is not the public half of" in check.detail, check
    home_key_path().write_text("junk\n")
    assert unit_check().status == "fail" and "does not open" in unit_check().detail
    home_key_path().unlink()
    os.mkfifo(home_key_path())  # never opened: a FIFO would block the reader
    check = unit_check()
    assert check.status == "fail" and "is not a unit key file" in check.detail, check


def test_a_nodes_storage_directory_is_checked_for_encryption_too(tmp_path):
    """The node's storage.dir (events, snapshots, clips, its audit log) need not be under BASTION_HOME: doctor
    --storage checks it as it checks BASTION_HOME, and a path that is no directory fails in one row."""
    from bastion.storage_crypt import storage_crypt

    data = tmp_path / "node-data"
    data.mkdir()
    proc = run_cli("doctor", "--json", "--storage", str(data))
    rows = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    found = storage_crypt(data.resolve())
    row = rows["node storage"]
    assert row["status"] == ("ok" if found.state == "encrypted" else "warn") and found.detail in row["detail"]
    if found.state != "encrypted":
        assert "storage.dir on a LUKS volume" in row["detail"]
    proc = run_cli("doctor", "--json", "--storage", str(tmp_path / "no-such-dir"))
    rows = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1 and rows["node storage"]["status"] == "fail"
    assert "not a directory" in rows["node storage"]["detail"]
    assert "node storage" not in {c["name"] for c in json.loads(run_cli("doctor", "--json").stdout)["checks"]}
    for bad in ("", "x" * 5000):  # an empty path is not '.', a name too long is a row, not an internal error
        proc = run_cli("doctor", "--json", "--storage", bad)
        rows = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
        assert proc.returncode == 1 and rows["node storage"]["status"] == "fail", proc.stderr
