"""Issue #19 item 2: a signed trust policy — roles, scopes, validity windows, k-of-n rules, TUF-style root
rotation and anti-rollback — held against real keys, real bundles and the real CLI."""

import datetime as dt
import json
import os

import pytest

from bastion.errors import ConfigError, SignatureError
from bastion.models import Bundle
from bastion.models.policy_store import PolicyStore
from bastion.models.trust import TrustStore
from coalition_kit import (
    NATIONS_RULE,
    TEAM_AND_RELEASE_RULE,
    UTC,
    add_countersignature,
    keys,
    make_bundle,
    policy,
    signed,
    write_signed,
)
from conftest import run_cli

NOW = dt.datetime.now(UTC)


@pytest.fixture
def kit(tmp_path):
    k = keys(tmp_path, "root1", "root2", "root3", "root4", "can", "gbr", "fra", "team", "release")
    nations = [{"pair": k["can"], "role": "nation:CAN"}, {"pair": k["gbr"], "role": "nation:GBR"}]
    return k, nations


def first_apply(s):
    return PolicyStore().apply(s, first_root=s.policy.root.fingerprint()[:16])


def one_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_threshold_unmet_by_one_then_met_by_a_countersignature(tmp_path, kit):
    k, nations = kit
    write_signed(tmp_path / "p.bastion-policy", signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    fp = run_cli("policy", "show", str(tmp_path / "p.bastion-policy"), "--json")
    assert fp.returncode == 0, fp.stderr
    applied = run_cli(
        "policy",
        "apply",
        str(tmp_path / "p.bastion-policy"),
        "--first-root",
        json.loads(fp.stdout)["root"]["fingerprint"],
    )
    assert applied.returncode == 0, applied.stderr
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    line = one_line(run_cli("bundle", "verify", str(root)))
    assert "rule 'coalition-*' unmet: needs 2 signature(s) by distinct nation:* holders, has 1 (1 short)" in line
    counter = run_cli("bundle", "countersign", str(root), "--sign", str(k["gbr"].private_path))
    assert counter.returncode == 0, counter.stderr
    ok = run_cli("bundle", "verify", str(root), "--json")
    assert ok.returncode == 0, ok.stderr
    assert sorted(json.loads(ok.stdout)["signers"]) == ["can (nation:CAN)", "gbr (nation:GBR)"]
    inspected = run_cli("bundle", "inspect", str(root), "--json")
    signers = json.loads(inspected.stdout)["signers"]
    assert [(s["name"], s["role"]) for s in signers] == [("can", "nation:CAN"), ("gbr", "nation:GBR")]


def test_one_model_team_and_one_release_authority(tmp_path, kit):
    k, _ = kit
    people = [{"pair": k["team"], "role": "model-team"}, {"pair": k["release"], "role": "release-authority"}]
    first_apply(signed(policy(1, [k["root1"]], people, [TEAM_AND_RELEASE_RULE]), k["root1"]))
    root = make_bundle(tmp_path, "detector", k["team"])
    with pytest.raises(
        SignatureError, match=r"needs 1 signature\(s\) by distinct release-authority holders, has 0 \(1 short\)"
    ):
        Bundle.open(root)
    add_countersignature(root, k["release"])
    assert Bundle.open(root).verification.policy.startswith("trust policy v1, rule '*'")


def test_a_key_signing_outside_its_scope_does_not_count(tmp_path, kit):
    k, nations = kit
    nations[1]["scopes"] = ["gbr-*"]
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    with pytest.raises(SignatureError, match=r"has 1 \(1 short\); not counted: gbr outside its scope \(gbr-\*\)"):
        Bundle.open(root)


def test_an_expired_key_does_not_count(tmp_path, kit):
    k, nations = kit
    nations[1]["not_after"] = (NOW - dt.timedelta(days=1)).isoformat()
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    with pytest.raises(SignatureError, match="not counted: gbr expired"):
        Bundle.open(root)


def test_a_revocation_travels_as_a_signed_update(tmp_path, kit):
    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    assert Bundle.open(root).verification.signed
    update = write_signed(
        tmp_path / "v2.bastion-policy",
        signed(policy(2, [k["root1"]], nations, [NATIONS_RULE], revoked=(k["gbr"].key_id,)), k["root1"]),
    )
    assert run_cli("policy", "apply", str(update)).returncode == 0
    with pytest.raises(SignatureError, match="not counted: gbr revoked"):
        Bundle.open(root)
    journal = (TrustStore().audit_path).read_text()
    assert journal.count('"policy_applied"') == 2


def test_a_replayed_older_policy_is_refused(tmp_path, kit):
    k, nations = kit
    v1 = signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    v2 = signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    first_apply(v1)
    PolicyStore().apply(v2)
    line = one_line(run_cli("policy", "apply", str(write_signed(tmp_path / "v1.bastion-policy", v1))))
    assert "policy v1 is not newer than v2 in force here" in line
    # the same replay by copying the old file over the unit's own: every bundle is refused, not the old rules
    PolicyStore().path.write_bytes(v1.to_bytes())
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    with pytest.raises(SignatureError, match="policy on file is v1 but v2 was applied here"):
        Bundle.open(root)
    PolicyStore().path.write_bytes(v2.to_bytes().replace(b'"version": 2', b'"version": 3'))  # edited by hand
    with pytest.raises(SignatureError, match="policy on this unit is damaged or was edited"):
        Bundle.open(root)
    PolicyStore().path.unlink()  # and deleting it does not fall back to the trust store either
    with pytest.raises(SignatureError, match="trust policy .* is missing"):
        Bundle.open(root)


def test_root_rotation_needs_the_threshold_of_the_old_root(tmp_path, kit):
    k, nations = kit
    old_roots, new_roots = [k["root1"], k["root2"]], [k["root3"], k["root4"]]
    first_apply(signed(policy(1, old_roots, nations, [NATIONS_RULE], threshold=2), *old_roots))
    v2 = policy(2, new_roots, nations, [NATIONS_RULE], threshold=2)
    too_few = write_signed(tmp_path / "few.bastion-policy", signed(v2, *new_roots, k["root1"]))
    line = one_line(run_cli("policy", "apply", str(too_few)))
    assert "policy v2 is signed by 1 of v1's (the old) root keys, needs 2 (1 more)" in line
    with pytest.raises(SignatureError, match="signed by 1 of its own root keys, needs 2"):
        PolicyStore().apply(signed(v2, *old_roots, k["root3"]))
    PolicyStore().apply(signed(v2, *new_roots, *old_roots))
    assert PolicyStore().current().policy.root.fingerprint() == v2.root.fingerprint()
    # from now on the old root alone cannot change anything
    v3 = policy(3, old_roots, nations, [NATIONS_RULE], threshold=2)
    with pytest.raises(SignatureError, match="signed by 0 of v2's"):
        PolicyStore().apply(signed(v3, *old_roots))


def test_a_first_policy_needs_its_root_confirmed(tmp_path, kit):
    k, nations = kit
    s = signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    with pytest.raises(ConfigError, match="no trust policy yet: confirm the new root"):
        PolicyStore().apply(s)
    with pytest.raises(SignatureError, match="root fingerprint is"):
        PolicyStore().apply(s, first_root="0" * 16)
    assert PolicyStore().current() is None


def test_an_expired_policy_is_refused_at_apply_and_in_force(tmp_path, kit, monkeypatch):
    k, nations = kit
    stale = policy(1, [k["root1"]], nations, [NATIONS_RULE], expires=NOW - dt.timedelta(hours=1))
    with pytest.raises(SignatureError, match="expired"):
        first_apply(signed(stale, k["root1"]))
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    assert Bundle.open(root).verification.signed
    import bastion.models.policy as policy_module

    monkeypatch.setattr(policy_module, "utcnow", lambda: NOW + dt.timedelta(days=31))
    with pytest.raises(SignatureError, match="trust policy v1 expired"):
        Bundle.open(root)


def test_a_model_no_rule_names_is_refused_and_the_zoo_needs_the_policy_too(tmp_path, kit):
    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    with pytest.raises(SignatureError, match="has no rule for model name 'yolov5n'"):
        Bundle.open("yolov5n")


def test_policy_init_sign_show_apply_and_doctor_through_the_cli(tmp_path, kit):
    k, _ = kit
    yaml_path = tmp_path / "policy.yaml"
    init = run_cli(
        "policy", "init", "--out", str(yaml_path), "--root", str(k["root1"].public_path),
        "--root", str(k["root2"].public_path), "--threshold", "2",
        "--key", f"{k['can'].public_path}=nation:CAN", "--key", f"{k['gbr'].public_path}=nation:GBR",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    text = yaml_path.read_text().replace("match: '*'", "match: coalition-*").replace("role: '*'", "role: nation:*")
    yaml_path.write_text(text.replace("count: 1", "count: 2"))
    assert run_cli("policy", "sign", str(yaml_path), "--key", str(k["root1"].private_path)).returncode == 0
    signed_path = tmp_path / "policy.bastion-policy"
    half = run_cli("policy", "apply", str(signed_path), "--first-root", "0" * 16)
    assert "signed by 1 of its own root keys, needs 2 (1 more)" in one_line(half)
    assert run_cli("policy", "sign", str(signed_path), "--key", str(k["root2"].private_path)).returncode == 0
    again = run_cli("policy", "sign", str(signed_path), "--key", str(k["root2"].private_path))
    assert "already signed by key" in one_line(again)
    over = run_cli("policy", "sign", str(yaml_path), "--key", str(k["root2"].private_path))
    assert "policy.bastion-policy already exists" in one_line(over)
    shown = json.loads(run_cli("policy", "show", str(signed_path), "--json").stdout)
    assert shown["root"]["signed_by"] == 2 and shown["rules"] == [{"match": "coalition-*", "needs": "2 nation:*"}]
    applied = run_cli("policy", "apply", str(signed_path), "--first-root", shown["root"]["fingerprint"][:20])
    assert applied.returncode == 0, applied.stderr
    in_force = json.loads(run_cli("policy", "show", "--json").stdout)
    assert in_force["version"] == 1 and {x["role"] for x in in_force["keys"]} == {"nation:CAN", "nation:GBR"}
    doctor = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["trust policy"]["status"] == "ok" and checks["trust policy"]["detail"].startswith("v1, expires")


@pytest.mark.parametrize(
    "content",
    [b"{" * 100_000, b"x" * (2 << 20), b'{"format": "bastion-policy/1", "policy": {"version": "one"}}', b"\xff\xfe"],
    ids=["nested", "too-big", "malformed", "binary"],
)
def test_a_hostile_policy_file_is_one_line(tmp_path, content):
    path = tmp_path / "evil.bastion-policy"
    path.write_bytes(content)
    assert "policy" in one_line(run_cli("policy", "apply", str(path)))


def test_a_hand_written_policy_yaml_with_key_files_and_plain_dates(tmp_path, kit):
    k, _ = kit
    (tmp_path / "policy.yaml").write_text(
        f"""
version: 7
expires: 2099-01-01
root:
  threshold: 1
  keys: [{{name: root, public: keys/{k["root1"].public_path.name}}}]
keys:
  - {{name: canada, public: keys/{k["can"].public_path.name}, role: "nation:CAN", not_after: 2020-01-01}}
  - {{name: britain, public: keys/{k["gbr"].public_path.name}, role: "nation:GBR", scopes: [coalition-*]}}
rules:
  - {{match: coalition-*, require: [{{role: "nation:*", count: 1}}]}}
"""
    )
    assert (
        run_cli("policy", "sign", str(tmp_path / "policy.yaml"), "--key", str(k["root1"].private_path)).returncode == 0
    )
    shown = json.loads(run_cli("policy", "show", str(tmp_path / "policy.bastion-policy"), "--json").stdout)
    assert shown["version"] == 7 and shown["expires"] == "2099-01-01T00:00:00+00:00"
    assert (
        shown["keys"][0]["key_id"] == k["can"].key_id and shown["keys"][0]["not_after"] == "2020-01-01T00:00:00+00:00"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "policy.yaml").read_text().replace('"nation:CAN"', '"nation:canada"'))
    line = one_line(run_cli("policy", "sign", str(bad), "--key", str(k["root1"].private_path)))
    assert "keys.0.role" in line


def test_a_lost_or_replaced_policy_file_is_put_back_by_applying_the_current_one(tmp_path, kit):
    """The refusal's advice ("apply the current policy again") must work: apply used to fail on the same check."""
    k, nations = kit
    v1 = signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    v2 = signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    later = NOW + dt.timedelta(days=60)
    other_v2 = signed(policy(2, [k["root1"]], nations, [NATIONS_RULE], expires=later), k["root1"])
    first_apply(v1)
    PolicyStore().apply(v2)
    root = make_bundle(tmp_path, "coalition-vehicles", k["can"])
    add_countersignature(root, k["gbr"])
    PolicyStore().path.write_bytes(v1.to_bytes())  # an old copy put back
    with pytest.raises(SignatureError, match="policy on file is v1 but v2 was applied here"):
        Bundle.open(root)
    v1_file = write_signed(tmp_path / "v1.bastion-policy", v1)
    assert "policy v1 is older than v2 applied here" in one_line(run_cli("policy", "apply", str(v1_file)))
    with pytest.raises(SignatureError, match="another policy under the same version"):
        PolicyStore().apply(other_v2)
    new_root = signed(policy(3, [k["root2"]], nations, [NATIONS_RULE]), k["root2"], k["root1"])
    with pytest.raises(SignatureError, match="apply v2 again first"):  # the old root cannot be checked
        PolicyStore().apply(new_root)
    proc = run_cli("policy", "apply", str(write_signed(tmp_path / "v2.bastion-policy", v2)))
    assert proc.returncode == 0, proc.stderr
    assert "was v2, whose file was lost or replaced: restored" in proc.stdout
    Bundle.open(root)  # every bundle was refused until the policy came back
    PolicyStore().path.unlink()  # lost: a newer version from the same root is accepted too
    PolicyStore().apply(signed(policy(3, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    assert PolicyStore().current().policy.version == 3
    journal = PolicyStore().trust.audit_path.read_text()
    assert journal.count('"restored":"true"') == 2


def test_a_policy_file_dropped_into_trust_by_hand_is_refused_until_one_is_applied(tmp_path, kit):
    """A validly signed policy from a root this unit never confirmed, copied over the file in force with a higher
    version, was accepted at load (only 'older than the journal' was checked): an attacker's v100 then released
    the attacker's bundles. The file must be the one the journal records as applied."""
    k, nations = kit
    v1 = signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    rogue_signers = [{"pair": k["fra"], "role": "nation:CAN"}, {"pair": k["team"], "role": "nation:GBR"}]
    rogue = signed(policy(100, [k["root2"]], rogue_signers, [NATIONS_RULE]), k["root2"])
    root = make_bundle(tmp_path, "coalition-vehicles", k["fra"])
    add_countersignature(root, k["team"])
    store = PolicyStore()
    store.trust.keys()  # a unit with its trust store and journal, and no policy yet
    store.path.write_bytes(rogue.to_bytes())
    with pytest.raises(SignatureError, match=r"is not the one applied here: .* records no policy \(put there by hand"):
        Bundle.open(root)
    first_apply(v1)  # the operator applies the coalition's policy, confirming its root
    assert PolicyStore().current().policy.version == 1
    PolicyStore().path.write_bytes(rogue.to_bytes())
    with pytest.raises(SignatureError, match=r"v100, sha256 .* records v1 \(sha256"):
        Bundle.open(root)
    assert "is not the one applied here" in one_line(run_cli("bundle", "verify", str(root)))
    PolicyStore().apply(v1)  # putting the policy in force back is the way out, as the refusal says
    with pytest.raises(
        SignatureError, match="rule .coalition-.. unmet.*not in the policy"
    ):  # rogue keys count for nothing
        Bundle.open(root)


def test_a_reader_waits_out_an_apply_between_its_journal_line_and_its_file(tmp_path, kit):
    """apply writes the file, then its journal line, under the store's lock. A node re-checking its trust in that
    window would see a file the journal does not name and stop: it waits on the lock and reads again."""
    import threading

    from bastion.models.atomic import atomic_write_bytes, file_lock

    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    v2 = signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    store = PolicyStore()
    written, reader_asked = threading.Event(), threading.Event()

    def apply_slowly():  # what apply does, with a pause between its file and its journal line
        with file_lock(store.trust.lock_path):
            atomic_write_bytes(store.path, v2.to_bytes())
            written.set()
            reader_asked.wait(10)
            store.trust.record("policy_applied", strict=True, version="2", sha256=v2.policy.sha256(),
                               root=v2.policy.root.fingerprint(), expires=v2.policy.expires.isoformat())  # fmt: skip

    writer = threading.Thread(target=apply_slowly)
    writer.start()
    written.wait(10)
    threading.Timer(0.3, reader_asked.set).start()  # the reader is already waiting on the lock by then
    assert PolicyStore().current().policy.version == 2
    writer.join(10)


def test_a_full_disk_refuses_the_apply_in_one_line_and_the_policy_in_force_stays(tmp_path, kit, monkeypatch):
    """A disk too full for the new file or its journal line refuses the apply in one line and changes nothing (a
    journal line that failed had been logged and ignored, leaving a file the journal does not name). A real small
    tmpfs."""
    import subprocess

    k, nations = kit
    home = tmp_path / "home"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        monkeypatch.setenv("BASTION_HOME", str(home))
        first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
        v2 = write_signed(
            tmp_path / "v2.bastion-policy", signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
        )
        filler = home / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # every free block, then nothing more fits
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        line = one_line(run_cli("policy", "apply", str(v2)))
        assert "cannot apply policy v2" in line and "free disk space" in line
        assert PolicyStore().current().policy.version == 1  # the policy in force, and its journal, as they were
        filler.unlink()
        assert run_cli("policy", "apply", str(v2)).returncode == 0
        assert PolicyStore().current().policy.version == 2
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_journal_line_that_cannot_be_written_puts_the_old_policy_file_back(tmp_path, kit, monkeypatch):
    """The new file fits but its journal line does not (the disk filled in between): the old file comes back by
    rename from a hard link, so the unit never holds a policy its journal does not name."""
    import errno

    from bastion.models.trust import TrustStore

    k, nations = kit
    v1 = signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    first_apply(v1)
    before = PolicyStore().path.read_bytes()

    def full(self, event, strict=False, **fields):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(TrustStore, "record", full)
        with pytest.raises(SignatureError, match="cannot apply policy v2: .*No space left on device; the policy in"):
            PolicyStore().apply(signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    assert PolicyStore().path.read_bytes() == before and PolicyStore().current().policy.version == 1
    assert [p.name for p in PolicyStore().path.parent.iterdir() if "previous" in p.name] == []


def test_an_apply_after_a_torn_journal_line_is_recorded_on_a_line_of_its_own(tmp_path, kit):
    """Power lost mid-write leaves the journal ending in half a record: the next apply's line was glued onto it,
    skipped by every reader, and the apply said "in force" while every bundle was then refused."""
    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    journal = PolicyStore().trust.audit_path
    with journal.open("a") as fh:
        fh.write('{"event":"revoked","key_id":"abc')  # no newline: torn
    v2 = write_signed(
        tmp_path / "v2.bastion-policy", signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    )
    assert run_cli("policy", "apply", str(v2)).returncode == 0
    assert PolicyStore().current().policy.version == 2
    assert journal.read_text().splitlines()[-1].startswith('{"event":"policy_applied"')


def test_a_stalled_apply_is_a_refusal_after_a_bounded_wait_not_a_hang(tmp_path, kit, monkeypatch):
    """An apply stopped (SIGSTOP, a hung disk) between its file and its journal line holds the lock: a reader
    that finds the two disagreeing waits LOCK_WAIT_S, then refuses in one line instead of hanging."""
    import threading

    from bastion.models import policy_store
    from bastion.models.atomic import atomic_write_bytes, file_lock

    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    store = PolicyStore()
    monkeypatch.setattr(policy_store, "LOCK_WAIT_S", 0.5)
    written, release = threading.Event(), threading.Event()

    def stalled():
        with file_lock(store.trust.lock_path):
            atomic_write_bytes(
                store.path, signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]).to_bytes()
            )
            written.set()
            release.wait(20)

    holder = threading.Thread(target=stalled)
    holder.start()
    try:
        written.wait(10)
        with pytest.raises(SignatureError, match="a policy apply has held the trust store's lock for over"):
            PolicyStore().current()
    finally:
        release.set()
        holder.join(10)


def test_the_journal_never_grows_past_what_its_readers_accept(tmp_path, kit, monkeypatch):
    """An apply that would push trust/audit.jsonl past MAX_JOURNAL_BYTES is refused before writing: past it every
    reader calls the journal damaged and the unit is stuck."""
    from bastion.models import trust

    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    size = PolicyStore().trust.audit_path.stat().st_size
    monkeypatch.setattr(trust, "MAX_JOURNAL_BYTES", size + 100)  # room for less than one policy_applied line
    with pytest.raises(SignatureError, match="would grow past its .*-byte limit; the policy in force is unchanged"):
        PolicyStore().apply(signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    assert PolicyStore().trust.audit_path.stat().st_size == size and PolicyStore().current().policy.version == 1


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_that_is_no_regular_file_is_one_line_never_a_hang(tmp_path, kit, kind):
    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    lock = PolicyStore().trust.lock_path
    lock.unlink()
    os.mkfifo(lock) if kind == "fifo" else lock.mkdir()
    v2 = write_signed(
        tmp_path / "v2.bastion-policy", signed(policy(2, [k["root1"]], nations, [NATIONS_RULE]), k["root1"])
    )
    line = one_line(run_cli("policy", "apply", str(v2), timeout=60))
    assert "cannot lock the trust store" in line and str(lock) in line


def test_a_detector_says_every_signature_that_released_it_and_the_rule(tmp_path, kit):
    """Node status read only the first signer: a k-of-n model showed one nation, not the two that released it."""
    import shutil

    from bastion import Detector
    from bastion.models import zoo_path
    from bastion.models.keys import load_private_key
    from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
    from bastion.models.signing import sign_manifest

    k, nations = kit
    first_apply(signed(policy(1, [k["root1"]], nations, [NATIONS_RULE]), k["root1"]))
    root = tmp_path / "coalition-vehicles-1.0"
    shutil.copytree(zoo_path("yolov5n"), root)
    manifest = read_manifest(root / MANIFEST_NAME).model_copy(update={"name": "coalition-vehicles"})
    write_manifest(manifest, root / MANIFEST_NAME)
    sign_manifest(root, manifest, load_private_key(k["can"].private_path))
    add_countersignature(root, k["gbr"])
    detector = Detector.load(root, warmup=False)
    assert sorted(detector.verified_signers) == ["can (nation:CAN)", "gbr (nation:GBR)"]
    assert detector.verified_under.startswith("trust policy v1, rule 'coalition-*'")
