"""A tiny end-to-end distillation on real COCO128 images: every stage's artefact, resume, bad input."""

import json
import shutil
from pathlib import Path

import pytest

from bastion.distill.candidates import TIMING_ROUNDS, Candidate
from bastion.distill.detect_pipeline import DistillSpec, run_distill
from bastion.errors import ConfigError
from bastion.models import Bundle
from bastion.models.manifest import files_sha256
from conftest import run_cli

pytest.importorskip("onnx")


@pytest.fixture
def small_set(coco128, tmp_path):
    src = coco128.parent
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    names = sorted(p.name for p in (src / "images" / "train2017").glob("*.jpg"))[:16]
    for i, name in enumerate(names):
        shutil.copy(src / "images" / "train2017" / name, images / name)
        label = src / "labels" / "train2017" / name.replace(".jpg", ".txt")
        if i % 4 and label.is_file():  # a quarter of the images have no ground truth: pseudo-labelled
            shutil.copy(label, labels / label.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return images, labels


def spec(images, labels, out, **kw):
    base = dict(
        teachers=["yolov5n"],
        images=images,
        labels=labels,
        classes=["person", "vehicle"],
        class_map={"car": "vehicle", "truck": "vehicle", "bus": "vehicle"},
        conf={"*": 0.25},
        imgsz=160,
        out=out,
        int8=False,
    )
    base.update(kw)
    return DistillSpec(**base)


def distill_detect(images, out, *flags):
    """`bastion distill detect` of yolov5n on ``images``' persons into ``out``, as a subprocess; ``flags`` added."""
    return run_cli(
        "distill", "detect", "--teacher", "yolov5n", "--images", str(images), "--classes", "person",
        "--out", str(out), *flags,
    )  # fmt: skip


def test_tiny_distillation_artefacts_and_resume(small_set, tmp_path, monkeypatch):
    images, labels = small_set
    out = tmp_path / "run"
    import bastion.distill.candidates as pipeline

    real = pipeline.evaluate_detector

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_detector", killed)
    with pytest.raises(KeyboardInterrupt):
        run_distill(spec(images, labels, out))
    state = json.loads((out / "run.json").read_text())["stages"]
    assert state["labels"]["status"] == "done" and state["baselines"]["status"] == "failed"
    assert not (out / "baselines").exists() and not (out / ".baselines.partial").exists()
    labels_mtime = (out / "labels" / "data.yaml").stat().st_mtime_ns

    monkeypatch.setattr(pipeline, "evaluate_detector", real)
    report = run_distill(spec(images, labels, out, max_latency_ms=1e6))
    assert (out / "labels" / "data.yaml").stat().st_mtime_ns == labels_mtime  # resumed, not redone
    stats = report["labels"]
    assert stats["corrupt"] and stats["images"] == 16 and stats["pseudo"] >= 3 and stats["val"] >= 1
    for txt in (out / "labels" / "labels").rglob("*.txt"):
        assert all(line.split()[0] in ("0", "1") for line in txt.read_text().splitlines())  # narrowed
    assert list((out / "labels" / "soft").glob("*.json"))  # soft scores of the pseudo-labelled images
    names = {c["name"] for c in report["candidates"]}
    assert {"teacher@640", "teacher@160", "sliced@160"} <= names
    sliced = next(c for c in report["candidates"] if c["name"] == "sliced@160")
    assert len(sliced["latency_rounds"]) == TIMING_ROUNDS and sliced["latency_ms"] == min(sliced["latency_rounds"])
    teacher = next(c for c in report["candidates"] if c["name"] == "teacher@160")
    assert abs(sliced["map50"] - teacher["map50"]) < 0.05  # same network, same classes after merging
    assert sliced["map50_interval"] is None  # the 2 held-out images hold no box: nothing to resample
    assert report["chosen"] and "report.md" in {p.name for p in (out / "report").iterdir()}
    assert report["ground_truth"]["kind"] == "hand-labelled" and report["ground_truth"]["images"] == stats["val"]
    # shipping: the candidate's held-out numbers of this run go into its manifest, then it is signed
    from bastion.distill.datasets import load_data_yaml
    from bastion.distill.detect_bundles import ship_bundle
    from bastion.models.keys import generate_keypair, load_private_key
    from bastion.models.trust import TrustStore

    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    ship_bundle(
        out / "baselines" / "sliced-160",
        tmp_path / "shipped",
        load_private_key(pair.private_path),
        Candidate.from_dict(sliced),
        load_data_yaml(out / "labels" / "data.yaml", "val"),
        out / "labels" / "dataset.json",
    )
    shipped = Bundle.open(tmp_path / "shipped")  # verifies: signed by the trusted key, payload intact
    assert shipped.verification.key_id == pair.key_id
    assert {e.metric: e.value for e in shipped.manifest.evaluation} == {
        "mAP50": sliced["map50"],
        "mAP50-95": sliced["map50_95"],
    }
    data = json.loads((tmp_path / "shipped" / "dataset.json").read_text())  # signed with the bundle
    assert "dataset.json" in {f.path for f in shipped.manifest.files}
    first = data["splits"]["train"][0]
    import hashlib

    assert first["sha256"] == hashlib.sha256((images / first["image"]).read_bytes()).hexdigest()
    assert len(data["splits"]["train"]) + len(data["splits"]["val"]) == report["labels"]["images"]
    if report["chosen"].startswith("sliced"):
        b = Bundle.open(out / "bundle", allow_unsigned=True)
        assert b.manifest.classes == ["person", "vehicle"] and b.manifest.provenance.teachers


def test_bare_onnx_teacher_needs_allow_unsigned_and_becomes_a_run_bundle(small_set, tmp_path):
    from bastion.models.zoo import zoo_path

    images, labels = small_set
    onnx = str(next(zoo_path("yolov5n").glob("*.onnx")))
    with pytest.raises(ConfigError, match="bare ONNX file: it has no manifest and no signature"):
        run_distill(spec(images, labels, tmp_path / "a", teachers=[onnx]))
    report = run_distill(spec(images, labels, tmp_path / "b", teachers=[onnx], allow_unsigned=True))
    teachers = json.loads((tmp_path / "b" / "run.json").read_text())["teachers"]
    assert teachers[0]["decoder"] == "yolov5" and teachers[0]["signer"] is None
    assert report["candidates"] and (tmp_path / "b" / "teachers" / "teacher-0" / "manifest.json").is_file()


def test_distill_bad_input(small_set, tmp_path):
    images, labels = small_set
    with pytest.raises(ConfigError, match="no teacher knows 'tank'"):
        run_distill(spec(images, labels, tmp_path / "a", classes=["person", "vehicle", "tank"]))
    bad = tmp_path / "badlabels"
    bad.mkdir()
    first = sorted(images.glob("*.jpg"))[0]
    (bad / first.name.replace(".jpg", ".txt")).write_text("0 0.5 0.5 1.7 0.2\n")
    with pytest.raises(ConfigError, match="coordinates must be 4 numbers in \\[0, 1\\]"):
        run_distill(spec(images, bad, tmp_path / "b"))
    proc = distill_detect(tmp_path / "none", tmp_path / "c", "--no-train")
    assert proc.returncode == 1 and "no images in" in proc.stderr and "Traceback" not in proc.stderr
    for flags, message in (
        (["--force", "nope"], "--force nope: unknown stage"),
        (["--imgsz", "8"], "--imgsz: Input should be greater than or equal to 32"),
        (["--val-images", str(images)], "--val-images and --val-labels go together"),
    ):  # the spec refuses a bad flag in one line, before any stage runs
        proc = distill_detect(images, tmp_path / "e", "--no-train", *flags)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "e").exists()
    from bastion.distill.ultra import ultralytics_available

    if ultralytics_available():  # the training device is checked before any stage runs
        import torch

        proc = distill_detect(images, tmp_path / "d", "--device", f"cuda:{torch.cuda.device_count()}")
        assert proc.returncode == 1 and "CUDA device" in proc.stderr and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_tiny_student_training_end_to_end(small_set, tmp_path, shared, monkeypatch, capfd):
    """1 epoch at 160 px: warm start logged, checkpoint and ONNX exist, the student is a measured candidate; stderr
    is not a terminal here, so the run says what it does in plain lines, epochs and batches included."""
    from bastion.distill.train import TrainSpec
    from bastion.distill.ultra import ultralytics_available

    if not ultralytics_available():  # not importorskip: importing it before bastion configures it goes online
        pytest.skip("the [distill] extra is not installed")

    images, labels = small_set
    warm = shared / "weights" / "yolov5n" / "yolov5n.state_dict.safetensors"
    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative, as an operator types it (Ultralytics would file it under its own runs_dir)
    train = TrainSpec(student="yolov5n.yaml", warm_start=warm if warm.is_file() else None, epochs=1, batch=8, freeze=24)
    report = run_distill(spec(images, labels, out, train=train, int8=True))
    log = capfd.readouterr().err
    assert "distill [3/5] student: training yolov5n.yaml for 1 epochs" in log
    assert "train student: epoch 1/1 done loss" in log  # from Ultralytics' on_train_epoch_end
    trained = report["training"]
    assert (out / "student" / trained["weights"]).is_file() and (out / "student" / trained["onnx"]).is_file()
    if warm.is_file():
        assert trained["warm_start_copied"] == 342  # every tensor of layers 0-23; only the head is new
    student = next(c for c in report["candidates"] if c["name"] == "student@160")
    assert 0.0 <= student["map50"] <= 1.0 and student["latency_ms"] > 0
    bundle = Bundle.open(out / "baselines" / "student-160", allow_unsigned=True)
    assert bundle.manifest.classes == ["person", "vehicle"] and bundle.manifest.decoder.type == "yolov8"
    assert bundle.manifest.provenance.teachers == [Bundle.open("yolov5n").sha256]
    assert "student" in report["int8_gate"]
    assert trained["soft_boxes"] > 0 and trained["soft_boxes"] <= trained["train_boxes"]  # teachers' scores used

    # the student just trained is an Ultralytics checkpoint: use it as a second teacher. It is exported into the
    # run, fused with yolov5n, and its features teach a narrower student through Ultralytics' distill_model.
    checkpoint = tmp_path / "ultra-teacher.pt"
    shutil.copy(out / "student" / trained["weights"], checkpoint)
    narrow = TrainSpec(student="yolov5n.yaml", warm_start=None, epochs=1, batch=8, width=0.125)
    out2 = tmp_path / "run2"
    report2 = run_distill(spec(images, labels, out2, teachers=["yolov5n", str(checkpoint)], train=narrow))
    teachers = json.loads((out2 / "run.json").read_text())["teachers"]
    assert [t["decoder"] for t in teachers] == ["yolov5", "yolov8"] and teachers[1]["checkpoint_sha256"]
    assert report2["training"]["feature_teacher"] == str(checkpoint)
    assert list(checkpoint.parent.glob("*.onnx")) == []  # the export stayed inside the run
    student2 = Bundle.open(out2 / "baselines" / "student-160", allow_unsigned=True)
    assert len(student2.manifest.provenance.teachers) == 2
    assert report2["training"]["parameters"] < trained["parameters"] / 2  # width 0.125: a cheaper student
    checkpoint.write_bytes(checkpoint.read_bytes() + b"x")  # the cached export no longer matches its checkpoint
    with pytest.raises(ConfigError, match="changed or vanished"):
        run_distill(spec(images, labels, out2, teachers=["yolov5n", str(checkpoint)], train=narrow))


