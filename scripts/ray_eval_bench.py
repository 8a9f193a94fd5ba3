"""Evaluation throughput: ``eval detect`` in one process vs on a local Ray cluster (#20 item 2, a benchmark).

Usage: .venv/bin/python scripts/ray_eval_bench.py DATA_YAML [--model yolov5n] [--imgsz 640] [--workers 2] [--rounds 2]

Scores the model on the ``val`` split of DATA_YAML, once in this process (ONNX Runtime's default threads) and once
on a fresh local Ray cluster of ``--workers`` single-threaded actors (what ``--on ray --workers N`` starts),
``--rounds`` times, and prints one JSON line per run: images/s of the evaluation itself (both image passes, the
metric), the cluster's start-up and shutdown apart, and the driver's own share (the COCO metric from predictions
already made) as the ceiling one driver puts on any cluster. It also checks that the two reports are identical.
The numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bastion.distill.datasets import load_data_yaml
from bastion.distill.evaluate import EvalSettings, evaluate_detector
from bastion.distill.labellers import LabellerChoice
from bastion.distill.ray_eval import RayEvalRunner, build_detector, open_session, open_source


class Replay:
    """An EvalRunner that hands back sizes and predictions made before: what the driver alone costs."""

    def __init__(self, sizes, outcomes):
        self._sizes, self._outcomes = sizes, outcomes

    def sizes(self, paths):
        return self._sizes

    def predict(self, plan):
        yield from self._outcomes


class Recorder:
    """The in-process runner, recording what it computed (for the driver-only replay)."""

    def __init__(self, detector, imgsz):
        from bastion.distill.evaluate import _image_hw, predict_image

        self.detector, self.imgsz, self._hw, self._predict = detector, imgsz, _image_hw, predict_image
        self.recorded_sizes, self.recorded = [], []

    def sizes(self, paths):
        self.recorded = []
        self.recorded_sizes = [self._hw(p) for p in paths]
        return self.recorded_sizes

    def predict(self, plan):
        for path, shape in plan:
            self.recorded.append(self._predict(self.detector, path, shape, self.imgsz))
            yield self.recorded[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dataset = load_data_yaml(args.data, "val")
    settings = EvalSettings(imgsz=args.imgsz)
    options = {"conf": 0.001, "iou": 0.6, "max_det": 300, "imgsz": args.imgsz, "multi_label": True, "scaleup": False}
    source = open_source(args.model, allow_unsigned=False)
    detector = build_detector(source, "auto", None, False, options)
    n = len(dataset.images)
    base = {"images": n, "model": detector.manifest.name, "imgsz": args.imgsz, "cpus": os.cpu_count()}
    recorder = Recorder(detector, args.imgsz)
    for r in range(args.rounds):
        reports = {}
        for kind in ("single", "ray"):
            t0 = time.perf_counter()
            session = open_session(LabellerChoice("ray", None, args.workers)) if kind == "ray" else None
            try:
                t1 = time.perf_counter()
                if session is None:
                    runner = recorder
                else:
                    runner = RayEvalRunner(session, source, detector, "auto", None, options, args.imgsz)
                reports[kind] = evaluate_detector(detector, dataset, settings, runner=runner).to_dict()
                t2 = time.perf_counter()
            finally:
                if session is not None:
                    session.close()
            t3 = time.perf_counter()
            row = {
                **base,
                "round": r + 1,
                "on": kind,
                "workers": args.workers if kind == "ray" else 1,
                "start_s": round(t1 - t0, 2),
                "eval_s": round(t2 - t1, 2),
                "stop_s": round(t3 - t2, 2),
                "images_per_s": round(n / (t2 - t1), 2),
                "images_per_s_with_start": round(n / (t3 - t0), 2),
                "map50": reports[kind]["map50"],
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row), flush=True)
        print(json.dumps({"round": r + 1, "identical_reports": reports["single"] == reports["ray"]}), flush=True)
    # the driver's own cost per image: the plan, the ground truth and the COCO metric from predictions already made
    t0 = time.perf_counter()
    evaluate_detector(detector, dataset, settings, runner=Replay(recorder.recorded_sizes, recorder.recorded))
    dt = time.perf_counter() - t0
    print(json.dumps({**base, "on": "driver only (metric)", "images_per_s": round(n / dt, 1)}))
    detector.close()


if __name__ == "__main__":
    main()
