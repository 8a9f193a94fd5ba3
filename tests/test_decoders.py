"""Decoders on hand-built tensors whose right answer is known."""

import numpy as np
import pytest
from pydantic import ValidationError

from bastion.errors import DecoderError
from bastion.models.decoder_spec import YoloDecoderSpec, decoder_spec
from bastion.runtime.decoders import DecodeContext, anchor_grid, get_decoder, register_decoder


def spec(kind: str, strides=None) -> YoloDecoderSpec:
    return YoloDecoderSpec(type=kind, strides=strides)


def ctx(kind: str, nc: int, conf: float = 0.25, hw=(64, 64), multi_label=False, mask=None, strides=None):
    return DecodeContext(
        spec=spec(kind, strides),
        num_classes=nc,
        input_hw=hw,
        conf=conf,
        multi_label=multi_label,
        class_mask=mask,
    )


def test_yolov5_decodes_xywh_obj_times_cls():
    out = np.zeros((1, 4, 5 + 3), np.float32)
    out[0, 0, :5] = [32, 20, 10, 8, 0.9]
    out[0, 0, 5:] = [0.1, 0.8, 0.2]  # class 1, score 0.72
    out[0, 1, :5] = [10, 10, 4, 4, 0.2]  # objectness below conf
    out[0, 1, 5:] = [1.0, 0, 0]
    out[0, 2, :5] = [50, 50, 6, 6, 0.5]
    out[0, 2, 5:] = [0.3, 0.0, 0.0]  # 0.15 < conf after obj × cls
    [cand] = get_decoder(spec("yolov5"))([out], ctx("yolov5", 3))
    assert cand.classes.tolist() == [1]
    np.testing.assert_allclose(cand.scores, [0.72], rtol=1e-6)
    np.testing.assert_allclose(cand.boxes, [[27, 16, 37, 24]])


def test_yolov5_multi_label_emits_every_class_above_threshold():
    out = np.zeros((1, 1, 5 + 3), np.float32)
    out[0, 0, :5] = [32, 32, 10, 10, 1.0]
    out[0, 0, 5:] = [0.9, 0.5, 0.1]
    [cand] = get_decoder(spec("yolov5"))([out], ctx("yolov5", 3, multi_label=True))
    assert sorted(cand.classes.tolist()) == [0, 1]
    [single] = get_decoder(spec("yolov5"))([out], ctx("yolov5", 3))
    assert single.classes.tolist() == [0]


def test_class_mask_drops_unwanted_classes():
    out = np.zeros((1, 1, 5 + 3), np.float32)
    out[0, 0, :5] = [32, 32, 10, 10, 1.0]
    out[0, 0, 5:] = [0.9, 0.5, 0.1]
    [cand] = get_decoder(spec("yolov5"))([out], ctx("yolov5", 3, mask=np.array([False, True, True])))
    assert cand.classes.tolist() == [1]
    np.testing.assert_allclose(cand.scores, [0.5])


def test_yolov8_layout_is_channels_first_without_objectness():
    nc, n = 2, 5
    out = np.zeros((2, 4 + nc, n), np.float32)
    out[0, :4, 3] = [100, 50, 20, 10]
    out[0, 4:, 3] = [0.1, 0.6]
    out[1, :4, 0] = [8, 8, 4, 4]
    out[1, 4:, 0] = [0.95, 0.0]
    cands = get_decoder(spec("yolov8"))([out], ctx("yolov8", nc))
    assert [c.classes.tolist() for c in cands] == [[1], [0]]
    np.testing.assert_allclose(cands[0].boxes, [[90, 45, 110, 55]])
    np.testing.assert_allclose(cands[1].scores, [0.95])


def test_yolox_grid_and_stride_decode():
    hw = (64, 96)  # strides 8/16/32 → 8x12 + 4x6 + 2x3 = 96 + 24 + 6 cells
    grid, step = anchor_grid(hw, (8, 16, 32))
    assert len(grid) == 126
    out = np.zeros((1, 126, 5 + 2), np.float32)
    # cell (x=3, y=1) at stride 16 is row 96 + 1*6 + 3 = 105
    row = 96 + 6 + 3
    assert tuple(grid[row]) == (3, 1) and step[row, 0] == 16
    out[0, row, :5] = [0.5, 0.25, np.log(2.0), 0.0, 0.9]
    out[0, row, 5:] = [0.0, 1.0]
    [cand] = get_decoder(spec("yolox"))([out], ctx("yolox", 2, hw=hw, strides=[8, 16, 32]))
    cx, cy, w, h = (3 + 0.5) * 16, (1 + 0.25) * 16, 2 * 16, 16
    np.testing.assert_allclose(cand.boxes, [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]], rtol=1e-6)
    assert cand.classes.tolist() == [1]


def test_yolox_refuses_rows_that_do_not_match_the_input_grid():
    out = np.zeros((1, 100, 7), np.float32)
    with pytest.raises(DecoderError, match="do not match"):
        get_decoder(spec("yolox"))([out], ctx("yolox", 2, hw=(64, 64)))


def test_wrong_layout_and_unknown_decoder_are_clear_errors():
    with pytest.raises(DecoderError, match=r"\[batch, anchors, 85\]"):
        get_decoder(spec("yolov5"))([np.zeros((1, 10, 84), np.float32)], ctx("yolov5", 80))
    with pytest.raises(ValidationError, match="does not match any of the expected tags: 'yolov5', 'yolov8', 'yolox'"):
        decoder_spec({"type": "ssd", "strides": None, "params": {}})  # a type the manifest does not know
    with pytest.raises(ValueError, match="not a type the manifest knows"):
        register_decoder("ssd")  # registered, it could never be reached
