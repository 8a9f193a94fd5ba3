"""A distillation run directory: stages that are cached, resumable and recorded in ``run.json``, and the folder's
layout, named once.

Each stage writes into ``RUN_DIR/<stage>/`` via a staging directory renamed into
place when the stage succeeds, then records itself in ``run.json`` (atomically).
Re-running skips finished stages; ``--force STAGE`` redoes one (and everything
after it).  A stage killed half-way leaves no half-written artefacts.

``DetectRunDir`` and ``LMRunDir`` name where each file of a detector or a language-model run lives, so no stage
spells a path by hand and the report, the tests and the docs read the same places.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from bastion.models.atomic import atomic_write_bytes


class RunDir:
    """Stages over one run folder: ``done``/``result``/``stage``/``record``; subclasses add the folder's layout."""

    def __init__(self, root: Path, stages: list[str], force: set[str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stages = stages
        self.path = self.root / "run.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}
        for name in self._forced(force or set()):
            self.state["stages"].pop(name, None)
            shutil.rmtree(self.root / name, ignore_errors=True)
        self._save()

    def _forced(self, force: set[str]) -> list[str]:
        if not force:
            return []
        first = min(self.stages.index(f) for f in force)
        return self.stages[first:]

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") == "done" and (self.root / stage).is_dir()

    def result(self, stage: str) -> dict[str, Any]:
        return self.state["stages"].get(stage, {}).get("result", {})

    def dir(self, stage: str) -> Path:
        return self.root / stage

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yields (staging dir, result dict to fill); on success the dir is renamed to RUN/<name>."""
        staging = self.root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        result: dict[str, Any] = {}
        started = time.time()
        self.state["stages"][name] = {"status": "running", "started": started}
        self._save()
        try:
            yield staging, result
        except BaseException as exc:
            self.state["stages"][name] = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "started": started,
            }
            self._save()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self.state["stages"][name] = {"status": "done", "seconds": round(time.time() - started, 2), "result": result}
        self._save()

    def record(self, key: str, value: Any) -> None:
        self.state[key] = value
        self._save()

    def _save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.state, indent=2, default=str).encode())


class DetectRunDir(RunDir):
    """``bastion distill detect``'s folder: teachers/ labels/ student/ baselines/ (every candidate) report/ bundle/."""

    STAGES = ["teachers", "labels", "student", "baselines", "report"]

    def __init__(self, root: Path, force: set[str] | None = None) -> None:
        super().__init__(root, self.STAGES, force)

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def data_yaml(self) -> Path:
        return self.labels / "data.yaml"

    @property
    def dataset_json(self) -> Path:
        return self.labels / "dataset.json"  # pseudo.DATASET_MANIFEST: every image and label, by hash

    @property
    def train_images(self) -> Path:
        return self.labels / "images" / "train"

    @property
    def held_out_images(self) -> Path:
        return self.labels / "images" / "val"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def candidates(self) -> Path:
        return self.root / "baselines"  # the stage is called baselines: --force baselines re-measures them

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"  # the shipped candidate, signed when a key is given


class LMRunDir(RunDir):
    """``bastion distill lm``'s folder: corpus.txt, checkpoint.pt (resumes), bundle/, bundle-int8/, student.gguf,
    report.json/.md, curves.png. Its work caches by file (the corpus, the checkpoint), not by stage."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, [])

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.txt"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def bundle_int8(self) -> Path:
        return self.root / "bundle-int8"

    @property
    def gguf(self) -> Path:
        return self.root / "student.gguf"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"
