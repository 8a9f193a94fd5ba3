"""The package as users install it: every subpackage listed, a lock that covers pyproject, a real wheel in a fresh
venv (the tests themselves run against it), and the offline wheelhouse of a field node."""

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bastion.doctor import checkout_locks, read_lock, version_drift
from conftest import REPO, run_cli

MAPPED = {
    "bastion": "bastion",
    "bastion.runtime": "runtime",
    "bastion.models": "models",
    "bastion.distill": "distill",
    "bastion.edge": "edge",
    "bastion.hardware": "hardware",
}
# The extra sets the Makefile installs, by lock file (requirements/, made by `make lock`).
LOCKS = {"core.txt": (), "demo.txt": ("quantize", "distill"), "dev.txt": ("dev", "distill")}
# Run against the installed wheel by test_tests_pass_against_the_installed_wheel: quick, and touching every card.
SMOKE = [
    "tests/test_packaging.py",
    "tests/test_imports.py",
    "tests/test_signing.py",
    "tests/test_nms.py",
    "tests/test_cli.py::test_detect_image_summary_and_json",
    "tests/test_node.py::test_events_are_stored_then_published_in_seq_order",
]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_in_pyproject():
    config = pyproject()["tool"]["setuptools"]
    assert config["package-dir"] == MAPPED
    listed = set(config["packages"])
    found = set()
    for package, folder in MAPPED.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_the_package_under_test_is_the_installed_one():
    """However bastion was installed, the tests import that, never the checkout's bastion/ folder in its place."""
    import bastion
    import bastion.edge

    dist = importlib.metadata.distribution("bastion")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        assert Path(bastion.edge.__file__).resolve() == REPO / "edge" / "__init__.py"
    else:
        site = Path(dist.locate_file("")).resolve()
        for module in (bastion, bastion.edge):
            assert Path(module.__file__).resolve().is_relative_to(site), (module.__file__, site)


def test_locks_cover_pyproject_and_agree():
    """Each lock pins, with hashes, every requirement of its extras at a version pyproject allows; a dependency
    added to pyproject without `make lock` fails here, not on a fresh machine."""
    project = pyproject()["project"]
    pins_by_lock = {}
    for name, extras in LOCKS.items():
        text = (REPO / "requirements" / name).read_text()
        pins = read_lock(REPO / "requirements" / name)
        pins_by_lock[name] = pins
        assert pins and text.count("--hash=sha256:") >= len(pins), name
        wanted = [Requirement(r) for r in project["dependencies"]]
        wanted += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
        wanted += [Requirement(r) for r in pyproject()["build-system"]["requires"]]
        for req in wanted:
            key = canonicalize_name(req.name)
            assert key in pins, f"{req} is not in requirements/{name}: run make lock"
            assert req.specifier.contains(pins[key], prereleases=True), f"{name}: {key}=={pins[key]} vs {req}"
    for name, pins in pins_by_lock.items():
        shared = set(pins) & set(pins_by_lock["dev.txt"])
        assert {k: pins[k] for k in shared} == {k: pins_by_lock["dev.txt"][k] for k in shared}, name


def test_doctor_reports_versions_that_differ_from_the_lock(tmp_path):
    numpy_version = importlib.metadata.version("numpy")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"numpy=={numpy_version} \\\n    --hash=sha256:00\n    # via bastion\nnot-installed-here==1.0\n")
    assert version_drift([lock]) == []  # what is not installed is not drift: another extra set
    lock.write_text("numpy==0.0.1 \\\n    --hash=sha256:00\nsetuptools==0.0.1\n")
    assert version_drift([lock]) == [f"numpy {numpy_version} (lock: 0.0.1)"]  # build tools are not compared
    proc = run_cli("doctor", "--json", "--lock", str(lock))
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["installed versions"]["status"] == "warn"
    assert f"numpy {numpy_version} (lock: 0.0.1)" in checks["installed versions"]["detail"]
    proc = run_cli("doctor", "--lock", str(tmp_path / "missing.txt"))
    assert proc.returncode == 1 and "lock file not found" in proc.stderr and "Traceback" not in proc.stderr
    # Without --lock: a checkout (editable install, `make install-dev`) compares with its own requirements/ and
    # matches it; an installed wheel says it has no lock to compare with.
    checks = {c["name"]: c for c in json.loads(run_cli("doctor", "--json").stdout)["checks"]}
    status, detail = checks["installed versions"]["status"], checks["installed versions"]["detail"]
    if checkout_locks():
        assert status == "ok" and "match" in detail, detail
    else:
        assert status == "warn" and "no lock" in detail, detail


