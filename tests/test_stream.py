"""The overlapped video pipeline gives exactly the serial results, in order."""

import pytest

from bastion import Detector
from bastion.runtime.media import iter_video
from bastion.runtime.stream import detect_stream
from conftest import SAMPLES

VIDEO = SAMPLES / "one-by-one-person-detection.mp4"


@pytest.fixture(scope="module")
def detector():
    with Detector.load("yolov5n", threads=1) as det:
        yield det


def test_pipeline_matches_serial_detection_in_order(detector):
    frames = list(iter_video(VIDEO, 100))
    serial = [detector.detect(f.image).to_dict() for f in frames]
    for workers, batch in ((1, 1), (3, 1), (2, 4)):
        got = list(detect_stream(detector, iter_video(VIDEO, 100), batch=batch, workers=workers))
        assert [f.index for f, _ in got] == list(range(100))
        assert [d.to_dict() for _, d in got] == serial, (workers, batch)
    assert sum(len(d) for d in serial) > 0  # the clip does contain people in these frames


def test_pipeline_surfaces_reader_errors(detector):
    def broken():
        yield from iter_video(VIDEO, 3)
        raise OSError("camera unplugged")

    import cv2

    threads = cv2.getNumThreads()
    with pytest.raises(OSError, match="camera unplugged"):
        list(detect_stream(detector, broken(), workers=2))
    assert cv2.getNumThreads() == threads  # the stream lends OpenCV's threads to inference and gives them back
