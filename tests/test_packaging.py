"""The package as users install it: every subpackage listed, and a real wheel in a fresh venv."""

import subprocess
import sys
import venv

import pytest

from conftest import REPO

MAPPED = {"bastion": "bastion", "bastion.runtime": "runtime", "bastion.models": "models",
          "bastion.distill": "distill", "bastion.edge": "edge", "bastion.hardware": "hardware"}


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == MAPPED
    listed = set(config["packages"])
    found = set()
    for package, folder in MAPPED.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


@pytest.mark.slow
@pytest.mark.wheel
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)], check=True,
                   capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("bastion-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=900)
    code = ("import bastion.runtime, bastion.models, bastion.edge, bastion.hardware, bastion.distill, sys;"
            "from bastion import Detector; from bastion.models import zoo_names;"
            "assert {'yolov5n', 'yolox_nano'} <= set(zoo_names()), zoo_names();"
            "assert 'site-packages' in bastion.runtime.__file__, bastion.runtime.__file__;"
            "d = Detector.load('yolov5n', threads=1);"
            "from bastion.demo import DEFAULT_VIDEO; assert DEFAULT_VIDEO.is_file();"
            "print(len(d.names))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "80", proc.stderr
    proc = subprocess.run([str(env_dir / "bin" / "bastion"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "detect" in proc.stdout
