"""Maintainers' script: (re)write models/zoo/*/manifest.json from the vendored files.

Afterwards the zoo must be re-signed (scripts/sign_zoo.py) or every load refuses it.

Run from the repository root after replacing a vendored file:
    .venv/bin/python scripts/zoo_manifests.py
The facts (interface, licenses, provenance) come from each folder's SOURCE.md.
"""

from __future__ import annotations

from pathlib import Path

from bastion.models.manifest import (
    DatasetRef,
    EvalResult,
    FileEntry,
    InputSpec,
    LicenseInfo,
    Manifest,
    Provenance,
    Thresholds,
    YoloDecoderSpec,
    sha256_file,
    write_manifest,
)

ZOO = Path("models/zoo")
COCO80 = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]
COCO128_SHA = "824456f57415f7720bfa75cc0dbd0de6144d94d538a01387b6622443da5b997a"  # DatasetRef/YoloDataset.sha256
EVAL_SETTINGS = {"conf": 0.001, "iou": 0.6, "max_det": 300, "rect": True, "tool": "bastion eval detect 0.1.0"}
COCO_DATA = DatasetRef(
    name="COCO train2017", license="annotations CC BY 4.0; images per Flickr terms", source="https://cocodataset.org"
)


def entries(folder: Path, roles: dict[str, str]) -> list[FileEntry]:
    return [
        FileEntry(path=name, sha256=sha256_file(folder / name), size=(folder / name).stat().st_size, role=role)
        for name, role in roles.items()
    ]


def yolov5n() -> Manifest:
    folder = ZOO / "yolov5n"
    return Manifest(
        name="yolov5n",
        version="6.1-coco",
        task="detect",
        files=entries(folder, {"yolov5n-dynamic.onnx": "model", "LICENSE": "license", "SOURCE.md": "source"}),
        input=InputSpec(
            name="images",
            shape=[None, 3, None, None],
            color="RGB",
            scale=1 / 255,
            size=(640, 640),
            stride=32,
            pad_value=114,
            pad_position="center",
            dynamic_hw=True,
        ),
        decoder=YoloDecoderSpec(type="yolov5", strides=[8, 16, 32]),
        classes=COCO80,
        thresholds=Thresholds(conf=0.25, iou=0.45, max_det=300),
        precision="fp32",
        provenance=Provenance(
            source="ultralytics/yolov5 refs/pull/8789/head @981548a1 yolov5n.pt, exported with the commit's own "
            "export.py --imgsz 640 --opset 17 --dynamic (torch 2.13.0+cpu); see SOURCE.md",
            datasets=[COCO_DATA],
            command="python export.py --weights yolov5n.pt --include onnx --imgsz 640 --opset 17 --dynamic",
            notes="Vendored from ../shared/weights/yolov5n (yolov5n-dynamic.onnx).",
            bastion_version="0.1.0",
            created="2026-11-23T00:00:00Z",
        ),
        license=LicenseInfo(
            weights="GPL-3.0",
            data="COCO: annotations CC BY 4.0, images Flickr terms",
            files=["LICENSE"],
            notes="GPL-3.0 at the source commit; upstream later relicensed to AGPL-3.0.",
        ),
        evaluation=[
            EvalResult(metric="mAP50-95", value=0.280, dataset="COCO val2017 (upstream README, 640 px)"),
            EvalResult(
                metric="mAP50-95",
                value=0.3493,
                dataset="COCO128",
                dataset_sha256=COCO128_SHA,
                settings={**EVAL_SETTINGS, "imgsz": 640},
            ),
            EvalResult(
                metric="mAP50",
                value=0.546,
                dataset="COCO128",
                dataset_sha256=COCO128_SHA,
                settings={**EVAL_SETTINGS, "imgsz": 640},
            ),
        ],
    )


def yolox_nano() -> Manifest:
    folder = ZOO / "yolox_nano"
    return Manifest(
        name="yolox_nano",
        version="0.1.1-coco",
        task="detect",
        files=entries(folder, {"yolox_nano.onnx": "model", "LICENSE-YOLOX-upstream": "license", "SOURCE.md": "source"}),
        input=InputSpec(
            name="images",
            shape=[1, 3, 416, 416],
            color="BGR",
            scale=1.0,
            size=(416, 416),
            stride=32,
            pad_value=114,
            pad_position="top-left",
            dynamic_hw=False,
        ),
        decoder=YoloDecoderSpec(type="yolox", strides=[8, 16, 32]),
        classes=COCO80,
        thresholds=Thresholds(conf=0.25, iou=0.45, max_det=300),
        precision="fp32",
        provenance=Provenance(
            source="Bigisland1729/object-detection-models @7f3f2fa3 yolox_nano.onnx (an export of Megvii's "
            "official YOLOX-Nano COCO weights; bit-identical outputs to an independent export); see SOURCE.md",
            datasets=[COCO_DATA],
            notes="Vendored from ../shared/weights/yolox_nano.",
            bastion_version="0.1.0",
            created="2026-11-23T00:00:00Z",
        ),
        license=LicenseInfo(
            weights="Apache-2.0",
            data="COCO: annotations CC BY 4.0, images Flickr terms",
            files=["LICENSE-YOLOX-upstream"],
            notes="Source repo has no LICENSE; YOLOX upstream is Apache-2.0.",
        ),
        evaluation=[
            EvalResult(metric="mAP50-95", value=0.258, dataset="COCO val2017 (upstream README, 416 px)"),
            EvalResult(
                metric="mAP50-95",
                value=0.3323,
                dataset="COCO128",
                dataset_sha256=COCO128_SHA,
                settings={**EVAL_SETTINGS, "imgsz": 416},
            ),
            EvalResult(
                metric="mAP50",
                value=0.5088,
                dataset="COCO128",
                dataset_sha256=COCO128_SHA,
                settings={**EVAL_SETTINGS, "imgsz": 416},
            ),
        ],
    )


if __name__ == "__main__":
    for make in (yolov5n, yolox_nano):
        manifest = make()
        write_manifest(manifest, ZOO / manifest.name / "manifest.json")
        print("wrote", manifest.name, manifest.sha256()[:12])
