"""One rank of tests/test_ddp.py's checks of how ``distill detect``'s ranks meet under an external torchrun
(``python -m torch.distributed.run … tests/ddp_detect_worker.py MODE OUT_DIR``), through the very functions the
command uses (``distill/ultra_ddp.py``: ``leading``, ``lead``, ``follow``), errors printed as the CLI prints them.

MODE ``unseen``: rank 0 writes a two-image dataset and leads the student's training, but the job it posts names the
dataset where a node without the shared file system finds nothing (``OUT_DIR/not-on-this-node/…``): rank 1 must say
so in one line naming the path, rank 0 must stop too, and nothing trains. MODE ``idle``: rank 0's command ends
without training (cached, or --no-train): rank 1 must end quietly, exit 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _dataset(root: Path) -> Path:
    labels = root / "labels"
    for split in ("train", "val"):
        (labels / "images" / split).mkdir(parents=True, exist_ok=True)
        (labels / "labels" / split).mkdir(parents=True, exist_ok=True)
        (labels / "images" / split / "a.jpg").write_bytes(b"not really an image")
        (labels / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: person}\n")
    rows = [{"image": "a.jpg", "sha256": "x", "labels_sha256": "y"}]
    (labels / "dataset.json").write_text(json.dumps({"splits": {"train": rows, "val": rows}}))
    return labels / "data.yaml"


def main(mode: str, out: Path) -> int:
    from bastion.distill import ddp, ultra_ddp
    from bastion.distill.train import TrainSpec
    from bastion.errors import BastionError

    world = ddp.launched_world()
    try:
        if not world.is_main:
            ultra_ddp.follow(world)
            return 0
        with ultra_ddp.leading(world):
            if mode == "idle":
                return 0
            data_yaml = _dataset(out / "run")
            post = ddp.Meeting.post

            def elsewhere(self, key, value):  # the path as another node would look it up: not there
                if key == "job":
                    value = {**value, "data_yaml": str(out / "not-on-this-node" / "labels" / "data.yaml")}
                post(self, key, value)

            ddp.Meeting.post = elsewhere
            ultra_ddp.lead(data_yaml, TrainSpec(device="cpu"), 64, out / "run" / "student")
            (out / "trained").write_text("rank 0 trained")  # must not happen
        return 0
    except BastionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
