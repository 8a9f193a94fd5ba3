"""Measure INT8 recipes on this machine: mAP50 drop and speed-up of each against FP32.

Usage: .venv/bin/python scripts/int8_sweep.py DATA.yaml CALIB_DIR OUT.jsonl [--model yolov5n] [--imgsz 320]
       [--limit 32] [--recipes u8s8,u8s8-7bit,...] [--calib-counts 32,64,128]

One JSON line per (recipe, calibration count) is appended to OUT.jsonl as soon as it is measured, with the CPU
class it ran on, so a long sweep can be read while it runs.  The numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bastion.distill.datasets import load_data_yaml
from bastion.distill.evaluate import EvalSettings, evaluate_detector, latency_ms
from bastion.distill.int8_gate import static_manifest
from bastion.distill.int8_recipe import RECIPES
from bastion.distill.quantize import quantize_int8
from bastion.hardware.isa import probe_isa
from bastion.models.bundle import Bundle
from bastion.runtime.backends import open_backend
from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.media import list_images, read_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--calib-counts", default="32")
    args = ap.parse_args()
    bundle = Bundle.open(args.model)
    dataset = load_data_yaml(args.data, "val", args.limit)
    opts = dict(conf=0.001, iou=0.6, multi_label=True, scaleup=False, imgsz=args.imgsz, rect=False)
    settings = EvalSettings(imgsz=args.imgsz, rect=False)
    base = Detector(open_backend(bundle.model_path, threads=1), bundle.manifest, DetectOptions(**opts))
    fp32 = evaluate_detector(base, dataset, settings)
    sample = [read_image(p) for p in dataset.images[:16]]
    isa = probe_isa().name
    images = list_images(args.calib)
    for count in [int(c) for c in args.calib_counts.split(",")]:
        for name in args.recipes.split(","):
            recipe = RECIPES[name]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "int8.onnx"
                t = time.perf_counter()
                quantize_int8(base, bundle.model_path, images[:count], path, (args.imgsz, args.imgsz), recipe)
                quantize_s = time.perf_counter() - t
                int8 = Detector(
                    open_backend(path, threads=1), static_manifest(bundle.manifest, args.imgsz), DetectOptions(**opts)
                )
                report = evaluate_detector(int8, dataset, settings)
                latency = latency_ms({"fp32": base, "int8": int8}, sample)
                int8.close()
            row = {
                "recipe": name,
                "describe": recipe.describe(),
                "calibration_images": count,
                "isa": isa,
                "fp32_map50": round(fp32.map50, 4),
                "int8_map50": round(report.map50, 4),
                "drop_points": round((fp32.map50 - report.map50) * 100, 2),
                "fp32_ms": round(latency["fp32"], 2),
                "int8_ms": round(latency["int8"], 2),
                "speedup": round(latency["fp32"] / latency["int8"], 3),
                "quantize_s": round(quantize_s, 1),
            }
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
