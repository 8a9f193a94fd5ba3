"""Pseudo-labelling throughput: the single-process labeller vs Ray on a local cluster (#20 item 2, a benchmark).

Usage: .venv/bin/python scripts/ray_label_bench.py IMAGES_DIR [--teacher yolov5n ...] [--workers 2] [--rounds 2]

Labels every image of IMAGES_DIR (no ground truth: every image pseudo-labelled) with the given teachers, once in
this process and once on a fresh local Ray cluster of ``--workers`` single-threaded actors, ``--rounds`` times,
and prints one JSON line per run: images/s of the labelling itself, the cluster start-up apart, and the driver's
own share (writing the files, from already fused boxes) as the ceiling one driver puts on any cluster. It also
checks the two label trees are identical. The numbers go to docs/benchmarks.md and docs/scale.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import tempfile
import time
from pathlib import Path

from bastion.distill.classmap import ClassMap
from bastion.distill.labellers import LabellerChoice, SingleLabeller, open_labeller
from bastion.distill.pseudo import build_dataset
from bastion.models.bundle import Bundle
from bastion.runtime.media import list_images

CLASSES = ["person", "vehicle"]
CLASS_MAP = {"car": "vehicle", "truck": "vehicle", "bus": "vehicle"}


class Replay:
    """A labeller that hands back boxes fused before: what the driver alone costs per image."""

    def __init__(self, outcomes):
        self.outcomes = outcomes

    def fuse(self, paths):
        yield from self.outcomes

    def describe(self):
        return {"kind": "replay"}

    def close(self):
        pass


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)[1]:
            return False
        stack.extend(c.subdirs.values())
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("--teacher", action="append", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    images = list_images(args.images)
    teachers = [Bundle.open(t) for t in args.teacher or ["yolov5n"]]
    maps = [ClassMap.build(b.manifest.classes, CLASSES, CLASS_MAP) for b in teachers]
    base = {"images": len(images), "teachers": [b.manifest.name for b in teachers], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            out = {}
            for kind, choice in (("single", LabellerChoice()), ("ray", LabellerChoice("ray", None, args.workers))):
                out[kind] = Path(tmp) / f"{kind}-{r}"
                t0 = time.perf_counter()
                with open_labeller(choice, teachers, maps) as labeller:
                    t1 = time.perf_counter()
                    build_dataset(images, None, labeller, maps, CLASSES, [0.25, 0.25], out[kind])
                    t2 = time.perf_counter()
                t3 = time.perf_counter()
                row = {
                    **base,
                    "round": r + 1,
                    "labeller": kind,
                    "workers": args.workers if kind == "ray" else 1,
                    "start_s": round(t1 - t0, 2),
                    "label_s": round(t2 - t1, 2),
                    "stop_s": round(t3 - t2, 2),
                    "images_per_s": round(len(images) / (t2 - t1), 2),
                    "images_per_s_with_start": round(len(images) / (t3 - t0), 2),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(row), flush=True)
            print(json.dumps({"round": r + 1, "identical_labels": same_tree(out["single"], out["ray"])}), flush=True)
        # the driver's own cost per image: the same files written from boxes already fused
        single = SingleLabeller(teachers, maps)
        try:
            outcomes = list(single.fuse(images))
        finally:
            single.close()
        t0 = time.perf_counter()
        build_dataset(images, None, Replay(outcomes), maps, CLASSES, [0.25, 0.25], Path(tmp) / "driver")
        dt = time.perf_counter() - t0
        print(json.dumps({**base, "labeller": "driver only (writing)", "images_per_s": round(len(images) / dt, 1)}))


if __name__ == "__main__":
    main()
