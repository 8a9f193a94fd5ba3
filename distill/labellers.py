"""Who runs the teachers over the images: this process (``single``) or a Ray cluster (``ray[:ADDRESS]``).

The labels stage (``pseudo.build_dataset``) asks a labeller for each image's fused teacher boxes and writes every
file itself: one writer, one float formatting, so the ``labels/`` tree is the same whoever computed the boxes. A
labeller only runs the teachers (read, detect, narrow, fuse) and hands back the exact float32 arrays, in the order
it was given the images. ``LABELLERS`` is the registry ``--labeller`` picks from; Ray is imported only when the
``ray`` labeller is chosen (the ``[scale]`` extra), never by the field-node packages.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np

from bastion.errors import ConfigError

if TYPE_CHECKING:  # light at import: the CLI reads LABELLER_HELP and the spec parse_labeller
    from bastion.distill.classmap import ClassMap
    from bastion.models.bundle import Bundle
    from bastion.runtime.detect import Detector

log = logging.getLogger(__name__)
TEACHER_CONF = 0.05  # teachers keep low-confidence boxes: the soft scores and the fusion need them
LABELLER_HELP = (
    "Who runs the teachers over --images: single (this process), ray (a local Ray cluster, one worker per core), "
    "ray:auto or ray:HOST:PORT (a running Ray cluster; needs the scale extra). Same labels either way. "
    "See docs/scale.md."
)
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


@dataclass(frozen=True)
class LabellerChoice:
    """``--labeller`` parsed: which labeller, and for Ray where the cluster is (None: start a local one)."""

    kind: str = "single"
    address: str | None = None  # "auto" or "HOST:PORT"; None with kind "ray": a local cluster for this run
    workers: int | None = None  # Ray actors; None: one per CPU core (or per GPU) of the cluster

    def describe(self) -> dict:
        """What the run records about who labelled (``run.json``, the labels stage)."""
        if self.kind == "single":
            return {"kind": "single"}
        return {"kind": self.kind, "address": self.address or "local", "workers": self.workers}


@dataclass(frozen=True)
class Flags:
    """How a command that can run on Ray names it, for its one-line errors (``--labeller`` / ``eval --on``)."""

    flag: str = "--labeller"  # "--labeller ray:…" / "--on ray:…"
    workers: str = "--labeller-workers"
    noun: str = "labeller"  # "unknown labeller"
    what: str = "the Ray labeller"  # "the Ray labeller failed: …"


LABELLER_FLAGS = Flags()
EVAL_FLAGS = Flags(flag="--on", workers="--workers", noun="place to run", what="the evaluation on Ray")


def parse_labeller(text: str, workers: int | None = None, flags: Flags = LABELLER_FLAGS) -> LabellerChoice:
    """``single`` | ``ray`` | ``ray:auto`` | ``ray:HOST:PORT``; anything else is one line naming the forms."""
    value = (text or "").strip()
    flag = flags.flag
    forms = "give single, ray, ray:auto or ray:HOST:PORT (e.g. ray:10.0.0.1:6379)"
    if workers is not None and not 1 <= workers <= 4096:
        raise ConfigError(f"{flags.workers} {workers}: give 1 to 4096 Ray workers")
    if value == "single":
        if workers is not None:
            raise ConfigError(f"{flags.workers} goes with {flag} ray: single is one process")
        return LabellerChoice()
    kind, has_address, address = value.partition(":")
    if kind != "ray":
        raise ConfigError(f"{flag} {text!r}: unknown {flags.noun}", forms)
    if not has_address:
        return LabellerChoice("ray", None, workers)
    if address == "auto":
        return LabellerChoice("ray", "auto", workers)
    if address.startswith("//"):
        raise ConfigError(
            f"{flag} {text!r}: Ray Client (ray://) is not supported",
            "run bastion on a node of the cluster and give ray:auto or ray:HOST:PORT (the GCS port, 6379)",
        )
    host, sep, port = address.rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {text!r}: not a Ray address", forms)
    return LabellerChoice("ray", f"{host}:{int(port)}", workers)


@dataclass(frozen=True)
class Fused:
    """One image's teachers, narrowed and fused: normalised xyxy [N,4] float32, scores [N] float32, classes [N]."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# what a labeller hands back per image: the fused boxes, or why the image could not be read
Outcome = Fused | str


class Labeller(Protocol):
    """Runs the teacher ensemble over images; yields ``(path, Fused | reason unreadable)`` in the given order."""

    def fuse(self, paths: Sequence[Path]) -> Iterator[tuple[Path, Outcome]]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def fuse_one(path: Path, detectors: list[Detector], maps: list[ClassMap], weights: list[float] | None) -> Outcome:
    """Read ``path`` and fuse every teacher on it — the one function both labellers run per image."""
    from bastion.distill.pseudo import fused_boxes
    from bastion.runtime.media import read_image

    try:
        image = read_image(path)
    except Exception as exc:  # corrupt: skipped, counted, reported by the labels stage
        return str(exc)
    return Fused(*fused_boxes(image, detectors, maps, weights))


class SingleLabeller:
    """The teachers in this process, one image after the other (the default; what Ray is compared against)."""

    def __init__(self, teachers: list[Bundle], maps: list[ClassMap], weights: list[float] | None = None) -> None:
        from bastion.runtime.detect import Detector

        self.maps, self.weights = maps, weights
        self.detectors: list[Detector] = []
        try:
            for b in teachers:  # verified by the teachers stage; the backend is built from hashed bytes
                self.detectors.append(Detector.from_bundle(b, conf=TEACHER_CONF))
        except BaseException:
            self.close()
            raise

    def fuse(self, paths: Sequence[Path]) -> Iterator[tuple[Path, Outcome]]:
        for path in paths:
            yield path, fuse_one(path, self.detectors, self.maps, self.weights)

    def describe(self) -> dict:
        return {"kind": "single"}

    def close(self) -> None:
        for d in self.detectors:
            d.close()
        self.detectors = []


def _single(choice: LabellerChoice, teachers: list[Bundle], maps: list[ClassMap]) -> Labeller:
    return SingleLabeller(teachers, maps)


def _ray(choice: LabellerChoice, teachers: list[Bundle], maps: list[ClassMap]) -> Labeller:
    from bastion.distill.ray_labeller import RayLabeller  # lazy: Ray is the [scale] extra

    return RayLabeller(choice, teachers, maps)


LABELLERS: dict[str, Callable[[LabellerChoice, list[Bundle], list[ClassMap]], Labeller]] = {
    "single": _single,
    "ray": _ray,
}


@contextmanager
def open_labeller(choice: LabellerChoice, teachers: list[Bundle], maps: list[ClassMap]) -> Iterator[Labeller]:
    """The chosen labeller, closed (a local Ray cluster shut down) however the block ends — Ctrl-C included."""
    labeller = LABELLERS[choice.kind](choice, teachers, maps)
    try:
        yield labeller
    finally:
        labeller.close()
