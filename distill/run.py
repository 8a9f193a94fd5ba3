"""A distillation run directory: stages that are cached, resumable and recorded in ``run.json``.

Each stage writes into ``RUN_DIR/<stage>/`` via a staging directory renamed into
place when the stage succeeds, then records itself in ``run.json`` (atomically).
Re-running skips finished stages; ``--force STAGE`` redoes one (and everything
after it).  A stage killed half-way leaves no half-written artefacts.
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
