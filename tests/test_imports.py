"""The field-node path stays light: no torch, ultralytics, transformers or tensorrt on import."""

import subprocess
import sys

HEAVY = ("torch", "torchvision", "ultralytics", "transformers", "tensorrt")


def modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_field_node_packages_import_no_heavy_library():
    loaded = modules_after(
        "import bastion, bastion.runtime, bastion.models, bastion.edge, bastion.hardware, bastion.distill"
    )
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_cli_startup_and_detect_import_no_heavy_library():
    loaded = modules_after(
        "import bastion.cli, bastion.runtime.detect, bastion.runtime.stream, bastion.bench, "
        "bastion.distill.cli, bastion.distill.evaluate, bastion.distill.ultra"
    )
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_import_time_is_small():
    """`python -X importtime` of the SDK: nothing heavy, and a sanity bound on the module count."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bastion"], capture_output=True,
                          text=True, check=True)
    names = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not names & set(HEAVY)
