"""Data-parallel distillation (#20): torchrun + DDP with gloo on this machine's CPU cores.

Every child process here (torchrun's agent and its workers) runs under the zero-egress guard too: a
``sitecustomize`` on their PYTHONPATH installs tests/egress_guard.py before anything else, so the c10d store and
gloo may use 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from lm_kit import distill_lm, stories_teacher

TESTS = REPO / "tests"


def _guarded_env(tmp_path: Path) -> dict:
    site = tmp_path / "guard"
    site.mkdir(exist_ok=True)
    # the write audit records nothing unless its variables are set (_torchrun_detect)
    (site / "sitecustomize.py").write_text(
        "import egress_guard\negress_guard.install()\nimport ddp_write_audit\nddp_write_audit.install()\n"
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The worker script under an external torchrun: 2 processes, static rendezvous on 127.0.0.1."""
    out.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=static",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "--max-restarts=0",
        str(TESTS / "ddp_lm_worker.py"),
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_guarded_env(tmp_path), timeout=300, cwd=tmp_path)


def test_the_children_guard_refuses_egress_and_allows_loopback(tmp_path):
    """What makes the DDP tests below offline-proven: their child processes run under the guard."""
    code = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
        "socket.create_connection(s.getsockname()).close(); print('loopback ok'); "
        "socket.create_connection(('10.255.255.1', 80), timeout=1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_guarded_env(tmp_path))
    assert "loopback ok" in proc.stdout and proc.returncode == 97, proc.stderr
    assert "ZERO-EGRESS VIOLATION" in proc.stderr


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_curve_and_resume_across_world_sizes(tmp_path):
    """2 DDP ranks with 2 windows each = 1 process with the whole batch of 4: same losses, same held-out curve,
    same weights (float tolerance: the all-reduce sums in another order). Only rank 0 writes checkpoints; one
    left by a 2-process run stopped at step 4 resumes in a single process and ends where the uninterrupted run
    does, and one left by a single process resumes on two."""
    torch = pytest.importorskip("torch")
    from ddp_lm_worker import SPEC, tiny

    from bastion.distill.lm_distill import distill
    from bastion.distill.spec import LMDistillSpec

    torch.set_num_threads(1)
    teacher, student, tokens = tiny()
    single = distill(teacher, student, tokens[:1800], tokens[1800:], LMDistillSpec(**SPEC), tmp_path / "single.pt")
    assert [h["step"] for h in single] == [2, 4, 6, 8]

    proc = _torchrun(tmp_path, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    worlds = [json.loads((tmp_path / "ddp" / f"world-{r}.json").read_text()) for r in (0, 1)]
    assert worlds == [{"rank": 0, "size": 2}, {"rank": 1, "size": 2}]  # really two ranks, found from the env
    parallel = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert [h["step"] for h in parallel] == [2, 4, 6, 8]
    for one, two in zip(single, parallel):
        assert two["loss"] == pytest.approx(one["loss"], abs=2e-4)  # (rounded to 4 places)
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-3)
        assert two["lr"] == pytest.approx(one["lr"])
    assert single[-1]["loss"] != single[0]["loss"]  # the curve moves: equal curves are not two flat lines
    ddp_weights = torch.load(tmp_path / "ddp" / "ck.pt", weights_only=False)["model"]
    for name, value in student.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-3, atol=1e-4)
    assert (tmp_path / "ddp" / "saves-rank0.txt").read_text().split() == ["2", "4", "6", "8"]
    assert not (tmp_path / "ddp" / "saves-rank1.txt").exists()  # rank 1 never wrote a checkpoint
    assert not list((tmp_path / "ddp").glob(".*.tmp"))  # temp + fsync + rename: nothing half-written left

    # stopped after step 4 on two processes, resumed on one: the uninterrupted curve and weights
    proc = _torchrun(tmp_path, tmp_path / "stopped", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "stopped" / "ck.pt", weights_only=False)["step"] == 4
    _, resumed, _ = tiny()
    history = distill(
        teacher, resumed, tokens[:1800], tokens[1800:], LMDistillSpec(**SPEC), tmp_path / "stopped" / "ck.pt"
    )
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    for one, again in zip(single, history):
        assert again["loss"] == pytest.approx(one["loss"], rel=1e-3, abs=2e-4)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-3, atol=1e-4)

    # and the other way: stopped after step 4 on one process, resumed on two
    ticks = []

    def stop_at_4() -> None:
        ticks.append(1)
        if len(ticks) == 4:
            raise KeyboardInterrupt

    (tmp_path / "from-one").mkdir()
    with pytest.raises(KeyboardInterrupt):
        distill(
            teacher,
            tiny()[1],
            tokens[:1800],
            tokens[1800:],
            LMDistillSpec(**SPEC),
            tmp_path / "from-one" / "ck.pt",
            stop_at_4,
        )
    proc = _torchrun(tmp_path, tmp_path / "from-one")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "from-one" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    for one, again in zip(single, history):
        assert again["loss"] == pytest.approx(one["loss"], abs=2e-4)
    weights = torch.load(tmp_path / "from-one" / "ck.pt", weights_only=False)["model"]
    for name, value in student.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-4)


