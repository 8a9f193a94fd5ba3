"""The model-team and operator flows through the CLI: keys → create → sign → verify → add → detect."""

import json

from bastion.models import zoo_path
from conftest import PERSON_IMAGE, run_cli

ONNX = zoo_path("yolov5n") / "yolov5n-dynamic.onnx"
LICENSE = zoo_path("yolov5n") / "LICENSE"


def ok(proc):
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


def test_full_operator_flow(tmp_path):
    keys = tmp_path / "keys"
    # made elsewhere: this unit does not trust the key until told to
    gen = json.loads(ok(run_cli("keys", "generate", "--out", str(keys / "team"), "--no-trust", "--json")).stdout)
    bundle = tmp_path / "bundles" / "people"
    created = json.loads(
        ok(
            run_cli(
                "bundle",
                "create",
                "--onnx",
                str(ONNX),
                "--name",
                "people",
                "--version",
                "1.0",
                "--weights-license",
                "GPL-3.0",
                "--source",
                "yolov5n teacher",
                "--license-file",
                str(LICENSE),
                "--sign",
                gen["private"],
                "--out",
                str(bundle),
                "--json",
            )
        ).stdout
    )
    assert created["signed"] and created["manifest"]["decoder"]["type"] == "yolov5"  # inferred from the ONNX
    assert created["manifest"]["provenance"]["command"].startswith("bastion bundle create")
    # signed by a key this unit does not trust yet
    refused = run_cli("detect", str(PERSON_IMAGE), "--model", str(bundle))
    assert refused.returncode == 1 and "does not trust" in refused.stderr and "bastion keys trust" in refused.stderr
    ok(run_cli("keys", "trust", gen["public"]))
    listed = json.loads(ok(run_cli("keys", "list", "--json")).stdout)["keys"]
    assert {k["source"] for k in listed} == {"built-in", "local"}
    verified = json.loads(ok(run_cli("bundle", "verify", str(bundle), "--json")).stdout)
    assert verified["key_id"] == gen["key_id"]
    archive = tmp_path / "usb"
    ok(run_cli("bundle", "pack", str(bundle), "--out", str(archive)))
    added = json.loads(ok(run_cli("models", "add", str(archive / "people-1.0.bastion"), "--json")).stdout)
    assert added["sha256"] == created["sha256"]
    assert ok(run_cli("models", "path", "people:1.0")).stdout.strip() == added["path"]
    det = ok(run_cli("detect", str(PERSON_IMAGE), "--model", "people", "--json"))
    assert json.loads(det.stdout)["model"] == created["sha256"]
    inspected = json.loads(ok(run_cli("bundle", "inspect", "people", "--json")).stdout)
    assert inspected["verified"] and inspected["signer_key_id"] == gen["key_id"]
    assert inspected["manifest"]["license"]["weights"] == "GPL-3.0"
    ok(run_cli("keys", "revoke", gen["key_id"]))
    assert "revoked" in run_cli("detect", str(PERSON_IMAGE), "--model", "people").stderr
    ok(run_cli("models", "remove", "people"))
    assert "people" not in ok(run_cli("models", "list")).stdout


def test_inspect_zoo_shows_verified_signature_and_provenance():
    proc = ok(run_cli("bundle", "inspect", "yolov5n"))
    text = " ".join(proc.stdout.split())
    assert "signature OK" in text and "built-in" in text and "GPL-3.0" in text and "ultralytics/yolov5" in text


