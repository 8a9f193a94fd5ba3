"""The vendored hand-labelled ground truth (bastion/samples/groundtruth): well-formed, true to its clips, held out.

The demo scores every candidate on these frames, so a malformed line, a box outside its image, a class the teacher
does not know, an image that is not the frame its name says, or a training frame next to a scored one would make
the demo's headline number wrong without anything failing. These tests are what fails instead.
"""

from __future__ import annotations

import hashlib
import re

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

GROUND_TRUTH = SAMPLES / "groundtruth"
NAME = re.compile(r"^(?P<clip>.+)-(?P<frame>\d{5})$")
MIN_SIDE_PX = 16  # the README's minimum size


def _stems(kind: str, suffix: str) -> set[str]:
    return {p.stem for p in (GROUND_TRUTH / kind).glob(f"*{suffix}")}


def _teacher_classes() -> list[str]:
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.zoo import zoo_path

    return read_manifest(zoo_path("yolov5n") / MANIFEST_NAME).classes


def test_every_image_has_a_label_file_and_every_label_an_image():
    images, labels = _stems("images", ".jpg"), _stems("labels", ".txt")
    assert 24 <= len(images) <= 40, len(images)
    assert images == labels, images ^ labels
    assert {p.name for p in (GROUND_TRUTH / "images").iterdir()} == {f"{s}.jpg" for s in images}
    assert {p.name for p in (GROUND_TRUTH / "labels").iterdir()} == {f"{s}.txt" for s in labels}


def test_images_decode_and_the_set_stays_small():
    total = 0
    for path in sorted((GROUND_TRUTH / "images").glob("*.jpg")):
        image = cv2.imread(str(path))
        assert image is not None and image.shape == (432, 768, 3), path.name
        total += path.stat().st_size
    assert total < 2_000_000, total


def test_every_label_line_is_well_formed_inside_its_image_with_a_known_class():
    classes = _teacher_classes()
    vehicle_ids = {classes.index(n) for n in ("car", "motorcycle", "bus", "truck")}
    known = {classes.index("person")} | vehicle_ids
    boxes = 0
    for path in sorted((GROUND_TRUTH / "labels").glob("*.txt")):
        text = path.read_text()
        assert text == "" or text.endswith("\n"), path.name
        height, width = cv2.imread(str(GROUND_TRUTH / "images" / f"{path.stem}.jpg")).shape[:2]
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split(" ")
            assert len(fields) == 5 and re.fullmatch(r"\d+", fields[0]), (path.name, n, line)
            cls = int(fields[0])
            assert cls in known, (path.name, n, cls)
            x, y, w, h = (float(v) for v in fields[1:])
            assert all(np.isfinite(v) for v in (x, y, w, h)), (path.name, n)
            x0, y0, x1, y1 = (x - w / 2) * width, (y - h / 2) * height, (x + w / 2) * width, (y + h / 2) * height
            eps = 0.5  # half a pixel: the six decimals of the normalised format
            assert -eps <= x0 < x1 <= width + eps and -eps <= y0 < y1 <= height + eps, (path.name, n, line)
            assert min(x1 - x0, y1 - y0) >= MIN_SIDE_PX - eps, (path.name, n, line)
            boxes += 1
    assert boxes >= 20, boxes


def test_the_empty_wall_and_other_empty_frames_are_labelled_empty():
    """Frame 0 of the person clip (what the old shipped model called a person) is in the set, with no box."""
    assert (GROUND_TRUTH / "labels" / "one-by-one-person-detection-00000.txt").read_text() == ""
    empty = [p for p in (GROUND_TRUTH / "labels").glob("*.txt") if not p.read_text().strip()]
    assert len(empty) >= 5
    readme = (GROUND_TRUTH / "README.md").read_text()
    for needed in ("Tight box", "Truncated", "Occluded", "Minimum size", "CC BY 4.0", "by eye"):
        assert needed in readme, needed