def test_checkpoint_teacher_that_is_not_ultralytics_is_refused_clearly(small_set, tmp_path, shared):
    """The shared YOLOv5 .pt is an original-YOLOv5 pickle: say how to turn it into a bundle instead."""
    from bastion.distill.ultra import ultralytics_available

    if not ultralytics_available():
        pytest.skip("the [distill] extra is not installed")
    images, labels = small_set
    original = shared / "weights" / "yolov5n" / "yolov5n.pt"
    if not original.is_file():
        pytest.skip("yolov5n.pt is not in ../shared")
    with pytest.raises(ConfigError, match="not an Ultralytics checkpoint.*export.py"):
        run_distill(spec(images, labels, tmp_path / "r", teachers=[str(original)], train=None))


def test_per_class_thresholds_chosen_against_ground_truth(small_set, tmp_path):
    """--conf auto: each class gets the grid threshold with the best F1 of the teacher against the labelled
    training images, and the pseudo-labels use it."""
    from bastion.distill.pseudo import THRESHOLD_GRID

    images, labels = small_set
    report = run_distill(spec(images, labels, tmp_path / "auto", conf_auto=True, train=None))
    stats = report["labels"]
    person = stats["threshold_choice"]["person"]
    assert person["threshold"] in THRESHOLD_GRID and person["gt_boxes"] > 0 and 0.3 < person["f1"] <= 1.0
    assert stats["thresholds"]["person"] == person["threshold"]
    no_labels = tmp_path / "nolabels"
    no_labels.mkdir()
    with pytest.raises(ConfigError, match="--conf auto needs ground-truth labels"):
        run_distill(spec(images, no_labels, tmp_path / "auto2", conf_auto=True))