def test_bundle_create_refuses_bad_metadata(tmp_path):
    base = ["bundle", "create", "--onnx", str(ONNX), "--out"]
    proc = run_cli(*base, str(tmp_path / "a"))
    assert proc.returncode == 1 and "license of the weights is required" in proc.stderr
    proc = run_cli(*base, str(tmp_path / "b"), "--weights-license", "MIT", "--decoder", "yolox")
    assert proc.returncode == 1 and "yolox" in proc.stderr and not (tmp_path / "b").exists()
    proc = run_cli(*base, str(tmp_path / "c"), "--weights-license", "MIT", "--classes", "a,b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not (tmp_path / "c").exists()
    meta = tmp_path / "bundle.yaml"
    meta.write_text("input: [not, a, mapping\n")
    proc = run_cli(*base, str(tmp_path / "d"), "--weights-license", "MIT", "--meta", str(meta))
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr
    assert not list(tmp_path.glob(".*"))  # no staging directories left behind


def test_key_errors_are_one_line(tmp_path):
    gen = json.loads(
        ok(
            run_cli("keys", "generate", "--out", str(tmp_path / "k"), "--json"),
        ).stdout
    )
    again = run_cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "already exists" in again.stderr
    enc = json.loads(
        ok(
            run_cli(
                "keys", "generate", "--out", str(tmp_path / "e"), "--json", env={"BASTION_KEY_PASSPHRASE": "s3cret"}
            )
        ).stdout
    )
    bundle = tmp_path / "copy"
    import shutil

    shutil.copytree(zoo_path("yolox_nano"), bundle)
    wrong = run_cli("bundle", "sign", str(bundle), "--key", enc["private"], env={"BASTION_KEY_PASSPHRASE": "nope"})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    import os

    os.chmod(gen["private"], 0o640)
    loose = run_cli("bundle", "sign", str(bundle), "--key", gen["private"])
    assert loose.returncode == 1 and "chmod 600" in " ".join(loose.stderr.split())
    assert run_cli("keys", "revoke", "ffffffffff").returncode == 1


def test_doctor_reports_readiness_and_fails_without_trust():
    report = json.loads(ok(run_cli("doctor", "--json")).stdout)
    names = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] and names["trust store"] == "ok" and names["vendored models"] == "ok"
    anchor = json.loads(run_cli("keys", "list", "--json").stdout)["keys"][0]["key_id"]
    ok(run_cli("keys", "revoke", anchor))
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert {c["name"]: c["status"] for c in report["checks"]}["trust store"] == "fail"


