"""The teachers over a Ray cluster: Ray Data ``map_batches`` over ONNX Runtime actors (the ``[scale]`` extra).

Why Ray Data actors: each actor opens the teachers' ONNX Runtime sessions once (from the verified bundles, as the
single labeller does) and then labels batch after batch; the same code runs on a laptop's cores, a GPU server and
a cluster started with ``ray start``, and Ray schedules the actors, streams the results back in order and restarts
a lost worker. The driver writes every file (``pseudo.build_dataset``): the actors hand back the fused float32
arrays as raw bytes, so the labels are byte for byte the single process's.

The cluster itself (a private local one, offline and on loopback only, or a running one joined) is
``ray_session.RaySession``, shared with ``eval detect --on ray`` (``ray_eval.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from bastion.distill.classmap import ClassMap
from bastion.distill.labellers import TEACHER_CONF, Fused, LabellerChoice, Outcome, fuse_one
from bastion.distill.ray_session import RaySession, require_ray  # noqa: F401  (require_ray: distill/cli.py)
from bastion.errors import ConfigError
from bastion.models.bundle import Bundle

log = logging.getLogger(__name__)


class TeacherActor:
    """One Ray actor: the teachers' sessions, built once, run over batches of image paths.

    Returns per image its path, why it could not be read ("" when it could) and the fused arrays as raw bytes —
    bytes, not floats, so nothing on the way (Arrow, pickling, another machine's numpy) can round them."""

    def __init__(self, teachers: list[Bundle], maps: list[ClassMap], threads: int | None) -> None:
        from bastion.runtime.detect import Detector

        self.maps = maps
        # Bundle.model_bytes() re-reads and re-hashes every model file against the manifest verified by the driver
        self.detectors = [Detector.from_bundle(b, conf=TEACHER_CONF, threads=threads) for b in teachers]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"path": [], "error": [], "boxes": [], "scores": [], "labels": []}
        for p in batch["path"]:
            outcome = fuse_one(Path(str(p)), self.detectors, self.maps, None)
            cols["path"].append(str(p))
            if isinstance(outcome, str):
                cols["error"].append(outcome or "unreadable")
                cols["boxes"].append(b"")
                cols["scores"].append(b"")
                cols["labels"].append(b"")
                continue
            cols["error"].append("")
            cols["boxes"].append(np.ascontiguousarray(outcome.boxes, np.float32).tobytes())
            cols["scores"].append(np.ascontiguousarray(outcome.scores, np.float32).tobytes())
            cols["labels"].append(np.ascontiguousarray(outcome.labels, np.int64).tobytes())
        return {k: np.array(v, dtype=object) for k, v in cols.items()}


def decode(row: dict) -> Outcome:
    """An actor's row back into the arrays the single labeller would have returned."""
    if row["error"]:
        return str(row["error"])
    return Fused(
        np.frombuffer(row["boxes"], np.float32).reshape(-1, 4).copy(),
        np.frombuffer(row["scores"], np.float32).copy(),
        np.frombuffer(row["labels"], np.int64).copy(),
    )


class RayLabeller:
    """The teacher ensemble as Ray Data actors; yields each image's fused boxes in the order it was given them."""

    def __init__(self, choice: LabellerChoice, teachers: list[Bundle], maps: list[ClassMap]) -> None:
        sealed = [b.manifest.name for b in teachers if b.manifest.sealed is not None]
        if sealed:
            raise ConfigError(
                f"teacher {sealed[0]} is sealed: its weights are opened only where its unit key is",
                "label with --labeller single on the machine that holds the key",
            )
        self.teachers, self.maps = teachers, maps
        self.session = RaySession(choice)
        self.workers = self.session.workers

    def fuse(self, paths: Sequence[Path]) -> Iterator[tuple[Path, Outcome]]:
        threads = None if self.session.gpus else 1
        rows = self.session.ordered_map(
            [{"path": str(p)} for p in paths], TeacherActor, (self.teachers, self.maps, threads)
        )
        for path, row in zip(paths, rows):
            yield path, decode(row)

    def describe(self) -> dict:
        return self.session.describe()

    def close(self) -> None:
        self.session.close()
