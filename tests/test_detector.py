"""The real vendored models on real images."""

import numpy as np
import pytest

from bastion import Detector
from bastion.errors import ConfigError, DecoderError, ModelLoadError, SignatureError
from bastion.models.zoo import zoo_path
from bastion.runtime.media import read_image
from conftest import PERSON_BOX, PERSON_IMAGE, SAMPLE_IMAGES


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def yolov5n():
    with Detector.load("yolov5n", threads=1) as det:
        yield det


@pytest.mark.parametrize("model", ["yolov5n", "yolox_nano"])
def test_finds_the_hand_labelled_person(model):
    with Detector.load(model, threads=1) as det:
        result = det.detect(PERSON_IMAGE)
    people = result.filter(classes=["person"], min_conf=0.5)
    assert len(people) == 1, result.to_dict()
    assert iou(people.xyxy[0], PERSON_BOX) > 0.85
    assert result.xyxy.dtype == np.float32 and result.cls.dtype == np.int64


def test_batch_equals_single_and_paths_equal_arrays(yolov5n):
    files = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    singles = [yolov5n.detect(f) for f in files]
    batch = yolov5n.detect([read_image(f) for f in files])
    assert len(batch) == len(files)
    for a, b in zip(singles, batch):
        assert a.to_dict() == b.to_dict()


def test_fixed_square_input_gives_the_same_person(yolov5n):
    with Detector.load("yolov5n", threads=1, rect=False) as square:
        assert square.input_size((432, 768)) == (640, 640)
        people = square.detect(PERSON_IMAGE).filter(classes=["person"], min_conf=0.5)
    assert iou(people.xyxy[0], PERSON_BOX) > 0.85


def test_classes_option_restricts_output(yolov5n):
    with Detector.load("yolov5n", threads=1, classes=["skateboard"]) as det:
        result = det.detect(SAMPLE_IMAGES / "one-by-one-person-detection-0300.jpg")
    assert set(result.counts()) <= {"skateboard"}
    with pytest.raises(ConfigError, match="unknown class name 'tank'"):
        Detector.load("yolov5n", classes=["tank"], warmup=False)


def test_detections_to_dict_filter_and_draw(yolov5n):
    image = read_image(PERSON_IMAGE)
    det = yolov5n.detect(image)
    d = det.to_dict()[0]
    assert set(d) == {"cls", "name", "conf", "box"} and d["name"] == "person"
    assert len(det.filter(min_conf=1.01)) == 0
    drawn = det.draw(image)
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)
    assert np.array_equal(image, read_image(PERSON_IMAGE))  # draw does not touch the input


def test_bare_yolov5_onnx_is_understood_from_its_metadata():
    path = zoo_path("yolov5n") / "yolov5n-dynamic.onnx"
    with pytest.raises(SignatureError, match="bare ONNX file"):
        Detector.load(path)
    with Detector.load(path, threads=1, allow_unsigned=True) as det:
        assert det.manifest.decoder.type == "yolov5" and det.names[0] == "person"
        people = det.detect(PERSON_IMAGE).filter(classes=["person"])
    assert iou(people.xyxy[0], PERSON_BOX) > 0.85


def test_bare_onnx_without_metadata_matches_no_decoder():
    with pytest.raises(DecoderError, match="match no known decoder"):
        Detector.load(zoo_path("yolox_nano") / "yolox_nano.onnx", allow_unsigned=True)


def test_truncated_and_non_onnx_files_are_refused(tmp_path):
    good = zoo_path("yolox_nano") / "yolox_nano.onnx"
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(good.read_bytes()[:50000])
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        Detector.load(truncated, allow_unsigned=True)
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(ModelLoadError):
        Detector.load(text, allow_unsigned=True)


def test_wrong_array_type_is_a_shape_error(yolov5n):
    from bastion.errors import ShapeError

    with pytest.raises(ShapeError):
        yolov5n.detect(np.zeros((10, 10, 3), np.float32))


def test_static_model_refuses_another_imgsz():
    with pytest.raises(ConfigError, match="fixed input 416x416"):
        Detector.load("yolox_nano", imgsz=640, warmup=False)


def test_a_repeated_input_shape_gets_a_pinned_session_with_the_same_outputs():
    """A stream repeats one shape: after a few runs the dynamic model runs on a session pinned to it (faster,
    docs/benchmarks.md), with the same outputs; other shapes keep the general session."""
    from bastion.models import Bundle
    from bastion.runtime.backends import OrtBackend

    backend = OrtBackend(Bundle.open("yolov5n").model_path, device="cpu", threads=1)
    x = np.random.default_rng(0).random((1, 3, 384, 640), dtype=np.float32)
    first = backend.run({"images": x})[0]
    for _ in range(OrtBackend.SPECIALIZE_AFTER):
        backend.run({"images": x})
    backend.wait_pinned(30)  # built off the inference path
    assert list(backend._specialized) == [(1, 3, 384, 640)]
    pinned = backend._specialized[(1, 3, 384, 640)]
    assert pinned is not backend.session and pinned.get_inputs()[0].shape == [1, 3, 384, 640]
    np.testing.assert_allclose(backend.run({"images": x})[0], first, rtol=1e-4, atol=1e-3)
    other = backend.run({"images": x[:, :, :320]})[0]  # another shape: the general session, still right
    assert other.shape[1] < first.shape[1] and len(backend._specialized) == 1
    backend.close()


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"conf": 1.5}, "conf"),
        ({"max_det": 10**9}, "max_det"),
        ({"max_batch": 0}, "max_batch"),
        ({"cnof": 0.3}, "cnof"),
    ],
)
def test_a_bad_detector_option_is_one_line_before_anything_opens(bad, where):
    """DetectOptions is typed and bounded like the manifest (max_det sizes the NMS output, max_batch the batch
    tensor): a typo or an out-of-range value is one ConfigError naming it, not a TypeError or a huge buffer."""

    with pytest.raises(ConfigError, match=f"detector option {where}") as refused:
        Detector.load("yolox_nano", warmup=False, **bad)
    assert "\n" not in str(refused.value)
