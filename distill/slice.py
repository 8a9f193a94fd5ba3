"""The no-training baseline: the teacher with its class head sliced to the mission's classes.

Graph surgery on the ONNX output: keep the box (and objectness) columns, and for
each student class take the max over the teacher classes mapped to it
(``vehicle = max(car, truck, bus)``).  Same backbone, same speed, far less
post-processing, and often a tough baseline for a trained student to beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bastion.distill.classmap import ClassMap
from bastion.distill.quantize import _onnx
from bastion.errors import DecoderError

# decoder → (axis holding the per-anchor values, number of leading non-class columns)
LAYOUTS = {"yolov5": (2, 5), "yolox": (2, 5), "yolov8": (1, 4)}


def slice_head(src: Path, dst: Path, decoder: str, class_map: ClassMap) -> Path:
    onnx = _onnx()
    from onnx import helper, numpy_helper

    if decoder not in LAYOUTS:
        raise DecoderError(f"cannot slice the head of a {decoder!r} model", f"supported: {', '.join(LAYOUTS)}")
    axis, lead = LAYOUTS[decoder]
    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    old = graph.output[0]

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    parts = ["slice_lead"]
    # every new node is named: quantization keeps post-processing in FP32 by node name
    nodes = [
        helper.make_node(
            "Gather",
            [old.name, const("slice_lead_idx", list(range(lead)))],
            ["slice_lead"],
            axis=axis,
            name="slice/lead",
        )
    ]
    for k, group in enumerate(class_map.groups()):
        idx = const(f"slice_cls{k}_idx", [lead + t for t in group])
        gathered = f"slice_cls{k}_all"
        nodes.append(helper.make_node("Gather", [old.name, idx], [gathered], axis=axis, name=f"slice/gather{k}"))
        if len(group) == 1:
            parts.append(gathered)
            continue
        reduced = f"slice_cls{k}"
        if opset >= 18:
            nodes.append(
                helper.make_node(
                    "ReduceMax",
                    [gathered, const(f"slice_axes{k}", [axis])],
                    [reduced],
                    keepdims=1,
                    name=f"slice/max{k}",
                )
            )
        else:
            nodes.append(
                helper.make_node("ReduceMax", [gathered], [reduced], axes=[axis], keepdims=1, name=f"slice/max{k}")
            )
        parts.append(reduced)
    nodes.append(helper.make_node("Concat", parts, ["output_sliced"], axis=axis, name="slice/concat"))
    graph.node.extend(nodes)
    del graph.output[:]
    shape: list = ["batch", "anchors", "anchors"]
    shape[axis] = lead + len(class_map.student)
    graph.output.append(helper.make_tensor_value_info("output_sliced", onnx.TensorProto.FLOAT, shape))
    for prop in model.metadata_props:
        if prop.key == "names":
            prop.value = str(dict(enumerate(class_map.student)))
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