def test_a_batch_that_does_not_split_over_the_world_is_refused(monkeypatch):
    torch = pytest.importorskip("torch")
    from ddp_lm_worker import SPEC, tiny

    from bastion.distill import ddp
    from bastion.distill.lm_distill import distill
    from bastion.distill.spec import LMDistillSpec
    from bastion.errors import ConfigError

    monkeypatch.setattr(ddp, "current_world", lambda: ddp.World(0, 3, 0))
    teacher, student, tokens = tiny()
    with pytest.raises(ConfigError, match="--batch 4 does not split over 3 processes"):
        distill(teacher, student, tokens[:1800], tokens[1800:], LMDistillSpec(**SPEC), Path("unused.pt"))
    assert torch.equal(student.layers[0].wq.weight, tiny()[1].layers[0].wq.weight)  # nothing trained


def test_the_world_comes_from_torchrun_env_and_a_garbled_one_is_refused(monkeypatch):
    from bastion.distill import ddp
    from bastion.errors import ConfigError

    for key in ddp.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert ddp.launched_world() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.launched_world() == ddp.World(3, 8, 1) and not ddp.launched_world().is_main
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ConfigError, match="out of range"):
        ddp.launched_world()
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ConfigError, match="incomplete"):
        ddp.launched_world()
    assert ddp.without_nproc(["lm", "--nproc", "2", "--steps", "3", "--nproc=4"]) == ["lm", "--steps", "3"]


@pytest.mark.slow  # CLI subprocesses: ~2 s each
@pytest.mark.parametrize("value", ["0", str(4 * (os.cpu_count() or 1) + 1), "two", "1.5"])
def test_a_bad_nproc_is_one_line_before_any_work(tmp_path, value):
    for command in (["distill", "lm"], ["distill", "detect"]):
        args = [*command, "--nproc", value, "--teacher", str(tmp_path / "missing.bin"), "--out", str(tmp_path / "r")]
        args += ["--weights-license", "MIT"] if command[1] == "lm" else ["--images", str(tmp_path), "--classes", "a"]
        proc = run_cli(*args)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--nproc" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def _needs_ultralytics() -> None:
    from bastion.distill.ultra import ultralytics_available

    if not ultralytics_available():  # (not importorskip: importing it bare checks connectivity)
        pytest.skip("ultralytics is not installed")


def _detect(tmp_path: Path, images: Path, *flags: str, env: dict | None = None):
    return run_cli(
        "distill", "detect", "--teacher", "yolov5n", "--images", str(images), "--classes", "person",
        "--device", "cpu", "--nproc", "2", "--out", str(tmp_path / "r"), *flags, env=env,
    )  # fmt: skip


