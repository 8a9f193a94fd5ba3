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

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from bastion.distill.int8_recipe import ENTROPY_BINS, ENTROPY_QUANTIZED_BINS, U8S8, Recipe
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


def neck_concats(model_path: Path, levels: int = 2) -> list[str]:
    """The Concat nodes that feed the detection head: walking back from each head convolution, the first ``levels``
    Concats on every path (YOLOv5: the C3 blocks' own Concats and the PAN Concats before them)."""
    graph = _onnx().load(str(model_path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    heads = set(head_convolutions(model_path))
    found: list[str] = []
    seen: set[tuple[str, int]] = set()
    todo = [(name, 0) for n in graph.node if n.name in heads for name in n.input]
    while todo:
        tensor, level = todo.pop()
        node = producer.get(tensor)
        if node is None or (node.name, level) in seen:
            continue
        seen.add((node.name, level))
        if node.op_type == "Concat":
            if node.name not in found:
                found.append(node.name)
            if level + 1 >= levels:
                continue
            todo += [(name, level + 1) for name in node.input]
        else:
            todo += [(name, level) for name in node.input]
    return found


def first_convolution(model_path: Path) -> list[str]:
    """The name of the first convolution in graph order (it sees raw pixels: the widest activation range)."""
    graph = _onnx().load(str(model_path)).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and n.name][:1]


def entropy_threshold(histogram, num_quantized_bins: int):
    """ONNX Runtime's ``HistogramCollector.get_entropy_threshold`` (onnxruntime 1.32, the KL search of TensorRT's
    entropy calibration), with its per-bin Python loops as numpy reshapes: the same thresholds, bit for bit
    (``tests/test_int8_measured.py`` compares them), ~6× faster: ~30 s instead of ~3 minutes for yolov5n's 200
    tensors at 2048 bins. ``histogram``: (counts, edges, min, max) as the collector keeps it."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, hist_edges = histogram[0], histogram[1]
    dtype = hist_edges.dtype
    num_bins = hist.size
    zero = num_bins // 2
    half = num_quantized_bins // 2
    best, best_div = None, None
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[end:].sum()
        merged = sliced.size // num_quantized_bins
        whole = num_quantized_bins * merged
        quantized = sliced[:whole].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[whole:].sum()
        norm = (p[:whole] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)  # ORT assigns count/norm into int64: truncated, and 0 where norm is 0
        with np.errstate(divide="ignore", invalid="ignore"):
            q[:whole] = np.repeat(np.where(norm != 0, quantized / np.maximum(norm, 1), 0), merged).astype(np.int64)
        ps, qs = smooth_distribution(p), smooth_distribution(q)
        div = np.array(np.inf if ps is None or qs is None else entropy(ps, qs), dtype=dtype)
        if best_div is None or div < best_div:  # np.argmin: the first of equal minima
            best, best_div = (hist_edges[start], hist_edges[end]), div
    low, high = best
    if low < histogram[2]:
        low = histogram[2]
    if high > histogram[3]:
        high = histogram[3]
    return low, high


def entropy_ranges(model: Path, reader, tmp: Path) -> Path:
    """Entropy (KL) calibration with a histogram fine enough to choose from: a calibration cache file for
    ``quantize_static``.

    ONNX Runtime's EntropyCalibrater histograms each tensor into ``num_bins`` and tries every threshold from
    ``num_quantized_bins`` wide up to the whole histogram; ``quantize_static`` cannot pass either and both default
    to 128, so the only threshold it tried was the full range: MinMax's scales exactly (measured, onnxruntime
    1.32).  Here: 2048 bins and 128 quantized bins (TensorRT's entropy calibration, which ORT's follows).
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model,
        augmented_model_path=str(tmp / "entropy-augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )
    chatter = io.StringIO()  # ORT print()s its progress: never onto a --json stdout
    with contextlib.redirect_stdout(chatter):
        calibrator.collect_data(reader)
        collector = getattr(calibrator, "collector", None)
        if collector is not None and hasattr(collector, "get_entropy_threshold"):
            collector.get_entropy_threshold = entropy_threshold  # the same search, its loops in numpy
        ranges = calibrator.compute_data()
    log.debug("entropy calibration: %s", " / ".join(chatter.getvalue().split("\n")[:4]))
    cache = tmp / "entropy-ranges.json"
    save_tensors_data(ranges, cache)
    return cache


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
    if recipe.exclude_neck_concats:
        exclude += neck_concats(fp32_path)
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
        reader = _Calibration(detector, calibration_images, size_hw)
        cache = None
        if recipe.calibration == "entropy":  # quantize_static cannot pass the histogram sizes: ranges made here
            cache = entropy_ranges(prepped, reader, Path(tmp))
            reader = None
        quantize_static(
            str(prepped),
            str(staged),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation],
            weight_type=types[recipe.weight],
            calibrate_method=methods[recipe.calibration],
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": True},
            calibration_cache_path=cache,
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(out_path)
    return out_path