# -- the README's maker flow, as a newcomer types it (#17) -------------------------------------------------------
def _run_on_a_terminal(argv: list[str], answer: str, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its controlling terminal; type ``answer`` at every prompt."""
    import os
    import pty
    import re
    import select
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr are the terminal
        os.execve(sys.executable, [sys.executable, *argv], env)
    seen, typed, deadline = b"", 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        while typed < len(re.findall(rb"passphrase[^\n]*: |again: ", seen)):
            os.write(fd, answer.encode() + b"\n")
            typed += 1
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def _cli_argv(*args: str) -> list[str]:
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
    )
    return ["-c", code, *args]


def test_an_encrypted_key_is_asked_for_on_a_terminal_and_named_without_one(tmp_path):
    import os

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "COLUMNS": "200"}
    env.pop("BASTION_KEY_PASSPHRASE", None)
    # keys generate --passphrase: asked twice on a terminal; without one, one line and no key files
    proc = run_cli("keys", "generate", "--out", str(tmp_path / "team"), "--passphrase")
    assert proc.returncode == 1 and "BASTION_KEY_PASSPHRASE" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("team*"))
    rc, screen = _run_on_a_terminal(
        _cli_argv("keys", "generate", "--out", str(tmp_path / "team"), "--passphrase"), "s3cret", env
    )
    assert rc == 0 and "s3cret" not in screen, screen
    assert b"ENCRYPTED" in (tmp_path / "team.key").read_bytes()
    create = [
        "bundle",
        "create",
        "--onnx",
        str(ONNX),
        "--weights-license",
        "GPL-3.0",
        "--sign",
        str(tmp_path / "team.key"),
    ]
    # no terminal, no BASTION_KEY_PASSPHRASE: one line that names the way out
    proc = run_cli(*create, "--out", str(tmp_path / "a"))
    assert proc.returncode == 1 and "BASTION_KEY_PASSPHRASE" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    # on a terminal the passphrase is asked for (hidden), exactly as `keys generate --passphrase` set it
    rc, screen = _run_on_a_terminal(_cli_argv(*create, "--out", str(tmp_path / "b")), "s3cret", env)
    assert rc == 0 and "signed" in screen and "s3cret" not in screen, screen
    rc, screen = _run_on_a_terminal(_cli_argv(*create, "--out", str(tmp_path / "c")), "wrong", env)
    assert rc == 1 and "wrong passphrase" in screen and not (tmp_path / "c").exists(), screen


def test_a_bundle_is_named_after_its_out_folder_and_its_maker_can_pack_it(tmp_path, bastion_home):
    gen = json.loads(ok(run_cli("keys", "generate", "--out", str(tmp_path / "team"), "--json")).stdout)
    assert gen["trusted_here"]
    journal = [json.loads(line) for line in (bastion_home / "trust" / "audit.jsonl").read_text().splitlines()]
    assert {"event": "trusted", "key_id": gen["key_id"]}.items() <= journal[-1].items()
    base = ["bundle", "create", "--onnx", str(ONNX), "--weights-license", "GPL-3.0", "--sign", gen["private"], "--json"]
    made = json.loads(ok(run_cli(*base, "--out", str(tmp_path / "bundles" / "pv-2.1"))).stdout)["manifest"]
    assert (made["name"], made["version"]) == ("pv", "2.1")
    plain = json.loads(ok(run_cli(*base, "--out", str(tmp_path / "people"))).stdout)["manifest"]
    assert (plain["name"], plain["version"]) == ("people", "1.0")
    named = json.loads(ok(run_cli(*base, "--out", str(tmp_path / "x-3.0"), "--name", "cars", "--version", "4")).stdout)[
        "manifest"
    ]
    assert (named["name"], named["version"]) == ("cars", "4")
    # the maker trusts the key it made (recorded), so pack, add, inspect and --model NAME:VERSION all work here
    usb = tmp_path / "usb"
    ok(run_cli("bundle", "pack", str(tmp_path / "bundles" / "pv-2.1"), "--out", f"{usb}/"))
    assert (usb / "pv-2.1.bastion").is_file()
    ok(run_cli("models", "add", str(usb / "pv-2.1.bastion")))
    inspected = json.loads(ok(run_cli("bundle", "inspect", "pv", "--json")).stdout)
    assert inspected["verified"] and inspected["signer_key_id"] == gen["key_id"]
    ok(run_cli("detect", str(PERSON_IMAGE), "--model", "pv:2.1", "--json"))
    trusted = json.loads(ok(run_cli("keys", "list", "--json")).stdout)["keys"]
    assert any(k["key_id"] == gen["key_id"] and k["source"] == "local" for k in trusted)


def test_keys_generate_no_trust_leaves_the_trust_store_alone(tmp_path):
    gen = json.loads(ok(run_cli("keys", "generate", "--out", str(tmp_path / "k"), "--no-trust", "--json")).stdout)
    assert not gen["trusted_here"]
    keys = json.loads(ok(run_cli("keys", "list", "--json")).stdout)["keys"]
    assert gen["key_id"] not in {k["key_id"] for k in keys}


def test_an_onnx_without_metadata_takes_its_size_from_its_input_or_imgsz(tmp_path):
    from test_readme import make_best_onnx

    flags = ["--classes", "person,vehicle", "--decoder", "yolov8", "--weights-license", "MIT", "--json"]
    fixed = make_best_onnx(tmp_path / "fixed.onnx", metadata=False)
    made = json.loads(
        ok(run_cli("bundle", "create", "--onnx", str(fixed), *flags, "--out", str(tmp_path / "a"))).stdout
    )["manifest"]
    assert made["input"]["size"] == [320, 320] and made["decoder"]["type"] == "yolov8"
    dynamic = make_best_onnx(tmp_path / "dynamic.onnx", metadata=False, dynamic=True)
    asked = run_cli("bundle", "create", "--onnx", str(dynamic), *flags, "--out", str(tmp_path / "b"))
    assert asked.returncode == 1 and "--imgsz" in asked.stderr and not (tmp_path / "b").exists()
    made = json.loads(
        ok(
            run_cli("bundle", "create", "--onnx", str(dynamic), *flags, "--imgsz", "320", "--out", str(tmp_path / "c"))
        ).stdout
    )["manifest"]
    assert made["input"]["size"] == [320, 320] and made["input"]["dynamic_hw"]
    bad = run_cli("bundle", "create", "--onnx", str(dynamic), *flags, "--imgsz", "big", "--out", str(tmp_path / "d"))
    assert bad.returncode == 1 and "not a size" in bad.stderr
