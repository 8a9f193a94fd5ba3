"""Pseudo-labelling on Ray (#20 item 2): a local 2-worker cluster writes the single process's labels/ file by file,
phones nowhere home, listens on loopback only and is gone when the labelling ends (or is interrupted); without Ray,
or with a bad address, ``--labeller`` is one line.

The equivalence runs on 12 COCO128 images (3 with ground truth, 9 pseudo-labelled by a 2-teacher ensemble, plus one
corrupt file), not all 128: a local Ray cluster alone takes ~20 s to start on 2 shared cores, and 12 images already
cover every path a file takes (ground truth, pseudo, corrupt, WBF of two teachers).

Evaluation on Ray (``eval detect --on ray``) and the labeller through the whole ``distill detect`` CLI share one more
local 2-worker cluster (the ``cluster`` fixture, held by a helper process; the CLIs join it by address): one start
for both, not one per test.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from bastion.errors import ConfigError, ModelLoadError
from conftest import REPO, SAMPLE_IMAGES, run_cli

CLASSES = ["person", "vehicle"]
CLASS_MAP = {"car": "vehicle", "truck": "vehicle", "bus": "vehicle"}
GUARD_SITECUSTOMIZE = """\
import os, sys
_marks = os.environ.get("BASTION_TEST_GUARD_MARKS")
if _marks:  # every Python process Ray starts for this test: under the zero-egress guard, and it says so
    import egress_guard
    egress_guard.install()
    with open(os.path.join(_marks, str(os.getpid())), "w") as f:
        f.write(" ".join(sys.argv)[:300])