@pytest.mark.slow  # CLI subprocesses: ~2 s each
def test_detect_refuses_what_its_cpu_workers_cannot_do_in_one_line(tmp_path):
    """A batch that does not split over the CPU workers, and --nproc in a process an external torchrun started
    (its world is torchrun's): one line each, before any work."""
    _needs_ultralytics()
    refused = {
        "--batch 3 does not split over 2 processes": _detect(tmp_path, tmp_path, "--batch", "3"),
        "already a torchrun worker (RANK=0, WORLD_SIZE=2) — leave out --nproc under torchrun": _detect(
            tmp_path, tmp_path, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        ),
    }
    for message, proc in refused.items():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_distill_detect_nproc_2_trains_the_student_in_two_gloo_workers_through_ultralytics(tmp_path, coco128):
    """``distill detect --device cpu --nproc 2``: the pipeline once, the student's training in two torchrun workers
    (gloo) running Ultralytics' own trainer, whose distributed sampler gave each rank half of the training images;
    rank 0 alone wrote the weights and said how training went; the launcher exported the ONNX student, measured
    it, and shipped a signed bundle; one JSON report. Workers run under the zero-egress guard."""
    _needs_ultralytics()
    from bastion.models import Bundle
    from bastion.models.keys import generate_keypair
    from bastion.models.trust import TrustStore

    images, labels = _ten_coco_images(tmp_path, coco128)
    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    proc = _detect(
        tmp_path, images, "--labels", str(labels), *TINY_STUDENT, "--sign", str(pair.private_path), "--json",
        env={"PYTHONPATH": _guarded_env(tmp_path)["PYTHONPATH"], "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON document: the workers printed nothing on stdout
    trained = report["training"]
    parallel = trained["data_parallel"]
    assert parallel["backend"] == "gloo" and parallel["world_size"] == 2
    ranks = parallel["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]  # both ranks took part, each found from torchrun's environment
    assert [r["batch"] for r in ranks] == [2, 2]  # --batch 4 split over the two
    train_images = report["labels"]["train"]
    assert sum(r["images"] for r in ranks) >= train_images >= 2  # the sampler split the data (padded to even)
    assert all(0 < r["images"] <= (train_images + 1) // 2 for r in ranks)
    assert proc.stderr.count("train student: epoch 1/1 done loss") == 1  # rank 0's line; rank 1 said nothing
    assert "distill [3/5] student: training yolov5n.yaml" in proc.stderr
    student = tmp_path / "r" / "student"
    assert sorted(p.name for p in (student / "train" / "weights").iterdir()) == ["best.pt", "last.pt"]
    assert not list(student.rglob("*.tmp")) and not (student / "ddp-job.json").exists()
    import onnxruntime as ort

    session = ort.InferenceSession(str(student / trained["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]  # the launcher exported what rank 0 trained
    assert any(c["name"] == "student@64" for c in report["candidates"])  # measured like any student
    shipped = Bundle.open(tmp_path / "r" / "bundle")  # verifies: signed by the trusted key, payload intact
    assert shipped.verification.key_id == pair.key_id


def _ten_coco_images(tmp_path: Path, coco128: Path) -> tuple[Path, Path]:
    """10 COCO128 images, half of them with ground truth (the others pseudo-labelled by the teacher)."""
    src = coco128.parent
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i, jpg in enumerate(sorted((src / "images" / "train2017").glob("*.jpg"))[:10]):
        shutil.copy(jpg, images / jpg.name)
        label = src / "labels" / "train2017" / (jpg.stem + ".txt")
        if i % 2 and label.is_file():
            shutil.copy(label, labels / label.name)
    return images, labels


# a width-0.125 yolov5n student at 64 px, one epoch: ~30 s on two shared cores
TINY_STUDENT = ("--imgsz", "64", "--student", "yolov5n", "--width", "0.125", "--epochs", "1", "--batch", "4")
TINY_STUDENT += ("--no-int8",)


def _torchrun_detect(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 -m bastion.cli -- distill detect
    ARGS --device cpu`` — an external torchrun, as a cluster starts it (the ``--`` keeps torchrun's own parser off
    ``--sign``, which it would take for its ``--signals-to-handle``) — every process under the zero-egress guard and
    the write audit (each rank's writes under tmp_path/r, in tmp_path/audit)."""
    (tmp_path / "audit").mkdir()
    env = {
        **_guarded_env(tmp_path),
        "BASTION_TEST_AUDIT_ROOT": str(tmp_path / "r"),
        "BASTION_TEST_AUDIT_LOG": str(tmp_path / "audit"),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        "--max-restarts", "0", "-m", "bastion.cli", "--", "distill", "detect", "--teacher", "yolov5n", "--classes", "person",
        "--device", "cpu", "--out", str(tmp_path / "r"), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_distill_detect_under_an_external_torchrun_trains_on_every_rank_and_rank_0_alone_writes(tmp_path, coco128):
    """``torchrun --standalone --nnodes 1 --nproc-per-node 2 -m bastion.cli distill detect … --device cpu``: every
    rank runs the command; rank 0 alone runs the pipeline's stages, the other waits on the launcher's store until
    rank 0 reaches the student's training, then both train (gloo, Ultralytics' trainer, each with its share of the
    images); rank 0 exports, measures, ships one signed bundle and prints the one report. The write audit shows
    rank 1 wrote nothing under the run folder; rank 0 wrote it all."""
    _needs_ultralytics()
    from bastion.models import Bundle
    from bastion.models.keys import generate_keypair
    from bastion.models.trust import TrustStore

    images, labels = _ten_coco_images(tmp_path, coco128)
    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    proc = _torchrun_detect(
        tmp_path, "--images", str(images), "--labels", str(labels), *TINY_STUDENT, "--sign", str(pair.private_path),
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing, nor did Ultralytics
    parallel = report["training"]["data_parallel"]
    assert parallel["backend"] == "gloo" and parallel["world_size"] == 2
    ranks = parallel["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["batch"] for r in ranks] == [2, 2]
    assert all(0 < r["images"] <= (report["labels"]["train"] + 1) // 2 for r in ranks)  # each rank its share
    for stage in ("[1/5] teachers", "[2/5] labels", "[3/5] student: training", "[4/5] candidates", "[5/5] report"):
        assert proc.stderr.count(f"distill {stage}") == 1, proc.stderr  # the pipeline ran once: rank 0's
    assert proc.stderr.count("train student: epoch 1/1 done loss") == 1
    assert "error" not in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr
    run = tmp_path / "r"
    assert sorted(p.name for p in (run / "student" / "train" / "weights").iterdir()) == ["best.pt", "last.pt"]
    assert not list(run.rglob("*.tmp")) and not list(run.glob(".*.partial"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(run / "student" / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    assert any(c["name"] == "student@64" for c in report["candidates"])
    shipped = Bundle.open(run / "bundle")  # verifies: signed by the trusted key, payload intact
    assert shipped.verification.key_id == pair.key_id
    assert sorted(p.name for p in run.iterdir() if p.name == "bundle" or p.name.startswith("bundle")) == ["bundle"]
    audit = tmp_path / "audit"
    assert not (audit / "writes-rank1.txt").exists(), (audit / "writes-rank1.txt").read_text()[:2000]
    rank0 = (audit / "writes-rank0.txt").read_text().splitlines()  # what rank 0 wrote: every stage, the weights
    for stage in ("labels", "student", "baselines", "report", "bundle"):
        assert f"os.rename {run / stage}" in rank0  # each stage renamed into place from its staging folder
    assert f"open {run / '.student.partial' / 'train' / 'weights' / 'last.pt'}" in rank0


def test_a_rank_that_cannot_see_rank_0s_dataset_stops_every_rank_in_one_line_each(tmp_path):
    """Several nodes need --out on a shared file system: a rank that does not find the dataset rank 0 wrote (here:
    the path rank 0 posts does not exist where rank 1 looks, as on a node without the share) says so in one line
    naming the path; rank 0 stops with the same cause; nothing trains; torchrun ends, exit non-zero, no hang."""
    pytest.importorskip("torch")
    proc = _torchrun_worker(tmp_path, "ddp_detect_worker.py", "unseen", str(tmp_path))
    assert proc.returncode != 0, proc.stderr
    missing = tmp_path / "not-on-this-node" / "labels" / "data.yaml"
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    hint = "put --out and --images on a file system every node mounts at the same path (docs/scale.md)"
    assert errors == [
        f"error: rank 1 cannot see the dataset rank 0 wrote: {missing} is not there — {hint}",
        f"error: rank 1 cannot see the dataset rank 0 wrote: {missing} is not there — {hint}",
    ], proc.stderr
    assert not (tmp_path / "trained").exists()  # rank 0 did not go on to train alone


def test_a_rank_sees_rank_0s_dataset_only_when_it_is_the_same_and_every_file_is_there(tmp_path):
    """What each rank checks before training (ultra_ddp._missing_from): rank 0's digest of data.yaml + dataset.json,
    and every image (a link to --images) and label the manifest lists; a stale copy at the same path is refused."""
    from ddp_detect_worker import _dataset

    from bastion.distill.ultra_ddp import _dataset_digest, _missing_from

    data_yaml = _dataset(tmp_path)
    digest = _dataset_digest(data_yaml)
    assert _missing_from(data_yaml, digest) is None
    assert (
        _missing_from(tmp_path / "elsewhere" / "data.yaml", digest)
        == f"{tmp_path / 'elsewhere' / 'data.yaml'} is not there"
    )
    (data_yaml.parent / "labels" / "val" / "a.txt").unlink()
    assert _missing_from(data_yaml, digest) == f"{data_yaml.parent / 'labels' / 'val' / 'a.txt'} is not there"
    image = data_yaml.parent / "images" / "train" / "a.jpg"
    image.unlink()
    image.symlink_to(tmp_path / "images-not-mounted-here" / "a.jpg")
    assert str(image) in _missing_from(data_yaml, digest)
    (data_yaml.parent / "dataset.json").write_text("{}")  # rank 0 wrote another one since
    assert "a different dataset from rank 0's" in _missing_from(data_yaml, digest)


@pytest.mark.slow  # torchrun and two processes importing torch: ~8 s
def test_ranks_waiting_for_rank_0_end_quietly_when_it_needs_no_training(tmp_path):
    """Rank 0's command ends without training (cached, or --no-train): the others were waiting for a job; they end
    quietly, exit 0, instead of waiting for a store that goes away."""
    pytest.importorskip("torch")
    proc = _torchrun_worker(tmp_path, "ddp_detect_worker.py", "idle", str(tmp_path))
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr


@pytest.mark.slow  # two CLI processes under torchrun: ~10 s
def test_under_an_external_torchrun_rank_0_failing_before_training_stops_the_others_in_one_line(tmp_path):
    """Rank 0 refuses the command (its images are not there) while rank 1 waits for the student's job: rank 0's own
    one line, rank 1's "stopped: rank 0 failed before training" (or nothing, when torchrun's agent ends it first),
    non-zero, no hang."""
    _needs_ultralytics()
    proc = _torchrun_detect(tmp_path, "--images", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert str(tmp_path / "missing") in errors[0], proc.stderr
    # rank 1 says why it stopped, unless torchrun's agent, seeing rank 0 fail, ended it first (SIGTERM: quiet)
    assert errors[1:] in ([], ["error: worker 1 of 2 stopped: rank 0 failed before training"]), proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr  # (then torchrun's own report: a traceback of its own)


def _torchrun_worker(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` (2 processes, static rendezvous on 127.0.0.1) of tests/SCRIPT ARGS."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=static",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "--max-restarts=0", str(TESTS / script), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_guarded_env(tmp_path), timeout=120, cwd=tmp_path)


def test_an_older_cloudpickle_than_ultralytics_asks_for_is_refused_before_its_gpu_launch(monkeypatch):
    """Ultralytics' multi-GPU launcher calls check_requirements("cloudpickle>=3.1.1"), a pip install on 3.0.x: refused
    in one line instead (the GPUs are faked; the check comes before any launch)."""
    torch = pytest.importorskip("torch")
    import importlib.metadata
    import importlib.util

    from bastion.distill.torch_device import data_parallel_devices
    from bastion.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.0")
    with pytest.raises(ConfigError, match=r"needs cloudpickle>=3\.1\.1, this environment has 3\.0\.0"):
        data_parallel_devices("cuda:0", 2)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.1.3")
    if importlib.util.find_spec("cloudpickle") is not None:
        assert data_parallel_devices("cuda:0", 2) == "cuda:0,1"


def test_detect_on_several_gpus_names_them_for_ultralytics():
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    from bastion.distill.torch_device import data_parallel_devices, ultralytics_device

    pytest.importorskip("cloudpickle")
    assert ultralytics_device(data_parallel_devices("cuda:0", 2)) == "0,1"


def _distill_lm_on_two_cpu_workers(tmp_path: Path, *args: str):
    """``bastion distill lm ARGS --device cpu --nproc 2 --out tmp_path/run``, workers under the egress guard."""
    return distill_lm(
        *args,
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--out",
        str(tmp_path / "run"),
        env={"PYTHONPATH": _guarded_env(tmp_path)["PYTHONPATH"], "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_distill_lm_nproc_2_runs_the_whole_command_on_two_workers(tmp_path):
    """``bastion distill lm --nproc 2``: torchrun's launcher in the CLI, two gloo workers, one report (rank 0's)."""
    stories_teacher()
    proc = _distill_lm_on_two_cpu_workers(
        tmp_path,
        "--synthetic",
        "8",
        "--depth",
        "3",
        "--steps",
        "4",
        "--batch",
        "2",
        "--block",
        "32",
        "--gguf",
        "none",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert [h["step"] for h in report["history"]][-1] == 4 and report["student"]["layers"] == [0, 2, 4]
    assert (tmp_path / "run" / "bundle" / "manifest.json").is_file()
    assert proc.stderr.count("distill [4/7] distil") == 1  # progress from rank 0 only: rank 1 stays quiet


@pytest.mark.slow
def test_a_worker_that_fails_stops_the_run_with_its_own_error_and_one_line_each(tmp_path):
    """Rank 0 refuses a too-small corpus while rank 1 waits for it: rank 1 says it stopped because of a peer (no
    'internal error'), the launcher names the failed worker, torchrun's own log lines stay out, exit 1."""
    stories_teacher()
    (tmp_path / "tiny.txt").write_text("too small a corpus")
    proc = _distill_lm_on_two_cpu_workers(tmp_path, "--corpus", str(tmp_path / "tiny.txt"), "--batch", "2")
    assert proc.returncode == 1, proc.stderr
    errors = sorted(line for line in proc.stderr.splitlines() if not line.startswith("distill ["))
    expected = [
        "error: data-parallel worker 0 of 2 failed (exit 1) — its own error is printed above",
        "error: the corpus at " + str(tmp_path / "tiny.txt") + " is too small (18 characters)",
    ]
    # rank 1 says why it stopped, unless torchrun's SIGTERM reached it before the broken connection did
    assert errors in (expected, [*expected, "error: worker 1 of 2 stopped: another worker exited first"]), proc.stderr


@pytest.mark.parametrize(
    ("exits", "named"),
    [
        ({0: 1, 1: 3}, 0),  # rank 0 failed, rank 1 only stopped because of it
        ({0: 3, 1: 1}, 1),  # under load the stopped peer can be the first torchrun names: still the real one
        ({0: -15, 1: 1}, 1),  # torchrun's teardown signalled rank 0 after rank 1 failed
        ({0: 3, 1: 3}, 0),  # nobody failed for its own reason: torchrun's first
    ],
)
def test_the_launcher_names_the_worker_that_failed_for_its_own_reason(tmp_path, exits, named):
    pytest.importorskip("torch")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from bastion.distill.ddp import _root_failure

    failures = {
        rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file=str(tmp_path / "none"))
        for rank, code in exits.items()
    }
    rank, failure = _root_failure(ChildFailedError("bastion.cli", failures))
    assert rank == named and failure.exitcode == exits[named]


@pytest.mark.slow  # ~10 s: the corpus, then a few steps on two workers
def test_ctrl_c_on_nproc_2_is_one_line_exit_130_and_no_worker_left(tmp_path):
    """Seen by hand: Ctrl-C on ``distill lm --nproc 2`` printed "interrupted" from each worker and then "internal
    error: SignalException" from torchrun's launcher (exit 2). Now: one "interrupted", exit 130, workers gone."""
    import signal
    import time

    teacher = stories_teacher()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([_guarded_env(tmp_path)["PYTHONPATH"], env.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    code = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; from bastion.cli import run; run()"
    args = [
        "distill", "lm", "--teacher", str(teacher / "stories260K.bin"), "--tokenizer",
        str(teacher / "hf" / "tokenizer.json"), "--weights-license", "MIT", "--synthetic", "8", "--depth", "3",
        "--steps", "100000", "--batch", "2", "--block", "32", "--gguf", "none", "--device", "cpu", "--nproc", "2",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path
        )
        try:
            deadline = time.monotonic() + 240
            while "distil student: step" not in err.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)
            workers = [
                int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid
            ]  # torchrun's workers: children of the launcher, in their own process groups
            proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
            assert proc.wait(timeout=120) == 130, err.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err.read_text()
    assert text.count("interrupted") == 1 and text.strip().endswith("interrupted"), text
    assert "internal error" not in text and "Traceback" not in text, text
    assert workers and not [w for w in workers if Path(f"/proc/{w}").exists()], workers


def _parent(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_gpu_node_running_another_number_of_ranks_than_rank_0s_is_refused(monkeypatch):
    """Rank 0 posts one GPU per local rank of its own node; a node with more ranks would index past that list
    (an IndexError deep in Ultralytics): it is refused, like a missing dataset, and every rank stops."""
    from types import SimpleNamespace

    from bastion.distill.ultra_ddp import _other_node_shape

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert "4 ranks on this node, 8 on rank 0's" in _other_node_shape(SimpleNamespace(device="0,1,2,3,4,5,6,7"))
    assert _other_node_shape(SimpleNamespace(device="0,1,2,3")) is None
    assert _other_node_shape(SimpleNamespace(device="cpu")) is None  # gloo on CPUs: no device list
