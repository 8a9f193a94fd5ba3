"""The TensorRT engine cache: engines are not portable, so every one is keyed by what it was built for.

Key = GPU name + compute capability + TensorRT version + bundle sha256 + precision + input shape profile.
``BASTION_HOME/engines/<key hash>/`` holds ``engine.plan`` and ``key.json`` (the full key and the plan's
sha256).  A lookup returns a plan only if ``key.json`` matches the requested key exactly and the plan's bytes
match their hash: an engine built on another GPU or TensorRT version, or a damaged file, is never loaded —
the caller rebuilds.  Writes are atomic.  One timing cache per GPU + TensorRT version speeds rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from bastion.models.atomic import atomic_write_bytes, file_lock
from bastion.models.home import bastion_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    compute_capability: str
    tensorrt: str
    bundle_sha256: str
    precision: str  # fp32 | fp16 | int8
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]  # (input, min, opt, max)

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:32]

    @classmethod
    def from_json(cls, data: dict) -> "EngineKey":
        shapes = tuple((s[0], tuple(s[1]), tuple(s[2]), tuple(s[3])) for s in data["shapes"])
        return cls(**{**data, "shapes": shapes})


class EngineCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else bastion_home() / "engines"

    def _dir(self, key: EngineKey) -> Path:
        return self.root / key.digest()

    def timing_cache_path(self, key: EngineKey) -> Path:
        safe = "".join(c if c.isalnum() else "_" for c in f"{key.gpu}-{key.compute_capability}-{key.tensorrt}")
        return self.root / "timing" / f"{safe}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached plan for exactly this key, or None (missing, stale, foreign or damaged)."""
        folder = self._dir(key)
        try:
            meta = json.loads((folder / "key.json").read_text())
            plan = (folder / "engine.plan").read_bytes()
        except (OSError, ValueError):
            return None
        try:
            stored = EngineKey.from_json(meta["key"])
        except (KeyError, TypeError):
            log.warning("engine cache entry %s is damaged; rebuilding", folder.name)
            return None
        if stored != key:
            log.warning("engine cache entry %s was built for another key; rebuilding", folder.name)
            return None
        if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            log.warning("engine %s does not match its hash (damaged); rebuilding", folder.name)
            return None
        return plan

    def store(self, key: EngineKey, plan: bytes) -> Path:
        folder = self._dir(key)
        with file_lock(self.root / ".lock"):
            atomic_write_bytes(folder / "engine.plan", plan)
            atomic_write_bytes(
                folder / "key.json",
                json.dumps(
                    {
                        "key": json.loads(key.canonical()),
                        "plan_sha256": hashlib.sha256(plan).hexdigest(),
                        "size": len(plan),
                    },
                    indent=2,
                ).encode(),
            )
        return folder / "engine.plan"

    def entries(self) -> list[dict]:
        out = []
        for meta_file in sorted(self.root.glob("*/key.json")):
            try:
                meta = json.loads(meta_file.read_text())
                out.append({"id": meta_file.parent.name, **meta["key"], "size": meta.get("size")})
            except (OSError, ValueError, KeyError):
                out.append({"id": meta_file.parent.name, "damaged": True})
        return out

    def clear(self) -> int:
        n = len(list(self.root.glob("*/key.json")))
        with file_lock(self.root / ".lock"):
            for child in self.root.iterdir() if self.root.is_dir() else []:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        return n
