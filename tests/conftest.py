"""Shared fixtures: paths to vendored and shared data, and the zero-egress guard around every test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from egress_guard import is_local  # tests/ is on sys.path: pyproject's [tool.pytest.ini_options] pythonpath

REPO = Path(__file__).resolve().parents[1]

# The package under test is the installed one, however it was installed. `python -m pytest` puts the working
# directory first on sys.path, and from the repo root the checkout's bastion/ folder would then shadow the
# installed package: a non-editable install loses bastion.edge & co, which live in other folders. So the checkout
# leaves sys.path here (an editable install finds it through its own import hook), and every Python subprocess a
# test starts runs with PYTHONSAFEPATH (no cwd or script folder on its path either).
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
os.environ["PYTHONSAFEPATH"] = "1"
# Under xdist the suite runs one worker per core and one more (Makefile): a worker's ONNX Runtime sessions and torch
# each starting a thread per core (ORT's spin on idle) would oversubscribe the cores several times over (measured:
# a tiny LM distillation test took 65 s beside the README test, 12 s with one thread). One thread each, in the
# worker and every process it starts; set any of these variables to override. Nothing in the suite measures speed
# (benchmarks are `bastion bench`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("BASTION_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
SAMPLES = REPO / "bastion" / "samples"
SAMPLE_IMAGES = SAMPLES / "images"
PERSON_IMAGE = SAMPLE_IMAGES / "one-by-one-person-detection-0100.jpg"
# Drawn by hand on the image above (one person standing at a table).
PERSON_BOX = (383.0, 12.0, 514.0, 392.0)
SHARED = Path(os.environ.get("BASTION_SHARED", REPO.parent / "shared"))


# Left out of `make test-fast` (-m "not slow"; `make test` runs them all): the slowest tests of a measured whole-suite
# run, one node id a line, written by scripts/slow_tests.py so that test-fast fits its two minutes.
SLOW_LIST = Path(__file__).with_name("slow_tests.txt")


def _measured(line: str) -> tuple[str, float]:
    """``node id  # 12.3 s`` -> (node id, 12.3); a line without a time counts as 0."""
    node, _, comment = line.partition("#")
    try:
        return node.strip(), float(comment.split()[0])
    except (IndexError, ValueError):
        return node.strip(), 0.0


SLOW_BY_MEASURE = dict(_measured(line) for line in SLOW_LIST.read_text().splitlines() if line.split("#", 1)[0].strip())


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the measured slow tests, and order the run so that xdist's workers finish together.

    ``make test`` uses xdist's ``worksteal`` scheduler: it hands each worker one contiguous share of the collection,
    and a worker that runs dry takes the back half of the longest queue. So the tests are sorted longest first and
    dealt round-robin into one share per worker: each worker starts on its own minute-long end-to-end tests, and
    what moves between workers at the end is the short ones. (Under ``load``, xdist's default, a worker is
    pre-assigned every n-th test and keeps them queued behind its longest one while the others sit idle: the last
    five minutes of a run went by on one worker.) Every worker orders the same collection the same way, as xdist
    requires. So a test must not rely on running next to the other tests of its module: a module-scoped fixture
    may be torn down and made again in one process, and process-wide state (a warn-once set, a PKCS#11 library
    that read its config once) outlives it."""
    for item in items:
        if item.nodeid in SLOW_BY_MEASURE:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -SLOW_BY_MEASURE.get(item.nodeid, 0.0))  # stable: the rest keep file order
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1 and config.getoption("dist", "no") == "worksteal":
        items[:] = [item for share in range(workers) for item in items[share::workers]]


def _contexts_close_without_waiting() -> None:
    """A test that fails with a ZeroMQ socket still open must not hang the whole run.

    pyzmq destroys a forgotten context when it is collected, and with the default linger of -1 that
    waits forever for a peer that is gone (seen: a failed hardening test held CI until its limit).
    Every socket a test (or the node under test) makes therefore starts with linger 0; the node and
    the SDK set it themselves too, so this changes no behaviour a test checks.
    """
    import zmq

    original = zmq.Context.__init__

    def init(self: zmq.Context, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        self.setsockopt(zmq.LINGER, 0)

    zmq.Context.__init__ = init  # type: ignore[method-assign]


_contexts_close_without_waiting()


@pytest.fixture
def shared() -> Path:
    """``../shared`` (CI has it beside the clone); tests that need it skip cleanly without it."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture
def coco128(shared: Path) -> Path:
    path = shared / "data" / "coco128" / "coco128.yaml"
    if not path.is_file():
        pytest.skip("coco128 is not in ../shared")
    return path


@pytest.fixture(autouse=True)
def bastion_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty BASTION_HOME (trust store, registry, caches), CLI subprocesses too."""
    home = tmp_path_factory.mktemp("bastion-home")
    monkeypatch.setenv("BASTION_HOME", str(home))
    monkeypatch.delenv("BASTION_KEY_PASSPHRASE", raising=False)
    return home


class EgressAttempt(AssertionError):
    pass


def _address_host(address: object) -> object:
    if isinstance(address, tuple) and address:
        return address[0]
    return None  # AF_UNIX paths and the like are local


@pytest.fixture(autouse=True)
def zero_egress(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if anything in-process tries to reach a non-loopback address."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo
    real_create = socket.create_connection

    def guard(what: str, host: object) -> None:
        if not is_local(host):
            attempts.append(f"{what}({host!r})")
            raise EgressAttempt(f"zero-egress: {what} to {host!r} attempted")

    def connect(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard("connect", _address_host(address))
        return real_connect(self, address)

    def connect_ex(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard("connect_ex", _address_host(address))
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        guard("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        guard("create_connection", _address_host(address))
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield attempts
    assert not attempts, f"network egress attempted: {attempts}"


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``bastion`` in a subprocess under the same zero-egress guard (tests/egress_guard.py)."""
    full_env = {**os.environ, **(env or {})}
    # No empty entry: an empty PYTHONPATH item means the cwd, the repo root, whose bastion/ would shadow the package.
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), full_env.get("PYTHONPATH")]))
    # PYTHONSAFEPATH keeps the cwd (the repo) off sys.path on 3.11+; the first statement does it on 3.10.
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )
