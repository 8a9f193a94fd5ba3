"""The smaller things a newcomer tripped over (#17 item 5), each held by a test that fails when it comes back."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

from conftest import REPO, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_client_snippet_with_no_node_running_says_so(tmp_path):
    """The README's Client snippet, pointed at a port where nothing listens: a clear NodeUnavailable, not silence."""
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(from bastion import Client\n.*?)```", readme, re.S).group(1)
    port = _free_port()
    script = tmp_path / "client.py"
    script.write_text(snippet.replace("tcp://127.0.0.1:7701", f"tcp://127.0.0.1:{port}"))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )
    took = time.monotonic() - started
    assert proc.returncode != 0 and took < 40, (took, proc.stderr[-500:])
    last = proc.stderr.strip().splitlines()[-1]
    assert "NodeUnavailable" in last and f"127.0.0.1:{port}" in last and "is the node running" in last
    assert re.search(r"in (\d+) s \(3 tries of 5 s\)", last), last  # says how long it really waited
    assert proc.stderr.count("trying again") == 2  # and says so while it waits


def test_hw_profiles_never_cuts_the_names_you_must_type():
    from bastion.hardware.profiles import profile_names

    for columns in ("80", "60"):
        proc = run_cli("hw", "profiles", env={"COLUMNS": columns})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert all(len(line) <= int(columns) for line in lines)
        first_cells = {line.split("│")[0].strip() for line in lines if "│" in line}
        assert set(profile_names()) <= first_cells, (columns, proc.stdout)


def test_models_path_finds_what_models_list_shows():
    listed = json.loads(run_cli("models", "list", "--json").stdout)["models"]
    for row in listed:
        proc = run_cli("models", "path", row["name"])
        assert proc.returncode == 0 and proc.stdout.strip() == row["path"], (row, proc.stderr)
        assert run_cli("models", "path", f"{row['name']}:{row['version']}").stdout.strip() == row["path"]
    missing = run_cli("models", "path", "yolov5n:0.0-none")
    assert missing.returncode == 1 and "models list" in missing.stderr and "Traceback" not in missing.stderr


def test_doctor_shows_bracketed_text_and_creates_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "nothing-yet" / "bastion"
    proc = run_cli("doctor", env={"BASTION_HOME": str(state), "HOME": str(home), "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(the  extra" not in proc.stdout
    from bastion.runtime.backends import tensorrt_available

    if not tensorrt_available():
        assert "[tensorrt] extra" in proc.stdout
    assert "does not exist yet" in proc.stdout
    assert not state.parent.exists()  # not even the folder above it
    env = {k: v for k, v in os.environ.items() if k not in ("BASTION_HOME", "XDG_DATA_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO / "tests"))
    proc = subprocess.run(
        [sys.executable, "-c", "from bastion.cli import run; run()", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert json.loads(proc.stdout)["ok"], proc.stdout + proc.stderr
    made = [p.relative_to(home) for p in home.rglob("*")]
    assert not [p for p in made if p.parts[:1] != (".cache",)], made  # (.cache: onnxruntime's own, on import)
    assert not (home / ".local").exists()


def test_node_keygen_says_which_key_file_is_public(tmp_path):
    proc = run_cli("node", "keygen", "--out", str(tmp_path), "--name", "node")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "PUBLIC certificate .key" in text and "keep it" in text
    assert (tmp_path / "node.key").is_file() and (tmp_path / "node.key_secret").stat().st_mode & 0o077 == 0


def test_node_init_config_shows_how_to_add_a_language_model(tmp_path):
    proc = run_cli("node", "init", "--out", str(tmp_path / "node.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^# lm: stories260K", (tmp_path / "node.yaml").read_text(), re.M)


def test_readme_has_no_stale_tensorrt_text():
    assert "not in yet" not in (REPO / "README.md").read_text()
