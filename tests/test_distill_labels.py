"""Class narrowing and weighted boxes fusion against hand-computed cases."""

import numpy as np
import pytest

from bastion.distill.classmap import ClassMap, parse_class_map
from bastion.distill.wbf import weighted_boxes_fusion
from bastion.errors import ConfigError

COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]


def test_class_map_narrows_and_merges():
    cm = ClassMap.build(COCO, ["person", "vehicle"], parse_class_map("car=vehicle,truck=vehicle,bus=vehicle"))
    assert cm.to_student == {0: 0, 2: 1, 5: 1, 7: 1}
    assert cm.groups() == [[0], [2, 5, 7]]


def test_class_map_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no teacher knows 'tank'"):
        ClassMap.build(COCO, ["person", "tank"])
    with pytest.raises(ConfigError, match="'vehicle' is not one of --classes"):
        ClassMap.build(COCO, ["person"], {"car": "vehicle"})
    with pytest.raises(ConfigError, match="must look like"):
        parse_class_map("car:vehicle")


def test_wbf_single_model_is_identity_and_two_models_average():
    b = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    boxes, scores, labels = weighted_boxes_fusion([b], [np.array([0.9, 0.6])], [np.array([0, 1])])
    np.testing.assert_allclose(boxes, b)
    np.testing.assert_allclose(scores, [0.9, 0.6])
    # two models agree on one object: coordinates averaged by score, score averaged (both saw it)
    boxes, scores, labels = weighted_boxes_fusion(
        [np.array([[0, 0, 10, 10]]), np.array([[2, 0, 12, 10]])],
        [np.array([0.9]), np.array([0.3])],
        [np.array([0]), np.array([0])],
    )
    np.testing.assert_allclose(boxes, [[0.5, 0, 10.5, 10]])  # (0*.9 + 2*.3) / 1.2 = 0.5
    np.testing.assert_allclose(scores, [0.6])


def test_wbf_penalises_boxes_only_some_models_saw_and_keeps_labels_apart():
    boxes, scores, labels = weighted_boxes_fusion(
        [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))],
        [np.array([0.8]), np.zeros(0)],
        [np.array([0]), np.zeros(0)],
        weights=[1, 3],
    )
    np.testing.assert_allclose(scores, [0.8 * 1 / 4])
    boxes, scores, labels = weighted_boxes_fusion(
        [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]])],
        [np.array([0.8]), np.array([0.7])],
        [np.array([0]), np.array([1])],
    )
    assert sorted(labels.tolist()) == [0, 1] and len(boxes) == 2  # same place, different class: not fused


def test_sliced_teacher_head_keeps_exactly_the_teachers_scores(tmp_path):
    pytest.importorskip("onnx")
    from bastion import Detector
    from bastion.distill.slice import slice_head
    from bastion.models import Bundle
    from bastion.runtime.backends import open_backend
    from bastion.runtime.detect import DetectOptions
    from conftest import SAMPLE_IMAGES

    teacher = Bundle.open("yolov5n")
    cm = ClassMap.build(
        teacher.manifest.classes, ["person", "vehicle"], {"car": "vehicle", "truck": "vehicle", "bus": "vehicle"}
    )
    out = slice_head(teacher.model_path, tmp_path / "sliced.onnx", "yolov5", cm)
    manifest = teacher.manifest.model_copy(update={"classes": cm.student})
    opts = dict(conf=0.05, multi_label=True)
    sliced = Detector(open_backend(out, threads=1), manifest, DetectOptions(**opts))
    full = Detector.load("yolov5n", threads=1, **opts)
    for image in sorted(SAMPLE_IMAGES.glob("*.jpg")):
        a = sliced.detect(image).filter(classes=["person"])
        b = full.detect(image).filter(classes=["person"])
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-3)
        np.testing.assert_allclose(a.conf, b.conf, atol=1e-6)
        vehicles = sliced.detect(image).filter(classes=["vehicle"])
        merged = full.detect(image).filter(classes=["car", "truck", "bus"])
        # each vehicle score is the best of car/truck/bus for that anchor: never below the best single match
        if len(merged):
            assert vehicles.conf.max() >= merged.conf.max() - 1e-6
    assert sliced.backend.outputs[0].shape[-1] == 7


def test_choose_ships_the_best_or_the_fastest_near_it():
    from bastion.distill.candidates import Candidate, choose

    def cand(name, map50, latency, kind="student"):
        return Candidate(name, kind, 320, map50, map50 / 2, {}, f"baselines/{name}", 1.0, latency_ms=latency)

    c = [cand("big", 0.55, 30), cand("mid", 0.50, 12), cand("small", 0.47, 7), cand("bad", 0.2, 5)]
    assert choose(c, 0.0, None, None).name == "big"
    assert choose(c, 0.0, 10, None).name == "small"
    assert choose(c, 0.0, None, 6).name == "mid"  # fastest within 6 points of 0.55
    assert choose(c, 0.0, None, 10).name == "small"
    assert choose(c, 0.6, None, None) is None
    teacher = cand("teacher@640", 0.60, 33, kind="teacher")
    assert choose([teacher, *c], 0.0, None, None).name == "big"  # the teacher is the reference, not the product
    assert choose([teacher, *c], 0.0, None, 6).name == "big"  # within 6 points of the teacher's 0.60
    assert choose([teacher, *c], 0.0, None, 3) is None  # nothing distilled comes within 3 points
