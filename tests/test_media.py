"""Sources: corrupt files are skipped with a record, missing ones are clear errors."""

import shutil

import pytest

from bastion.errors import ImageReadError
from bastion.runtime.media import prefetch, read_image
from bastion.runtime.reader import iter_source
from bastion.runtime.sources import SourceUnavailable
from conftest import PERSON_IMAGE, SAMPLES


def test_corrupt_image_among_good_ones_is_skipped(tmp_path):
    shutil.copy(PERSON_IMAGE, tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(PERSON_IMAGE.read_bytes()[:200])  # truncated JPEG header
    (tmp_path / "c.png").write_bytes(b"definitely not a png")
    shutil.copy(PERSON_IMAGE, tmp_path / "d.jpg")
    skipped: list[str] = []
    frames = list(iter_source(str(tmp_path), skipped))
    assert [f.path.split("/")[-1] for f in frames] == ["a.jpg", "d.jpg"]
    assert {f.source for f in frames} == {str(tmp_path)}  # the source's name; each file in ``path``
    assert sorted(s.split("/")[-1] for s in skipped) == ["b.jpg", "c.png"]


def test_errors_for_missing_empty_and_unreadable(tmp_path):
    with pytest.raises(SourceUnavailable, match="input not found"):
        list(iter_source(str(tmp_path / "nope")))
    with pytest.raises(SourceUnavailable, match="no images in"):
        list(iter_source(str(tmp_path)))
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(bad)


def test_video_frames_in_order():
    frames = list(iter_source(str(SAMPLES / "car-detection.mp4"), max_frames=5))
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].image.shape == (432, 768, 3)


def test_prefetch_preserves_order_and_reraises():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def boom():
        yield 1
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        list(prefetch(boom()))