def test_held_out_ground_truth_gets_a_bootstrap_interval(coco128, small_set, tmp_path):
    """With a labelled held-out set, every candidate's mAP50 comes with its resampled 90 % interval, in the JSON
    and in report.md."""
    images, labels = small_set
    src = coco128.parent
    val_images, val_labels = tmp_path / "val_images", tmp_path / "val_labels"
    val_images.mkdir()
    val_labels.mkdir()
    for name in sorted(p.name for p in (src / "images" / "train2017").glob("*.jpg"))[40:52]:
        shutil.copy(src / "images" / "train2017" / name, val_images / name)
        label = src / "labels" / "train2017" / name.replace(".jpg", ".txt")
        if label.is_file():
            shutil.copy(label, val_labels / label.name)
    out = tmp_path / "run"
    report = run_distill(spec(images, labels, out, val_images=val_images, val_labels=val_labels))
    assert report["labels"]["val_is_ground_truth"]
    truth = report["ground_truth"]  # what the demo report shows: what the candidates were scored on
    given = sorted(val_labels.glob("*.txt"))
    assert truth["kind"] == "hand-labelled" and truth["images"] == 12 and truth["labels_path"] == str(val_labels)
    assert truth["label_files"] == len(given) and truth["labels_sha256"] == files_sha256(given)
    held_out = {p.name for p in val_images.iterdir()}
    assert {p.name for p in (out / "labels" / "images" / "val").iterdir()} == held_out
    assert not held_out & {p.name for p in (out / "labels" / "images" / "train").iterdir()}  # never trained on
    markdown = (out / "report" / "report.md").read_text()
    assert f"Ground truth: 12 held-out images, hand-labelled: a separate held-out set, {val_images}" in markdown
    for candidate in report["candidates"]:
        interval = candidate["map50_interval"]
        assert 0 <= interval["low"] <= interval["high"] <= 1 and interval["rounds"] == 200
        assert f"{candidate['map50']:.3f} ({interval['low']:.2f}–{interval['high']:.2f})" in markdown
    full = next(c for c in report["candidates"] if c["name"] == "teacher@640")
    assert full["map50_interval"]["high"] > full["map50_interval"]["low"]  # 12 images do not pin mAP down


