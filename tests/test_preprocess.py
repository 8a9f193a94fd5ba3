"""Letterbox geometry and the tensor layout the manifest asks for."""

import numpy as np
import pytest

from bastion.models.manifest import InputSpec
from bastion.runtime.preprocess import letterbox, make_input, rect_size


def spec(**kw) -> InputSpec:
    base = dict(name="images", shape=[1, 3, 64, 64], size=(64, 64))
    base.update(kw)
    return InputSpec(**base)


@pytest.mark.parametrize(
    "hw,target,center",
    [
        ((480, 640), (640, 640), True),
        ((300, 451), (416, 416), False),
        ((720, 1280), (384, 640), True),
        ((100, 50), (64, 96), True),
    ],
)
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


def reference(img, sp, size, center=True):
    """Slow, obvious reference: uint8 letterbox, then float maths in numpy."""
    placed, placement = letterbox(img, size, sp.pad_value, center)
    x = placed.astype(np.float32)
    if sp.color == "RGB":
        x = x[..., ::-1]
    x = (x * sp.scale - np.asarray(sp.mean, np.float32)) / np.asarray(sp.std, np.float32)
    return (x.transpose(2, 0, 1) if sp.layout == "NCHW" else x), placement


@pytest.mark.parametrize(
    "kw",
    [
        dict(color="RGB", scale=1 / 255),
        dict(color="BGR", scale=1.0, pad_position="top-left"),
        dict(color="BGR", scale=1.0, mean=[103.53, 116.28, 123.675], std=[57.375, 57.12, 58.395]),
        dict(color="RGB", scale=1 / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], layout="NHWC"),
    ],
)
@pytest.mark.parametrize("hw,size", [((48, 80), (64, 64)), ((64, 64), (64, 64)), ((100, 30), (64, 96))])
def test_make_input_matches_letterbox_plus_numpy(kw, hw, size):
    sp = spec(**kw)
    img = np.random.default_rng(3).integers(0, 256, (*hw, 3), dtype=np.uint8)
    tensor, placement = make_input(img, sp, size)
    ref, ref_placement = reference(img, sp, size, center=sp.pad_position == "center")
    assert tensor.dtype == np.float32 and tensor.shape == ref.shape
    np.testing.assert_allclose(tensor, ref, atol=1e-4)
    assert placement == ref_placement


def test_stretch_fills_the_whole_input():
    sp = spec(resize="stretch", color="BGR", scale=1.0)
    img = np.full((30, 90, 3), 200, np.uint8)
    tensor, placement = make_input(img, sp, (64, 64))
    assert (tensor == 200).all() and placement.pad_x == 0 and placement.scale_x == pytest.approx(64 / 90)


def test_make_input_refuses_non_colour_arrays():
    from bastion.errors import ShapeError

    with pytest.raises(ShapeError):
        make_input(np.zeros((10, 10, 2), np.uint8), spec(), (64, 64))
