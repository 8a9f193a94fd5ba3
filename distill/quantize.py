"""INT8 with ONNX Runtime static quantization, the way that works on YOLO heads.

Measured on this kind of CPU (../shared/NOTES.md): quantizing *everything* gives
mAP 0 (the final Concat puts pixel boxes and 0–1 scores under one scale), and
S8S8 activations run slower than FP32.  So: QDQ, per-channel weights, U8 activations
/ S8 weights, and every node after the last convolutions (box decode, sigmoid,
concat: the post-processing) left in FP32.  The rest of the recipe (7-bit weights,
S8S8, calibration method) depends on the CPU that will run the model
(``distill/int8_recipe.py``); whether the result is kept is decided by a measured
mAP drop, never assumed (``distill/int8_gate.py``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from bastion.distill.int8_recipe import U8S8, Recipe
from bastion.errors import MissingExtraError, ModelLoadError
from bastion.runtime.detect import Detector
from bastion.runtime.media import iter_image_files

log = logging.getLogger(__name__)

COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "ConvTranspose"}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("INT8 quantization", "quantize", "onnx") from None
    return onnx


def post_processing_nodes(model_path: Path) -> list[str]:
    """Names of the nodes from which no convolution is reachable downstream (and that are not convolutions)."""
    onnx = _onnx()
    graph = onnx.load(str(model_path)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_compute: dict[str, bool] = {}

    def reaches_compute(node) -> bool:
        key = node.name or id(node)
        if key in feeds_compute:
            return feeds_compute[key]
        feeds_compute[key] = False  # cycle guard (graphs are DAGs; this is belt and braces)
        result = any(
            c.op_type in COMPUTE_OPS or reaches_compute(c) for out in node.output for c in consumers.get(out, [])
        )
        feeds_compute[key] = result
        return result

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph.node) + 1000))
    try:
        return [n.name for n in graph.node if n.op_type not in COMPUTE_OPS and not reaches_compute(n) and n.name]
        # (unnamed nodes cannot be excluded by ONNX Runtime's quantizer: graphs we edit name theirs)
    finally:
        sys.setrecursionlimit(limit)


def _fix_input_shape(src: Path, dst: Path, input_name: str, shape: tuple[int, ...]) -> None:
    """Static input shape (and opset ≥ 13) so the quantized graph is valid and its shapes are known."""
    onnx = _onnx()
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs opset 13
        from onnx import version_converter

        model = version_converter.convert_version(model, 13)
    make_input_shape_fixed(model.graph, input_name, list(shape))
    fix_output_shapes(model)
    onnx.save(model, str(dst))


class _Calibration:
    """onnxruntime.quantization CalibrationDataReader over images prepared exactly as the Detector does."""

    def __init__(self, detector: Detector, images: list[Path], size_hw: tuple[int, int]) -> None:
        self.detector = detector
        self.size_hw = size_hw
        self.name = detector.backend.inputs[0].name
        self._it: Iterator = iter(iter_image_files(images))

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._it, None)
        if frame is None:
            return None
        tensor, _ = self.detector.prepare(frame.image, self.size_hw)
        return {self.name: tensor[None]}


def head_convolutions(model_path: Path) -> list[str]:
    """Convolutions whose outputs only post-processing reads (the detection head's last layer: raw logits)."""
    graph = _onnx().load(str(model_path)).graph
    post = set(post_processing_nodes(model_path))
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    return [
        n.name
        for n in graph.node
        if n.op_type == "Conv" and n.name and all(c in post for out in n.output for c in consumers.get(out, []))
    ]


def first_convolution(model_path: Path) -> list[str]:
    """The name of the first convolution in graph order (it sees raw pixels: the widest activation range)."""
    graph = _onnx().load(str(model_path)).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and n.name][:1]


def quantize_int8(
    detector: Detector,
    fp32_path: Path,
    calibration_images: list[Path],
    out_path: Path,
    size_hw: tuple[int, int] | None = None,
    recipe: Recipe = U8S8,
) -> Path:
    """Write a QDQ INT8 copy of ``fp32_path`` made with ``recipe``, input fixed to ``size_hw``, calibrated on
    ``calibration_images``.

    The INT8 model has a static input: quantizing the dynamic-shape YOLOv5 export gave a graph whose
    upsampling no longer matched the skip connections at other sizes (measured; see docs/benchmarks.md).
    """
    _onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_images:
        raise ModelLoadError("INT8 calibration needs images", "give --calib DIR with a few dozen typical images")
    size_hw = size_hw or tuple(detector.size)
    exclude = post_processing_nodes(fp32_path) if recipe.keep_post_fp32 else []
    if recipe.exclude_first_conv:
        exclude += first_convolution(fp32_path)
    if recipe.exclude_head_convs:
        exclude += head_convolutions(fp32_path)
    log.info(
        "quantizing",
        extra={"recipe": recipe.name, "calibration_images": len(calibration_images), "fp32_nodes_kept": len(exclude)},
    )
    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="bastion-int8-") as tmp:
        fixed = Path(tmp) / "fixed.onnx"
        _fix_input_shape(fp32_path, fixed, detector.backend.inputs[0].name, (1, 3, *size_hw))
        prepped = Path(tmp) / "prep.onnx"
        try:
            quant_pre_process(str(fixed), str(prepped), skip_symbolic_shape=True)
        except Exception as exc:  # an optimisation only; quantize the fixed model if it fails
            log.warning("quantization pre-processing skipped: %s", exc)
            prepped = fixed
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepped),
            str(staged),
            _Calibration(detector, calibration_images, size_hw),
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation],
            weight_type=types[recipe.weight],
            calibrate_method=methods[recipe.calibration],
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": True},
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(out_path)
    return out_path
