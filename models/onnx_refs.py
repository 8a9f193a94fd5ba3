"""Which external-data files an ONNX model asks for, read from its bytes without the ``onnx`` package.

Why: an ONNX tensor may keep its values in another file (``data_location: EXTERNAL``, ``external_data``
``location=model.onnx.data``), which ONNX Runtime opens by path — beside the model, or relative to the current
directory when the model is given as bytes. That file is not what the bundle's manifest hashed, so bastion
refuses every model that references external data: a bundle's model must be one self-contained file (an edge
model is far below protobuf's 2 GB limit; ``onnx.save(model, path)`` writes one).

The field path does not depend on ``onnx``, so this walks the protobuf wire format directly, visiting every
place a ``TensorProto`` can live: graph initializers, sparse initializers, node attributes (``t``, ``tensors``,
``sparse_tensor(s)``), nested graphs (``If``/``Loop``/``Scan`` bodies), functions and training graphs.
"""

from __future__ import annotations

from bastion.errors import ModelLoadError

MAX_DEPTH = 64  # nested graphs deeper than this are not a real model

# message name -> {field number: message name of that (length-delimited) field}; fields not named are skipped
_MESSAGES: dict[str, dict[int, str]] = {
    "Model": {7: "Graph", 20: "TrainingInfo", 25: "Function"},
    "TrainingInfo": {1: "Graph", 2: "Graph"},
    "Graph": {1: "Node", 5: "Tensor", 15: "SparseTensor"},
    "Function": {7: "Node", 11: "Attribute"},
    "Node": {5: "Attribute"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 22: "SparseTensor", 23: "SparseTensor"},
    "SparseTensor": {1: "Tensor", 2: "Tensor"},
    "Tensor": {13: "Entry"},
    "Entry": {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = 0, pos + 8
        elif wire == 5:
            value, pos = 0, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:  # groups (3, 4) do not occur in ONNX
            raise _Malformed(f"wire type {wire}")
        if pos > len(buf):
            raise _Malformed("field runs past the end")
        yield number, wire, value


def _walk(buf: memoryview, kind: str, depth: int, found: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"graphs nested deeper than {MAX_DEPTH}")
    children = _MESSAGES[kind]
    external = False
    locations: list[str] = []
    for number, wire, value in _fields(buf):
        if kind == "Tensor" and number == _TENSOR_DATA_LOCATION and wire == 0:
            external = external or value == _EXTERNAL
        elif kind == "Tensor" and number == _TENSOR_EXTERNAL_DATA and wire == 2:
            external = True
            locations.append(_entry_location(value))
        elif wire == 2 and number in children:
            _walk(value, children[number], depth + 1, found)
    if external:
        named = [loc for loc in locations if loc]
        found.extend(named or ["(no location)"])


def _entry_location(buf: memoryview) -> str:
    """The value of a ``StringStringEntryProto`` whose key is ``location`` ('' for other keys)."""
    key = value = b""
    for number, wire, field in _fields(buf):
        if wire == 2 and number == 1:
            key = bytes(field)
        elif wire == 2 and number == 2:
            value = bytes(field)
    return value.decode("utf-8", "replace") if key == b"location" else ""


def external_data_locations(model: bytes, label: str = "the model") -> list[str]:
    """Every external-data location the model references (empty for a self-contained model); a ModelLoadError
    when the bytes are not a well-formed protobuf."""
    found: list[str] = []
    try:
        _walk(memoryview(model), "Model", 0, found)
    except _Malformed as exc:
        raise ModelLoadError(
            f"{label} is not a loadable ONNX model (malformed protobuf: {exc})",
            "the file is truncated or not ONNX; copy it again",
        ) from None
    return sorted(set(found))


def refuse_external_data(model: bytes, label: str) -> None:
    """Raise when ``model`` would make ONNX Runtime (or TensorRT) read weights from a file no manifest hashed."""
    locations = external_data_locations(model, label)
    if locations:
        shown = ", ".join(locations[:3]) + (" …" if len(locations) > 3 else "")
        raise ModelLoadError(
            f"{label} keeps weights in external data ({shown}), which bastion does not load: only the model file "
            "itself is hashed and verified",
            "save it as one self-contained file (onnx.save(onnx.load(PATH), OUT)) and make the bundle again",
        )
