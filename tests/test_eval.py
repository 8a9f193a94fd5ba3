"""Detection metrics: the COCO evaluator on known answers, and a regression on real COCO128."""

import json

import numpy as np
import pytest

from bastion.distill.evaluate import batch_shapes, bootstrap_map50, coco_map
from conftest import run_cli

NAMES = ["person", "car"]


def gt_set():
    images = [{"id": i, "width": 640, "height": 480} for i in (1, 2)]
    boxes = [(1, 0, [10, 10, 100, 200]), (1, 1, [300, 200, 120, 80]), (2, 0, [50, 60, 40, 90])]
    anns = [
        {"id": k + 1, "image_id": img, "category_id": c + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (img, c, b) in enumerate(boxes)
    ]
    return images, anns


def test_perfect_predictions_score_one_and_shifted_ones_less():
    images, anns = gt_set()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in anns
    ]
    m, m50, per_class = coco_map(images, anns, perfect, NAMES)
    assert m == pytest.approx(1.0) and m50 == pytest.approx(1.0)
    assert per_class["person"]["instances"] == 2
    shifted = [{**p, "bbox": [p["bbox"][0] + p["bbox"][2] * 0.2, *p["bbox"][1:]]} for p in perfect]
    m_s, m50_s, _ = coco_map(images, anns, shifted, NAMES)
    assert m50_s == pytest.approx(1.0) and m_s < 0.8  # IoU ~0.67: counts at .5, not at .75+
    wrong_class = [{**p, "category_id": 3 - p["category_id"]} for p in perfect]
    assert coco_map(images, anns, wrong_class, NAMES)[0] == 0.0
    assert coco_map(images, anns, [], NAMES)[0] == 0.0


def test_bootstrap_interval_brackets_the_score_and_narrows_with_more_images():
    """Half the images predicted perfectly, half missed: mAP50 ~0.5, and the resampled interval is wide on 8
    images, narrower on 64, always around the point value, and drawn the same way for a fixed seed."""
    rng = np.random.default_rng(3)

    def case(n: int) -> tuple[list, list, list]:
        images = [{"id": i, "width": 640, "height": 480} for i in range(1, n + 1)]
        anns, preds = [], []
        for i in range(1, n + 1):
            box = [float(v) for v in rng.integers(10, 300, 2)] + [80.0, 120.0]
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": box, "area": 9600.0, "iscrowd": 0})
            hit = box if i % 2 else [box[0] + 300, box[1], 80.0, 120.0]  # odd images found, even ones missed
            preds.append({"image_id": i, "category_id": 1, "bbox": hit, "score": 0.3 + 0.6 * (i % 2)})
        return images, anns, preds

    small, large = case(8), case(64)
    point = coco_map(*small, NAMES)[1]
    narrow, wide = bootstrap_map50(*large, NAMES, 100, 60), bootstrap_map50(*small, NAMES, 100, 60)
    assert wide.low <= point <= wide.high and wide.rounds == 60
    assert wide.high - wide.low > narrow.high - narrow.low > 0
    assert bootstrap_map50(*small, NAMES, 100, 60) == wide


def test_rect_batch_shapes_follow_yolov5():
    hw = np.array([[480, 640], [427, 640], [640, 480], [640, 640]], dtype=float)
    order, shapes = batch_shapes(hw, 640, 32, batch=2, pad=0.5)
    # sorted by h/w: 427/640, 480/640 | 1.0, 640/480
    assert order.tolist() == [1, 0, 3, 2]
    assert shapes[:2].tolist() == [[512, 672], [512, 672]]
    assert shapes[2:].tolist() == [[672, 672], [672, 672]]


@pytest.mark.slow
def test_yolov5n_on_coco128_regression(coco128):
    """Full COCO128 at 640 with the upstream val settings; the value is recorded in docs/benchmarks.md."""
    proc = run_cli("eval", "detect", "--model", "yolov5n", "--data", str(coco128), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == 128 and report["instances"] == 929
    assert report["map50_95"] == pytest.approx(0.349, abs=0.01)
    assert report["map50"] == pytest.approx(0.546, abs=0.01)
    assert report["per_class"]["person"]["instances"] == 254
    assert len(report["dataset_sha256"]) == 64


def test_eval_subset_and_bad_dataset(coco128, tmp_path):
    proc = run_cli(
        "eval",
        "detect",
        "--model",
        "yolox_nano",
        "--data",
        str(coco128),
        "--limit",
        "16",
        "--imgsz",
        "416",
        "--bootstrap",
        "50",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == 16 and 0.2 < report["map50"] <= 1.0
    interval = report["map50_interval"]  # 16 images: a wide range around the point value
    assert interval["rounds"] == 50 and interval["low"] < report["map50"] < interval["high"]
    bad = tmp_path / "data.yaml"
    bad.write_text("names: [a]\n")
    proc = run_cli("eval", "detect", "--data", str(bad))
    assert proc.returncode == 1 and "needs 'val:'" in proc.stderr and "Traceback" not in proc.stderr
