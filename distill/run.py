"""A distillation run directory: stages that are cached, resumable and recorded in ``run.json``, and the folder's
layout, named once.

Each stage writes into ``RUN_DIR/<stage>/`` via a staging directory renamed into
place when the stage succeeds, then records itself in ``run.json`` (atomically).
Re-running skips finished stages; ``--force STAGE`` redoes one (and everything
after it).  A stage killed half-way leaves no half-written artefacts.  A stage
whose result depends on settings of the run (``STAGE_INPUTS``: the candidates on
the INT8 target) records them, and a re-run with other values redoes it (and
everything after it) instead of reusing what was measured for the old ones.

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
    """Stages over one run folder: ``done``/``result``/``stage``/``record``; subclasses add the folder's layout.

    ``STAGE_INPUTS``: per stage, the keys of the recorded ``spec`` (``record("spec", …)``, before the stages run)
    its result depends on; they are stored with the stage and a change makes it, and every later stage, not done.
    """

    STAGE_INPUTS: dict[str, tuple[str, ...]] = {}

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
        return (
            self.state["stages"].get(stage, {}).get("status") == "done"
            and (self.root / stage).is_dir()
            and not self.stale(stage)
        )

    def inputs(self, stage: str) -> dict[str, Any]:
        """The settings ``stage`` depends on, as this run's spec gives them now."""
        spec = self.state.get("spec") or {}
        return {key: spec.get(key) for key in self.STAGE_INPUTS.get(stage, ())}

    def stale(self, stage: str) -> str | None:
        """Why ``stage``'s cached result no longer applies ('int8_target was None, now x86-cpu'), or None: a setting
        it (or a stage before it) was measured with has changed since."""
        for name in self.stages[: self.stages.index(stage) + 1] if stage in self.stages else [stage]:
            entry = self.state["stages"].get(name, {})
            if entry.get("status") != "done" or name not in self.STAGE_INPUTS:
                continue
            then, now = entry.get("inputs"), self.inputs(name)
            if then is None:  # recorded before the stage stored its inputs: cannot tell, so measure again
                return f"{name} was cached without its settings"
            for key, value in now.items():
                if then.get(key) != value:
                    return f"{name} was measured with {key} {then.get(key)!r}, now {value!r}"
        return None

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
        if name in self.STAGE_INPUTS:
            self.state["stages"][name]["inputs"] = self.inputs(name)
        self._save()

    def record(self, key: str, value: Any) -> None:
        self.state[key] = value
        self._save()

    def _save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.state, indent=2, default=str).encode())


class DetectRunDir(RunDir):
    """``bastion distill detect``'s folder: teachers/ labels/ student/ baselines/ (every candidate) report/ bundle/."""

    STAGES = ["teachers", "labels", "student", "baselines", "report"]
    # the candidates include INT8 models gated for the target: another --target (or INT8 limit) measures them again
    STAGE_INPUTS = {"baselines": ("int8", "int8_target", "max_int8_drop")}

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