def _build_wheel(out: Path) -> Path:
    # No build isolation: the locked setuptools of this environment builds it, nothing is fetched.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return next(out.glob("bastion-*.whl"))


def _fresh_venv_reusing_this_ones_packages(env_dir: Path, wheel: Path) -> Path:
    """A new venv holding only the bastion wheel (installed, not editable, with the index off); its dependencies
    come from this environment's site-packages through a .pth line, so nothing is downloaded."""
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "reuse-test-env.pth").write_text("\n".join(sorted(ours)) + "\n")
    return py


@pytest.mark.wheel
def test_tests_pass_against_the_installed_wheel(tmp_path):
    """The wheel, installed non-editably, passes a smoke subset of this suite run from the repo root with
    `python -m pytest`: the layout in which the checkout's bastion/ folder used to shadow it."""
    py = _fresh_venv_reusing_this_ones_packages(tmp_path / "venv", _build_wheel(tmp_path / "dist"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not wheel", *SMOKE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " error" not in proc.stdout, proc.stdout[-2000:]
    where = subprocess.run(
        [str(py), "-c", "import bastion.edge; print(bastion.edge.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(tmp_path / "venv")), where
    # the demo's hand-labelled held-out frames ship with the wheel (else a wheel install falls back to pseudo-labels)
    installed = Path(where.strip()).parents[1] / "samples" / "groundtruth"
    for part in ("images", "labels"):
        shipped = sorted(p.name for p in (installed / part).iterdir()) if (installed / part).is_dir() else []
        assert shipped == sorted(p.name for p in (REPO / "bastion/samples/groundtruth" / part).iterdir()), part
    proc = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "bastion"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and "detect" in proc.stdout


@pytest.mark.slow
@pytest.mark.wheel
def test_wheelhouse_installs_a_field_node_with_the_index_off(tmp_path):
    """`make wheelhouse`: the core set (no torch) as wheels, installed into an empty venv by its one-line command
    with no index; then the CLI answers and a vendored model detects."""
    house = tmp_path / "wheelhouse"
    subprocess.run(
        ["make", "-s", "-C", str(REPO), "wheelhouse", f"WHEELHOUSE={house}", f"VENV={sys.prefix}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wheels = {p.name.split("-")[0].lower() for p in house.glob("*.whl")}
    assert {"bastion", "numpy", "onnxruntime", "opencv_python_headless", "pyzmq"} <= wheels
    assert not wheels & {"torch", "ultralytics_opencv_headless", "transformers"}  # a field node carries no trainer
    line = (house / "INSTALL").read_text().strip()
    assert line == "pip install --no-index --find-links wheelhouse bastion"
    env_dir = tmp_path / "node"
    venv.create(env_dir, with_pip=True)
    command = [str(env_dir / "bin" / "python"), "-m", *line.split()]  # run from the folder that holds wheelhouse/
    # This machine's pip settings (mirrors, find-links) are dropped too: only the wheelhouse may be read.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bastion = env_dir / "bin" / "bastion"
    proc = subprocess.run([str(bastion), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("bastion "), proc.stderr
    code = (
        "import bastion.edge, bastion.runtime; from bastion import Detector;"
        "d = Detector.load('yolov5n', threads=1); print(len(d.names), bastion.edge.__file__)"
    )
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    count, where = proc.stdout.split()
    assert count == "80" and where.startswith(str(env_dir))
    proc = subprocess.run(
        [str(bastion), "doctor", "--json", "--lock", str(house / "requirements.txt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["installed versions"]["status"] == "ok", checks["installed versions"]
