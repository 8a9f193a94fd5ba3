"""The field-node path stays light: no torch, ultralytics, transformers or tensorrt on import."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "ultralytics", "transformers", "tensorrt")
# What the base layer must not pull in: the inference and wire stacks (DESIGN.md: `bastion --version` imports no
# onnxruntime).
RUNTIME_STACK = ("onnxruntime", "cv2", "zmq", "numpy")
# `import bastion` loaded 482 modules when this was written (the eager SDK facade pulls in numpy, onnxruntime,
# OpenCV, pyzmq, pydantic and cryptography). The budget catches a new heavy import, not a slow disk.
SDK_MODULE_BUDGET = 600


def modules_after(code: str) -> set[str]:
    # conftest sets PYTHONSAFEPATH: the cwd (the repo root under `make test`) is not put on sys.path, so the
    # checkout's bastion/ folder cannot stand in for the installed package.
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_field_node_packages_import_no_heavy_library():
    loaded = modules_after(
        "import bastion, bastion.runtime, bastion.models, bastion.edge, bastion.hardware, bastion.distill"
    )
    assert not top_level(loaded) & set(HEAVY)


def test_cli_startup_and_detect_import_no_heavy_library():
    loaded = modules_after(
        "import bastion.cli, bastion.runtime.detect, bastion.runtime.stream, bastion.bench, "
        "bastion.distill.cli, bastion.distill.evaluate, bastion.distill.ultra"
    )
    assert not top_level(loaded) & set(HEAVY)


def test_import_time_is_small():
    """`python -X importtime -c "from bastion import Bundle, Client, Detector"`: what the SDK import loads, read from the interpreter's own
    import log — nothing heavy, and no more modules than the budget."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from bastion import Bundle, Client, Detector"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert rows and rows[0][-1].strip() == "imported package", proc.stderr[:500]  # the log's own header
    imported = [row[-1].strip() for row in rows[1:]]
    assert "bastion" in imported and "bastion.errors" in imported  # the log covers the import we asked about
    assert not top_level(set(imported)) & set(HEAVY)
    assert len(imported) <= SDK_MODULE_BUDGET, f"the SDK import loads {len(imported)} modules"


def test_base_layer_imports_no_runtime_stack_and_the_lazy_facade_still_serves_every_name():
    """`import bastion.errors` (the base layer) loads none of the inference or wire stacks; the SDK names resolve."""
    assert not top_level(modules_after("import bastion.errors")) & set(RUNTIME_STACK)
    import bastion

    assert set(bastion.__all__) - {"__version__"} == set(bastion._SDK)
    for name in bastion._SDK:
        assert getattr(bastion, name).__name__ == name
    with pytest.raises(AttributeError):
        bastion.NoSuchName  # noqa: B018


def test_version_imports_no_runtime_stack(tmp_path):
    """`bastion --version` loads none of the inference or wire stacks."""
    report = tmp_path / "modules.txt"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write('\\n'.join(sys.modules)))\n"
        "sys.argv = ['bastion', '--version']\n"
        "from bastion.cli import run\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bastion "), proc.stderr
    loaded = set(report.read_text().split())
    assert "bastion.cli" in loaded and not top_level(loaded) & set(RUNTIME_STACK + HEAVY)


def _modules_after_cli(tmp_path, *argv: str) -> set[str]:
    report = tmp_path / "cli-modules.txt"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write('\\n'.join(sys.modules)))\n"
        f"sys.argv = ['bastion', *{list(argv)!r}]\n"
        "from bastion.cli import run\n"
        "run()\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return set(report.read_text().split())


def test_help_and_a_node_command_do_not_import_distill_or_bench(tmp_path):
    for argv in (("--help",), ("node", "--help"), ("node", "run", "--help")):
        loaded = _modules_after_cli(tmp_path, *argv)
        assert "bastion.cli" in loaded
        assert not {m for m in loaded if m.startswith(("bastion.distill", "bastion.bench", "bastion.demo"))}, argv
    assert "bastion.edge.cli" in _modules_after_cli(tmp_path, "node", "--help")  # the mounted group did load


def test_the_help_table_says_what_each_command_says_of_itself():
    from bastion.cli import _COMMANDS, load_command

    for name, (_, line) in _COMMANDS.items():
        command = load_command(name)
        assert command.get_short_help_str(limit=1000) == line, name
        assert command.name == name


# The base of bastion/ that every card may import; everything else in bastion/ is the top layer (CLI, demo, bench,
# doctor), which imports the cards and must never be imported by them (DESIGN.md: dependency direction).
BASE_MODULES = {
    "bastion",
    "bastion.errors",
    "bastion.log",
    "bastion.console",
    "bastion.ort_telemetry",
    "bastion.sample_paths",
    "bastion.lm_limits",
}
CARDS = ("runtime", "edge", "models", "hardware", "distill")


def _bastion_imports(path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "bastion" or n.startswith("bastion.")}


def test_cards_import_only_the_base_of_the_top_package():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wrong = {}
    for card in CARDS:
        for path in sorted((repo / card).rglob("*.py")):
            top = {n for n in _bastion_imports(path) if n.split(".")[1:2] not in ([c] for c in CARDS)}
            bad = sorted(top - BASE_MODULES)
            if bad:
                wrong[str(path.relative_to(repo))] = bad
    assert not wrong, f"cards importing bastion's top layer: {wrong}"
    assert _bastion_imports(repo / "edge" / "cli.py")  # the scan sees imports inside functions too