def test_without_ground_truth_the_report_says_pseudo_labelled(tmp_path):
    """No --labels and no --val-labels: the held-out images carry the teachers' labels, and the result says so
    (the demo report shows it) instead of passing agreement with the teacher off as accuracy."""
    from bastion.distill.detect_report import ground_truth, ground_truth_line
    from bastion.distill.run import DetectRunDir

    run = DetectRunDir(tmp_path / "run")
    run.held_out_images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (run.held_out_images / name).write_bytes(b"x")
    truth = ground_truth(spec(tmp_path / "images", None, run.root), run, 2)
    assert truth["kind"] == "pseudo-labelled" and truth["labels_sha256"] is None and truth["images"] == 2
    assert "**pseudo-labelled** by the teachers" in ground_truth_line(truth)


def test_a_shipped_int8_candidate_keeps_its_fp32_sibling(tmp_path):
    """The INT8 gate's bundle carries its FP32 parent (role fp32-sibling) for units where the INT8 verdict does
    not hold; shipping copies and re-signs the whole bundle, so RUN/bundle keeps it, hash-checked and signed."""
    from types import SimpleNamespace

    from bastion.distill.detect_bundles import ship_bundle
    from bastion.models.keys import generate_keypair, load_private_key
    from bastion.models.trust import TrustStore
    from bastion.runtime.bundle_create import create_bundle

    teacher = Bundle.open("yolov5n")
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(teacher.model_path.read_bytes())
    fields = {**teacher.manifest.model_dump(mode="json", exclude={"files", "evaluation"}), "precision": "int8"}
    made = tmp_path / "baselines" / "sliced-int8-320"
    create_bundle(teacher.model_path, made, fields, [], None, fp32_sibling=fp32)
    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    chosen = Candidate("sliced-int8@320", "sliced, INT8", 320, 0.5, 0.3, {}, "baselines/sliced-int8-320", 2.0)
    dataset = SimpleNamespace(root=tmp_path / "val", sha256=lambda: "0" * 64)
    ship_bundle(made, tmp_path / "bundle", load_private_key(pair.private_path), chosen, dataset)
    shipped = Bundle.open(tmp_path / "bundle")  # verified: signature and every file's hash
    roles = {f.role: f.path for f in shipped.manifest.files}
    assert roles.get("fp32-sibling") == "fp32.onnx" and (tmp_path / "bundle" / "fp32.onnx").is_file()
    assert {e.metric for e in shipped.manifest.evaluation} == {"mAP50", "mAP50-95"}


def test_a_class_without_labels_gets_no_ap_bar():
    """The evaluator leaves out a class the held-out set has no labels of; the chart must get None there (drawn as
    "no labels"), not 0.00, which would claim the model scored nothing on it."""
    from types import SimpleNamespace

    from bastion.distill.detect_report import per_class_series

    scored = SimpleNamespace(name="student@320", per_class={"person": {"ap50": 0.71, "instances": 18}})
    unscored = SimpleNamespace(name="sliced@320", per_class={})
    assert per_class_series([scored, unscored], ["person", "vehicle"]) == {"student@320": [0.71, None]}


def test_the_int8_speed_up_in_the_report_is_the_tables():
    from types import SimpleNamespace

    from bastion.distill.detect_report import int8_speed_note

    fp32 = SimpleNamespace(name="student@320", latency_ms=59.8)
    int8 = SimpleNamespace(name="student-int8@320", latency_ms=59.5)
    note = int8_speed_note("student", [fp32, int8], 320)
    assert "INT8 59.5 ms vs FP32 59.8 ms, 1.01×" in note  # not the gate's 1.32× timed alone
    assert int8_speed_note("sliced", [fp32, int8], 320) == ""  # no such pair: nothing claimed