def test_sha256sums_list_every_file_and_match():
    listed = {}
    for line in (GROUND_TRUTH / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    on_disk = {f"images/{p.name}" for p in (GROUND_TRUTH / "images").iterdir()}
    on_disk |= {f"labels/{p.name}" for p in (GROUND_TRUTH / "labels").iterdir()}
    assert set(listed) == on_disk
    for name, digest in listed.items():
        assert hashlib.sha256((GROUND_TRUTH / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.slow
def test_each_image_is_the_frame_of_the_clip_its_name_says():
    """The name is the provenance: clip stem and frame index. A re-encode differs a little, another frame a lot."""
    from bastion.runtime.media import iter_video

    wanted: dict[str, dict[int, np.ndarray]] = {}
    for path in (GROUND_TRUTH / "images").glob("*.jpg"):
        m = NAME.match(path.stem)
        assert m and (SAMPLES / f"{m['clip']}.mp4").is_file(), path.name
        wanted.setdefault(m["clip"], {})[int(m["frame"])] = cv2.imread(str(path)).astype(np.int16)
    for clip, frames in wanted.items():
        last = max(frames)
        for frame in iter_video(SAMPLES / f"{clip}.mp4", last + 1):
            if frame.index in frames:
                diff = float(np.abs(frame.image.astype(np.int16) - frames.pop(frame.index)).mean())
                assert diff < 3.0, (clip, frame.index, diff)
        assert not frames, (clip, sorted(frames))


def test_the_demo_never_trains_next_to_a_ground_truth_frame(tmp_path):
    from bastion.demo_frames import GROUND_TRUTH as DEMO_GROUND_TRUTH
    from bastion.demo_frames import GROUND_TRUTH_GAP, ground_truth_frames, training_frame_indices

    assert DEMO_GROUND_TRUTH.resolve() == GROUND_TRUTH.resolve()
    held = ground_truth_frames(GROUND_TRUTH / "images")
    assert set(held) == {"one-by-one-person-detection", "car-detection"}
    assert 0 in held["one-by-one-person-detection"]
    for clip, frames in held.items():
        kept = training_frame_indices(1394, every=8, held_out=frames)
        assert kept, clip
        assert min(abs(k - g) for k in kept for g in frames) >= GROUND_TRUTH_GAP
        assert len(kept) > 1394 // 8 // 3  # still a useful share of the clip


def test_the_operating_point_counts_a_detection_on_an_empty_frame(tmp_path):
    """What mAP forgives (a confident box where the labels say nothing) is what the demo's served-model check counts:
    here frame 120's person is labelled away, so the stock teacher's true detection there must count as false."""
    import shutil

    from bastion.demo import CLASS_MAP, CLASSES
    from bastion.demo_frames import operating_point

    for kind in ("images", "labels"):
        (tmp_path / kind).mkdir()
    for stem in ("one-by-one-person-detection-00000", "one-by-one-person-detection-00120", "car-detection-00220"):
        shutil.copy(GROUND_TRUTH / "images" / f"{stem}.jpg", tmp_path / "images")
        shutil.copy(GROUND_TRUTH / "labels" / f"{stem}.txt", tmp_path / "labels")
    honest = operating_point("yolov5n", CLASSES, CLASS_MAP, root=tmp_path)
    assert honest["frames"] == 3 and honest["empty_frames"] == 1 and honest["empty_frames_with_detections"] == []
    assert honest["true_positives"] + honest["missed"] == 3  # 1 person + 2 cars
    assert honest["true_positives"] >= 1 and honest["false_positives"] == 0
    (tmp_path / "labels" / "one-by-one-person-detection-00120.txt").write_text("")
    lied = operating_point("yolov5n", CLASSES, CLASS_MAP, root=tmp_path)
    assert lied["empty_frames"] == 2 and lied["false_positives"] == 1
    assert lied["true_positives"] == honest["true_positives"] - 1
    assert [e.split(":")[0] for e in lied["empty_frames_with_detections"]] == ["one-by-one-person-detection-00120"]
