"""Benchmark helper: turn a YOLOv5-repository ONNX ([B,N,85]) into Ultralytics layout ([B,84,N]).

Appends Slice/Mul/Concat/Transpose nodes (scores = objectness × class
probability) and writes the metadata Ultralytics' ``YOLO(model.onnx)`` reads
(names, stride, imgsz, task), so Ultralytics and bastion can be compared on a
*trained* model in the layout both understand.  Needs the ``onnx`` package.

    python scripts/yolov5_as_ultralytics_onnx.py models/zoo/yolov5n/yolov5n-dynamic.onnx /tmp/yolov5n-u.onnx
"""

from __future__ import annotations

import ast
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def convert(src: str, dst: str, imgsz: int = 640) -> None:
    model = onnx.load(src)
    graph = model.graph
    old_out = graph.output[0].name
    meta = {p.key: p.value for p in model.metadata_props}
    names = ast.literal_eval(meta["names"])
    nc = len(names)

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    starts = {k: const(f"u_{k}_start", v) for k, v in {"box": [0], "obj": [4], "cls": [5]}.items()}
    ends = {k: const(f"u_{k}_end", v) for k, v in {"box": [4], "obj": [5], "cls": [5 + nc]}.items()}
    axes = const("u_axes", [2])
    nodes = [
        helper.make_node("Slice", [old_out, starts["box"], ends["box"], axes], ["u_box"]),
        helper.make_node("Slice", [old_out, starts["obj"], ends["obj"], axes], ["u_obj"]),
        helper.make_node("Slice", [old_out, starts["cls"], ends["cls"], axes], ["u_cls"]),
        helper.make_node("Mul", ["u_cls", "u_obj"], ["u_score"]),
        helper.make_node("Concat", ["u_box", "u_score"], ["u_cat"], axis=2),
        helper.make_node("Transpose", ["u_cat"], ["output0"], perm=[0, 2, 1]),
    ]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, "anchors"]))
    del model.metadata_props[:]
    for key, value in {
        "names": str(dict(enumerate(names))),
        "stride": "32",
        "task": "detect",
        "batch": "1",
        "imgsz": str([imgsz, imgsz]),
        "author": "converted by bastion scripts/yolov5_as_ultralytics_onnx.py",
        "end2end": "False",
        "channels": "3",
    }.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    onnx.save(model, dst)


if __name__ == "__main__":
    convert(sys.argv[1], sys.argv[2])
