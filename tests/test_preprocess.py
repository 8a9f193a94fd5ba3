"""Letterbox geometry and the tensor layout the manifest asks for."""

import numpy as np
import pytest

from bastion.models.manifest import InputSpec
from bastion.runtime.preprocess import letterbox, place, rect_size, to_blob


def spec(**kw) -> InputSpec:
    base = dict(name="images", shape=[1, 3, 64, 64], size=(64, 64))
    base.update(kw)
    return InputSpec(**base)


@pytest.mark.parametrize("hw,target,center", [((480, 640), (640, 640), True), ((300, 451), (416, 416), False),
                                              ((720, 1280), (384, 640), True), ((100, 50), (64, 96), True)])
def test_letterbox_round_trip_of_coordinates(hw, target, center):
    image = np.zeros((*hw, 3), np.uint8)
    out, placement = letterbox(image, target, center=center)
    assert out.shape[:2] == target
    rng = np.random.default_rng(0)
    xy1 = rng.uniform(0, 1, (20, 2)) * [hw[1] / 2, hw[0] / 2]
    boxes = np.concatenate([xy1, xy1 + rng.uniform(0.5, 1, (20, 2)) * [hw[1] / 2, hw[0] / 2]], 1).astype(np.float32)
    back = placement.to_original(placement.to_input(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_letterbox_places_pixels_where_placement_says():
    image = np.full((100, 200, 3), 255, np.uint8)
    out, p = letterbox(image, (200, 200), pad_value=114, center=True)
    assert p.pad_y == 50 and p.pad_x == 0 and p.scale_x == 1.0
    assert (out[:50] == 114).all() and (out[50:150] == 255).all() and (out[150:] == 114).all()
    out, p = letterbox(image, (200, 200), center=False)
    assert p.pad_y == 0 and (out[:100] == 255).all() and (out[100:] == 114).all()


def test_rect_size_is_minimal_stride_multiple():
    assert rect_size((432, 768), 640, 32) == (384, 640)
    assert rect_size((480, 640), 640, 32) == (480, 640)
    assert rect_size((1080, 810), 640, 32) == (640, 480)


def test_blob_rgb_scaled_matches_numpy_reference():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blob = to_blob([img], spec(color="RGB", scale=1 / 255))
    ref = img[..., ::-1].astype(np.float32).transpose(2, 0, 1)[None] / 255
    np.testing.assert_allclose(blob, ref, atol=1e-6)


def test_blob_bgr_raw_and_per_channel_mean_std():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    raw = to_blob([img], spec(color="BGR", scale=1.0))
    np.testing.assert_array_equal(raw[0], img.transpose(2, 0, 1).astype(np.float32))
    mean, std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
    norm = to_blob([img], spec(color="BGR", scale=1.0, mean=mean, std=std))
    ref = ((img.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(norm[0], ref, atol=1e-4)
    same_std = to_blob([img], spec(color="RGB", scale=1 / 255, mean=[0.485, 0.456, 0.406], std=[0.5] * 3))
    ref2 = ((img[..., ::-1].astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / 0.5).transpose(2, 0, 1)
    np.testing.assert_allclose(same_std[0], ref2, atol=1e-5)


def test_place_refuses_non_colour_arrays():
    from bastion.errors import ShapeError

    with pytest.raises(ShapeError):
        place(np.zeros((10, 10, 2), np.uint8), spec(), (64, 64))
