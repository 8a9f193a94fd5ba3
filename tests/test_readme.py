"""Every fenced ``bash``/``python`` block of README.md and docs/*.md, run as typed, in order, in a temp HOME and
BASTION_HOME: one test per document, each in its own scratch folder (so xdist spreads them over its workers).

So the README cannot drift again: a newcomer types exactly these lines.  Instructions for this test sit in HTML
comments right above a fence (invisible on GitHub), one per line:

    <!-- readme-test: skip (reason) -->            not run; the reason is required (keep these rare)
    <!-- readme-test: substitute OLD => NEW -->    a placeholder the text names as one; NEW may use {tmp} {repo}
                                                   {shared} {best_onnx}
    <!-- readme-test: env NAME=VALUE -->           what a person would type at a prompt (no terminal here)
    <!-- readme-test: background -->               keeps running (the README's node) until the last ``node`` block
    <!-- readme-test: node -->                     talks to the README's node (see below)
    <!-- readme-test: retry SECONDS -->            run again until it passes (it waits for a background block)
    <!-- readme-test: stop-after SECONDS -->       runs until stopped: must print something, then is stopped
    <!-- readme-test: needs shared -->             skipped without ../shared (CI has it)

The README's node runs inference on a looping video for as long as it lives, a core's worth of work, so it lives
only as long as something talks to it: ``node`` blocks of other documents run in README.md's test, right after the
README's own last ``node`` block, and then the node is stopped before the README's remaining blocks run.

Blocks run in a scratch folder holding a link to the checkout's ``bastion/`` (so ``bastion/samples/…`` resolves as
from the checkout root), with the zero-egress guard installed in every Python process they start.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, SHARED

README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
RUNNABLE = {"bash", "python"}
MAX_SKIPS = 3  # make demo/test themselves, distillation on your own data with torch, the wheelhouse install
HARDWARE_SKIP = re.compile(r"\((on a Jetson|needs an NVIDIA GPU)\b")  # like pytest -m gpu: not counted above
SITECUSTOMIZE = "import egress_guard\negress_guard.install()\n"


@dataclass
class Block:
    lang: str
    code: str
    line: int
    markers: list[str] = field(default_factory=list)
    doc: str = "README.md"

    def marker(self, kind: str) -> list[str]:
        return [m[len(kind) :].strip() for m in self.markers if m == kind or m.startswith(kind + " ")]

    @property
    def skip_reason(self) -> str | None:
        found = self.marker("skip")
        return found[0] if found else None


def readme_blocks(text: str, doc: str = "README.md") -> list[Block]:
    """The fenced blocks in order, each with the markers right above it (blank lines between are fine)."""
    blocks: list[Block] = []
    markers: list[str] = []
    fence: tuple[str, int, list[str]] | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                lang, start, above = fence
                if lang in RUNNABLE:
                    blocks.append(Block(lang, "\n".join(body) + "\n", start, above, doc))
                fence = None
            else:
                body.append(line)
            continue
        marker, opening = MARKER.match(line), FENCE.match(line)
        if marker:
            markers.append(marker.group(1))
        elif opening:
            fence, markers, body = (opening.group(1), number, markers), [], []
        elif line.strip():
            markers = []
    return blocks


@functools.cache  # read once: every document's test plans from all of them
def all_blocks() -> tuple[Block, ...]:
    return tuple(b for doc in DOCUMENTS for b in readme_blocks(doc.read_text(), str(doc.relative_to(REPO))))


def plan(doc: str) -> list[Block]:
    """The blocks ``doc``'s test runs, in order (skipped ones included): README.md's take in the other documents'
    ``node`` blocks right after its own last one; another document leaves its ``node`` blocks to README.md."""
    blocks = all_blocks()
    own = [b for b in blocks if b.doc == doc]
    if doc != "README.md":
        return [b for b in own if not b.marker("node")]
    borrowed = [b for b in blocks if b.doc != doc and b.marker("node")]
    last = max((i for i, b in enumerate(own) if b.marker("node")), default=len(own) - 1)
    return own[: last + 1] + borrowed + own[last + 1 :]


def runnable(block: Block) -> bool:
    return block.skip_reason is None and not (block.marker("needs shared") and not (SHARED / "data").is_dir())


RUN_DOCUMENTS = [
    str(doc.relative_to(REPO)) for doc in DOCUMENTS if any(runnable(b) for b in plan(str(doc.relative_to(REPO))))
]


def test_every_block_is_run_or_skipped_for_a_stated_reason():
    blocks = all_blocks()
    assert len([b for b in blocks if b.doc == "README.md"]) >= 8, "the README's examples were not found"
    skipped = [b for b in blocks if b.skip_reason is not None]
    for b in skipped:
        assert re.fullmatch(r"\(.{10,}\)", b.skip_reason), f"{b.doc}:{b.line}: a skip needs a (reason)"
    counted = [f"{b.doc}:{b.line}" for b in skipped if not HARDWARE_SKIP.match(b.skip_reason)]
    assert len(counted) <= MAX_SKIPS, counted
    known = ("skip", "substitute", "env", "background", "node", "retry", "stop-after", "needs shared")
    for b in blocks:
        for m in b.markers:
            assert m.startswith(known), f"{b.doc}:{b.line}: unknown readme-test marker {m!r}"
        for sub in b.marker("substitute"):
            old = sub.split(" => ")[0]
            assert old in b.code, f"{b.doc}:{b.line}: {old!r} is not in the block"
    readme = [b for b in blocks if b.doc == "README.md"]
    background = [i for i, b in enumerate(readme) if b.marker("background")]
    assert len(background) == 1, "the README starts one node in the background"
    for b in blocks:
        if b.marker("background"):
            assert b.doc == "README.md", f"{b.doc}:{b.line}: only the README starts a node (docs borrow it: node)"
        if b.marker("node"):
            assert b.doc != "README.md" or readme.index(b) > background[0], f"{b.doc}:{b.line}: before the node"


def make_best_onnx(path: Path, metadata: bool = True, dynamic: bool = False) -> Path:
    """What an Ultralytics export of a 2-class detector looks like to bastion: [1,3,320,320] in, [1,6,2100] out,
    names/imgsz/stride/task in the metadata.  It finds nothing (a constant output), which the flow does not mind.
    Without ``metadata`` it is any YOLOv8-layout ONNX; ``dynamic`` makes its input [1,3,H,W]."""
    import numpy as np

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "H", "W"] if dynamic else [1, 3, 320, 320])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 2100])
    inits = [
        numpy_helper.from_array(np.zeros((1, 6, 2100), np.float32), "bias"),
        numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=1),
        helper.make_node("Mul", ["m", "zero"], ["mz"]),
        helper.make_node("Reshape", ["mz", "shape"], ["mr"]),
        helper.make_node("Add", ["mr", "bias"], ["output0"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "best", [x], [y], initializer=inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    for key, value in (
        {"names": "{0: 'person', 1: 'vehicle'}", "imgsz": "[320, 320]", "stride": "32", "task": "detect"}.items()
        if metadata
        else ()
    ):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Runner:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.work = tmp / "work"
        self.work.mkdir()
        (self.work / "bastion").symlink_to(REPO / "bastion", target_is_directory=True)
        site = tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        home = tmp / "home"
        home.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(home),
            "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "tests")]),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "COLUMNS": "100",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("BASTION_KEY_PASSPHRASE", None)
        self.values = {
            "tmp": str(tmp),
            "repo": str(REPO),
            "shared": str(SHARED),
            "best_onnx": str(make_best_onnx(tmp / "best.onnx")),
        }
        self.background: list[subprocess.Popen] = []

    def script(self, block: Block) -> tuple[list[str], dict[str, str]]:
        code = block.code
        for sub in block.marker("substitute"):
            old, new = sub.split(" => ", 1)
            code = code.replace(old, new.format(**self.values))
        env = dict(self.env)
        for assignment in block.marker("env"):
            name, value = assignment.split("=", 1)
            env[name] = value
        if block.lang == "python":
            path = self.tmp / f"block-{block.doc.replace('/', '-')}-{block.line}.py"
            path.write_text(code)
            return [sys.executable, str(path)], env
        return ["bash", "-euo", "pipefail", "-c", code], env

    def run(self, block: Block) -> str | None:
        """None when the block did what the README says, else what went wrong."""
        argv, env = self.script(block)
        where = f"{block.doc}:{block.line}"
        if block.marker("background"):
            with open(
                self.tmp / f"block-{block.doc.replace('/', '-')}-{block.line}.log", "w"
            ) as log:  # the child keeps its own descriptor
                self.background.append(
                    subprocess.Popen(
                        argv, env=env, cwd=self.work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            return None
        stop_after = block.marker("stop-after")
        if stop_after:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self.work,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                out, err = proc.communicate(timeout=float(stop_after[0]))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                out, err = proc.communicate(timeout=30)
                return None if out.strip() else f"{where}: printed nothing in {stop_after[0]} s\n{err[-2000:]}"
            return f"{where}: ended by itself (rc {proc.returncode}) instead of running on\n{out[-1000:]}{err[-2000:]}"
        deadline = time.monotonic() + float((block.marker("retry") or ["0"])[0])
        while True:
            proc = subprocess.run(argv, env=env, cwd=self.work, capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                return None
            if time.monotonic() > deadline:
                return f"{where}: exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"
            time.sleep(1)

    def stop(self) -> list[str]:
        """Stop the background blocks (each must still be running); what went wrong, if anything."""
        problems = []
        background, self.background = self.background, []
        for proc in background:
            if proc.poll() is not None:
                problems.append(f"a background block ended early (rc {proc.returncode}): see {self.tmp}")
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                problems.append("a background block did not stop on SIGTERM within 30 s")
        return problems


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCUMENTS)
def test_every_readme_and_docs_block_runs_as_typed(doc, tmp_path):
    blocks = [b for b in plan(doc) if runnable(b)]
    if any(b.marker("background") for b in blocks) and (_port_busy(7700) or _port_busy(7701)):
        pytest.skip("ports 7700/7701 are in use (the README's node uses them)")
    last_node = max((i for i, b in enumerate(blocks) if b.marker("node") or b.marker("background")), default=-1)
    runner = Runner(tmp_path)
    failures: list[str] = []
    try:
        for i, block in enumerate(blocks):
            problem = runner.run(block)
            if problem:
                failures.append(problem)
            if i == last_node:  # nothing after this talks to the node: free its core for the rest
                failures += runner.stop()
    finally:
        failures += runner.stop()
    assert not failures, "\n\n".join(failures)