"""
RAY_BLOCKED_SITECUSTOMIZE = "import sys\nsys.modules['ray'] = None  # as if the [scale] extra were not installed\n"


@pytest.fixture
def subset(coco128: Path, tmp_path: Path) -> tuple[Path, Path]:
    src = coco128.parent
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i, jpg in enumerate(sorted((src / "images" / "train2017").glob("*.jpg"))[:12]):
        shutil.copy(jpg, images / jpg.name)
        label = src / "labels" / "train2017" / f"{jpg.stem}.txt"
        if i % 4 == 0 and label.is_file():
            shutil.copy(label, labels / label.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    return images, labels


@pytest.fixture
def teachers():
    from bastion.models.bundle import Bundle

    try:
        return [Bundle.open("yolov5n"), Bundle.open("yolox_nano")]
    except ModelLoadError as exc:
        pytest.skip(f"teacher weights missing: {exc}")


def _label(images: Path, labels: Path, teachers, choice, out: Path, tick=None):
    from bastion.distill.classmap import ClassMap
    from bastion.distill.labellers import open_labeller
    from bastion.distill.pseudo import build_dataset
    from bastion.runtime.media import list_images

    maps = [ClassMap.build(b.manifest.classes, CLASSES, CLASS_MAP) for b in teachers]
    with open_labeller(choice, teachers, maps) as labeller:
        return build_dataset(list_images(images), labels, labeller, maps, CLASSES, [0.25, 0.3], out, tick=tick)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: its bytes, or for a symlink where it points."""
    return {
        str(p.relative_to(root)): (b"-> " + os.readlink(p).encode()) if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def _descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` (Ray's GCS, raylet, workers, dashboard): pid → command name."""
    tree, found, todo = _children(), {}, [root]
    while todo:
        for pid in tree.get(todo.pop(), []):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] != "Z" and pid not in found:
                found[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
                todo.append(pid)
    return found


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc writes each 32-bit word host-endian
    v6 = ipaddress.IPv6Address(words)
    return v6.ipv4_mapped or v6


def _sockets_of(pids) -> list[tuple[str, str, str]]:
    """(protocol, local address, remote address) of every TCP/UDP socket the processes hold (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                local, remote = (_address(c.split(":")[0]) for c in cols[1:3])
                found.append((proto, str(local), str(remote)))
    return found


@pytest.mark.slow
def test_ray_labeller_on_two_local_workers_writes_the_single_process_labels_and_phones_nowhere(
    subset, teachers, tmp_path, monkeypatch
):
    pytest.importorskip("ray")
    from bastion.distill.labellers import LabellerChoice

    images, labels = subset
    single = _label(images, labels, teachers, LabellerChoice(), tmp_path / "single")

    guard, marks = tmp_path / "guard", tmp_path / "marks"
    guard.mkdir()
    marks.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(guard), str(REPO / "tests")]))
    monkeypatch.setenv("BASTION_TEST_GUARD_MARKS", str(marks))
    session = Path(tempfile.mkdtemp(prefix="brt-", dir="/tmp"))  # short: Ray's unix sockets live under it
    monkeypatch.setenv("BASTION_RAY_TMPDIR", str(session))
    seen: dict[int, str] = {}
    sockets: list[tuple[str, str, str]] = []
    try:
        ticks = []

        def interrupted_mid_stream() -> None:
            ticks.append(1)
            if len(ticks) == 3:
                raise KeyboardInterrupt  # Ctrl-C while the actors are labelling

        from bastion.distill.classmap import ClassMap
        from bastion.distill.labellers import open_labeller
        from bastion.distill.pseudo import build_dataset
        from bastion.runtime.media import list_images

        maps = [ClassMap.build(b.manifest.classes, CLASSES, CLASS_MAP) for b in teachers]
        with pytest.raises(KeyboardInterrupt):
            with open_labeller(LabellerChoice("ray", None, 2), teachers, maps) as labeller:
                on_ray = build_dataset(
                    list_images(images), labels, labeller, maps, CLASSES, [0.25, 0.3], tmp_path / "ray"
                )
                assert labeller.describe() == {"kind": "ray", "address": "local", "workers": 2, "gpus_per_worker": 0}
                seen = _descendants(os.getpid())
                sockets = _sockets_of(seen)
                build_dataset(
                    list_images(images), labels, labeller, maps, CLASSES, [0.25, 0.3], tmp_path / "again",
                    tick=interrupted_mid_stream,
                )  # fmt: skip

        # the same labels/ tree, file by file (links to the same images), and the same counts
        a, b = _tree(tmp_path / "single"), _tree(tmp_path / "ray")
        assert sorted(a) == sorted(b)
        assert [k for k in a if a[k] != b[k]] == []
        assert dataclasses.asdict(single) == dataclasses.asdict(on_ray)
        assert single.pseudo == 9 and single.ground_truth == 3 and len(single.corrupt) == 1
        assert sum(single.boxes_per_class.values()) > 9  # real detections were compared, not empty files

        # Ray's own processes ran (C++ GCS and raylet, two labelling workers), on loopback only: every socket they
        # held while the cluster was up is bound to, and talks to, 127.0.0.1
        names = set(seen.values())
        assert {"gcs_server", "raylet"} <= names, names
        assert sum("TeacherActor" in n or n.startswith("ray::") for n in names) >= 2, names
        assert len(sockets) >= 5, sockets
        outward = [
            s for s in sockets if not all(ipaddress.ip_address(a).is_loopback or a in ("0.0.0.0", "::") for a in s[1:])
        ]
        assert outward == [] and all(ipaddress.ip_address(s[1]).is_loopback for s in sockets), outward

        # every Python process Ray started ran under the zero-egress guard (its mark), and none was refused;
        # Ray's usage statistics were off in the cluster's own dashboard process
        marked = {int(p.name) for p in marks.iterdir()}
        assert len(marked & set(seen)) >= 3, (marked, seen)
        logs = list(session.rglob("logs/*"))
        assert logs
        assert not [p for p in logs if p.is_file() and b"ZERO-EGRESS VIOLATION" in p.read_bytes()]
        assert any(b"Usage reporting is disabled." in p.read_bytes() for p in logs if p.name == "dashboard.log")

        # the interrupt shut the local cluster down: none of its processes is left
        deadline = time.monotonic() + 20
        while set(_descendants(os.getpid())) & set(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not set(_descendants(os.getpid())) & set(seen)
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # the driver's environment is given back
    finally:
        shutil.rmtree(session, ignore_errors=True)


def test_a_ray_address_nobody_answers_is_one_line_and_leaves_nothing_set():
    pytest.importorskip("ray")
    from bastion.distill.labellers import LabellerChoice
    from bastion.distill.ray_labeller import RayLabeller

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = dict(os.environ)
    with pytest.raises(ConfigError, match=rf"ray:127.0.0.1:{port}: no Ray cluster answers there") as err:
        RayLabeller(LabellerChoice("ray", f"127.0.0.1:{port}"), [], [])
    assert "\n" not in str(err.value) and "ray start --head" in str(err.value)
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("text", "workers", "expected"),
    [
        ("single", None, ("single", None, None)),
        ("ray", None, ("ray", None, None)),
        ("ray", 3, ("ray", None, 3)),
        ("ray:auto", None, ("ray", "auto", None)),
        ("ray:10.0.0.1:6379", None, ("ray", "10.0.0.1:6379", None)),
        ("ray:head-node.local:06379", 8, ("ray", "head-node.local:6379", 8)),
    ],
)
def test_labeller_choices(text, workers, expected):
    from bastion.distill.labellers import parse_labeller

    choice = parse_labeller(text, workers)
    assert (choice.kind, choice.address, choice.workers) == expected


@pytest.mark.parametrize(
    ("text", "workers", "says"),
    [
        ("spark", None, "unknown labeller"),
        ("ray:", None, "not a Ray address"),
        ("ray:10.0.0.1", None, "not a Ray address"),
        ("ray:10.0.0.1:99999", None, "not a Ray address"),
        ("ray:a b:1", None, "not a Ray address"),
        ("ray://10.0.0.1:10001", None, "Ray Client"),
        ("ray", 0, "1 to 4096"),
        ("single", 2, "goes with --labeller ray"),
    ],
)
def test_bad_labellers_are_refused(text, workers, says):
    from bastion.distill.labellers import parse_labeller

    with pytest.raises(ConfigError, match=says):
        parse_labeller(text, workers)


def _distill_detect(out: Path, *flags: str, env: dict | None = None):
    return run_cli(
        "distill", "detect", "--teacher", "yolov5n", "--images", str(SAMPLE_IMAGES), "--classes", "person",
        "--no-train", "--out", str(out), *flags, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_without_ray_or_with_a_bad_address_is_one_line_before_any_work(tmp_path):
    blocked = tmp_path / "no-ray"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(RAY_BLOCKED_SITECUSTOMIZE)
    proc = _distill_detect(tmp_path / "run", "--labeller", "ray", env={"PYTHONPATH": str(blocked)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'bastion[scale]'" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()

    proc = _distill_detect(tmp_path / "run", "--labeller", "ray:10.0.0.1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not a Ray address" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_field_node_packages_and_the_distill_cli_never_import_ray():
    import subprocess
    import sys

    probe = (
        "import bastion, bastion.runtime, bastion.runtime.detect, bastion.edge, bastion.models, bastion.hardware, "
        "bastion.distill, bastion.distill.cli, bastion.distill.cli_eval, bastion.distill.evaluate, "
        "bastion.distill.labellers, bastion.distill.pseudo, sys; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "'bastion'" in out and "'ray'" not in out


def test_a_ctrl_c_during_the_shutdown_finishes_it_then_removes_the_session_dir(tmp_path):
    """Seen by hand: Ctrl-C just after the labels, while Ray shut down, left an empty session dir in /tmp (Ray's
    dying processes still wrote into it as it was removed). The stand-in for Ray below keeps writing for 0.3 s."""
    import threading
    import types

    from bastion.distill.ray_session import RaySession

    session = tmp_path / "bastion-ray-x"
    (session / "session_1").mkdir(parents=True)
    calls: list[str] = []

    def dying_processes_write() -> None:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            try:  # into the session dir, as Ray's processes do: never making the session dir itself again
                (session / "session_1" / "logs").mkdir(exist_ok=True)
                (session / "session_1" / "logs" / "raylet.out").write_text("bye")
            except FileNotFoundError:  # removed under it: so is every later write of a dying process
                return
            time.sleep(0.01)

    def shutdown() -> None:
        calls.append("shutdown")
        if len(calls) == 1:
            threading.Thread(target=dying_processes_write, daemon=True).start()
            raise KeyboardInterrupt

    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: True,
        shutdown=shutdown,
        _private=types.SimpleNamespace(ray_constants=types.SimpleNamespace(ENABLE_RAY_CLUSTER=False)),
    )
    ray_session = object.__new__(RaySession)  # what RayLabeller.close and eval --on ray's close call
    ray_session.ray, ray_session._owned, ray_session._cluster_switch = fake_ray, True, True
    ray_session._saved_env, ray_session._tmp, ray_session._remove_tmp = {}, session, True
    with pytest.raises(KeyboardInterrupt):
        ray_session.close()
    assert calls == ["shutdown", "shutdown"]  # the interrupted shutdown is finished before the interrupt goes on
    assert not session.exists()
    assert fake_ray._private.ray_constants.ENABLE_RAY_CLUSTER is True


def test_a_cluster_that_wants_its_token_is_one_line_that_says_so(monkeypatch):
    """Seen by hand: a 'ray start --head' cluster (token authentication on by default in Ray 2.60) refused a driver
    without RAY_AUTH_MODE=token, and the only line was Ray's "Failed to connect to Ray cluster at …"."""
    ray = pytest.importorskip("ray")
    from bastion.distill.labellers import LabellerChoice
    from bastion.distill.ray_labeller import RayLabeller

    def refused(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as head:  # something answers on the port, as a GCS would
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        with pytest.raises(ConfigError, match="export RAY_AUTH_MODE=token") as err:
            RayLabeller(LabellerChoice("ray", address), [], [])
        assert "\n" not in str(err.value) and "Failed to connect" in str(err.value)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the token is given: the address is what to check
        with pytest.raises(ConfigError) as err:
            RayLabeller(LabellerChoice("ray", address), [], [])
        assert "RAY_AUTH_MODE" not in str(err.value)


# --- one local 2-worker cluster shared by the CLI tests below (#20: evaluation on Ray, the labeller end to end) ----
# It is held by a helper process (started with the labeller's own RaySession), not by this one: the test above must
# start and own its cluster, and these tests run bastion as the operator does, in subprocesses that join it by
# address (ray:127.0.0.1:PORT), a second or so each instead of a ~20 s cluster start per test.
CLUSTER_HOLDER = """\
import sys
from bastion.distill.labellers import LabellerChoice
from bastion.distill.ray_session import RaySession

session = RaySession(LabellerChoice("ray", None, 2))
print(session.ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # held until the test closes stdin
session.close()
"""


JOIN = {"RAY_AUTH_MODE": "token"}  # a process joining a Ray 2.60 cluster uses its token only when told (docs/scale.md)


@dataclasses.dataclass
class Cluster:
    address: str  # HOST:PORT of its GCS
    holder: int  # pid of the process that started it: Ray's processes are its descendants
    marks: Path  # one file per Python process of the cluster that ran under the zero-egress guard
    session: Path  # Ray's session dir (logs)

    def check_offline(self) -> None:
        """Every Python process of the cluster ran under the zero-egress guard and none was refused; every socket
        Ray's processes (the C++ GCS and raylet included) hold is bound to and talks to loopback."""
        seen = _descendants(self.holder)
        assert {"gcs_server", "raylet"} <= set(seen.values()), seen
        sockets = _sockets_of(seen)
        assert len(sockets) >= 5, sockets
        outward = [
            s for s in sockets if not all(ipaddress.ip_address(a).is_loopback or a in ("0.0.0.0", "::") for a in s[1:])
        ]
        assert outward == [] and all(ipaddress.ip_address(s[1]).is_loopback for s in sockets), outward
        assert len({int(p.name) for p in self.marks.iterdir()} & set(seen)) >= 3
        logs = [p for p in self.session.rglob("logs/*") if p.is_file()]
        assert logs and not [p for p in logs if b"ZERO-EGRESS VIOLATION" in p.read_bytes()]

    def ran(self, actor: str) -> bool:
        """Whether an actor of this class ran on the cluster (Ray names its worker logs' processes after it)."""
        return any(actor.encode() in p.read_bytes() for p in self.session.rglob("logs/*") if p.is_file())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import subprocess
    import sys

    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("cluster")
    guard, marks = root / "guard", root / "marks"
    guard.mkdir()
    marks.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD_SITECUSTOMIZE)
    session = Path(tempfile.mkdtemp(prefix="brt-", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(guard), str(REPO / "tests")]),
        "PYTHONSAFEPATH": "1",
        "BASTION_TEST_GUARD_MARKS": str(marks),
        "BASTION_RAY_TMPDIR": str(session),
    }
    with open(root / "holder.err", "w") as err:
        holder = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            text=True, env=env, cwd=REPO,
        )  # fmt: skip
    try:
        address = holder.stdout.readline().strip()
        assert address, (root / "holder.err").read_text()[-2000:]
        yield Cluster(address, holder.pid, marks, session)
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        shutil.rmtree(session, ignore_errors=True)


@pytest.fixture
def eval_set(coco128: Path, tmp_path: Path) -> Path:
    """20 COCO128 images with their labels, in more than one rectangular batch shape, plus one corrupt file."""
    import yaml

    src = coco128.parent
    root = tmp_path / "evalset"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for jpg in sorted((src / "images" / "train2017").glob("*.jpg"))[:20]:
        shutil.copy(jpg, root / "images" / jpg.name)
        label = src / "labels" / "train2017" / f"{jpg.stem}.txt"
        if label.is_file():
            shutil.copy(label, root / "labels" / label.name)
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    names = yaml.safe_load(coco128.read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"val": "images", "names": names}))
    return root / "data.yaml"


@pytest.mark.slow
def test_eval_detect_on_two_ray_workers_reports_the_single_process_metrics_and_phones_nowhere(cluster, eval_set):
    """#20: the model's inference as Ray Data actors, the metrics on the driver: the same JSON, digit for digit
    (mAP, per-class AP, the bootstrap interval, the skipped corrupt image), from a local 2-worker cluster."""
    import json

    common = ("eval", "detect", "--model", "yolov5n", "--data", str(eval_set), "--imgsz", "320", "--bootstrap", "20")
    single = run_cli(*common, "--json", timeout=120)
    assert single.returncode == 0, single.stderr
    on_ray = run_cli(*common, "--json", "--on", f"ray:{cluster.address}", "--workers", "2", env=JOIN, timeout=120)
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stdout == single.stdout
    report = json.loads(single.stdout)
    assert report["images"] == 21 and report["map50"] > 0.2 and len(report["skipped"]) == 1
    warned = on_ray.stderr.replace("\n", "")  # the console wraps long lines
    assert "skipped unreadable image" in warned and "broken.jpg (corrupt" in warned
    assert cluster.ran("EvalActor")  # the Ray run's inference did run on the cluster's actors
    cluster.check_offline()


@pytest.mark.slow
def test_distill_detect_cli_with_the_ray_labeller_writes_the_single_labellers_labels(cluster, subset, tmp_path):
    """#20: ``bastion distill detect --labeller ray:…`` through every stage (no training, no INT8: the cheapest
    run), file by file the ``labels/`` of the same command with ``--labeller single``; run.json says who labelled."""
    import json

    images, labels = subset
    runs = {}
    ray = ("--labeller", f"ray:{cluster.address}", "--labeller-workers", "2")
    for kind, flags in (("single", ("--labeller", "single")), ("ray", ray)):
        runs[kind] = tmp_path / kind
        proc = run_cli(
            "distill", "detect", "--teacher", "yolov5n", "--teacher", "yolox_nano", "--images", str(images),
            "--labels", str(labels), "--classes", ",".join(CLASSES), "--class-map",
            ",".join(f"{k}={v}" for k, v in CLASS_MAP.items()), "--no-train", "--no-int8", "--out", str(runs[kind]),
            *flags, env=JOIN if kind == "ray" else None, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _tree(runs["single"] / "labels"), _tree(runs["ray"] / "labels")
    assert sorted(a) == sorted(b) and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    recorded = {k: json.loads((runs[k] / "run.json").read_text())["stages"]["labels"]["result"] for k in runs}
    assert recorded["single"]["labeller"] == {"kind": "single"}
    assert recorded["ray"]["labeller"] == {
        "kind": "ray", "address": cluster.address, "workers": 2, "gpus_per_worker": 0
    }  # fmt: skip
    assert {k: v for k, v in recorded["ray"].items() if k != "labeller"} == {
        k: v for k, v in recorded["single"].items() if k != "labeller"
    }
    assert recorded["ray"]["pseudo"] > 0 and len(recorded["ray"]["corrupt"]) == 1
    assert cluster.ran("TeacherActor")
    cluster.check_offline()


@pytest.mark.parametrize(
    ("text", "workers", "says"),
    [
        ("spark", None, "--on 'spark': unknown place to run"),
        ("ray:10.0.0.1", None, "--on 'ray:10.0.0.1': not a Ray address"),
        ("ray://10.0.0.1:10001", None, "Ray Client"),
        ("ray", 0, "--workers 0: give 1 to 4096"),
        ("single", 2, "--workers goes with --on ray"),
    ],
)
def test_bad_eval_on_choices_are_refused_in_the_evals_own_words(text, workers, says):
    from bastion.distill.labellers import EVAL_FLAGS, parse_labeller

    with pytest.raises(ConfigError, match=says) as err:
        parse_labeller(text, workers, EVAL_FLAGS)
    assert "labeller" not in str(err.value)
    assert parse_labeller("ray:head:6379", 2, EVAL_FLAGS).address == "head:6379"


def test_eval_on_ray_without_ray_or_with_a_bad_address_is_one_line_before_the_data_is_read(tmp_path):
    """The --data below does not exist: the refusal comes first, so nothing was read or started before it."""
    blocked = tmp_path / "no-ray"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(RAY_BLOCKED_SITECUSTOMIZE)
    missing = str(tmp_path / "nowhere.yaml")
    proc = run_cli("eval", "detect", "--data", missing, "--on", "ray", env={"PYTHONPATH": str(blocked)}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--on ray needs the 'ray[data]' package" in proc.stderr and "pip install 'bastion[scale]'" in proc.stderr
    assert "--on single" in proc.stderr

    proc = run_cli("eval", "detect", "--data", missing, "--on", "ray:10.0.0.1", timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--on 'ray:10.0.0.1': not a Ray address" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_on_a_ray_address_nobody_answers_is_one_line_and_leaves_nothing_set():
    ray = pytest.importorskip("ray")
    from bastion.distill.labellers import LabellerChoice
    from bastion.distill.ray_eval import open_session

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before, switch = dict(os.environ), ray._private.ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(ConfigError, match=rf"--on ray:127.0.0.1:{port}: no Ray cluster answers there") as err:
        open_session(LabellerChoice("ray", f"127.0.0.1:{port}"))
    assert "\n" not in str(err.value)
    assert dict(os.environ) == before and ray._private.ray_constants.ENABLE_RAY_CLUSTER == switch


def test_a_sealed_model_is_not_spread_over_a_ray_cluster(monkeypatch):
    import types

    from bastion.distill import ray_eval

    sealed = types.SimpleNamespace(manifest=types.SimpleNamespace(name="kestrel", sealed={"unit": "u1"}))
    monkeypatch.setattr(ray_eval.Bundle, "open", lambda *a, **k: sealed)
    with pytest.raises(ConfigError, match="kestrel is sealed.*--on single"):
        ray_eval.open_source("kestrel", allow_unsigned=False)


def test_no_more_actors_than_blocks_so_ray_data_has_nothing_to_warn_about():
    """Seen by hand: eval --on ray --workers 2 on 8 images (one block of 8) printed Ray Data's UserWarning that the
    pool of 2 actors 'won't fully utilize the available concurrency' on the operator's terminal."""
    import types

    from bastion.distill.labellers import EVAL_FLAGS
    from bastion.distill.ray_session import BATCH, RaySession

    pools: list[int] = []

    class Dataset:
        def map_batches(self, fn, **kwargs):
            pools.append(kwargs["compute"].size)
            return self

        def iter_rows(self):
            return iter([])

    ctx = types.SimpleNamespace(execution_options=types.SimpleNamespace())
    data = types.SimpleNamespace(
        DataContext=types.SimpleNamespace(get_current=lambda: ctx),
        from_items=lambda items, override_num_blocks: Dataset(),
        ActorPoolStrategy=lambda size: types.SimpleNamespace(size=size),
    )
    ray_session = object.__new__(RaySession)
    ray_session.ray, ray_session.workers, ray_session.gpus = types.SimpleNamespace(data=data), 4, 0
    ray_session.flags = EVAL_FLAGS
    for n in (1, BATCH, BATCH + 1, 10 * BATCH):
        with pytest.raises(Exception, match="returned no result"):
            list(ray_session.ordered_map([{"path": f"/x/{i}.jpg"} for i in range(n)], Dataset))
    assert pools == [1, 1, 2, 4]
