"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers where present."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bastion.errors import ConfigError, ModelLoadError
from bastion.runtime.backends.base import Backend, TensorInfo

log = logging.getLogger(__name__)

# Preference order for device="auto": fastest first.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(device: str) -> list[str]:
    """Providers for ``device`` ('auto', 'cpu', 'cuda', 'tensorrt') that this install has."""
    have = set(available_providers())
    if device == "auto":
        return [p for p in PROVIDER_ORDER if p in have]
    if device not in DEVICE_PROVIDERS:
        raise ConfigError(f"unknown device {device!r}", "use auto, cpu, cuda, tensorrt (ONNX Runtime's TensorRT "
                          "provider) or trt (native TensorRT)")
    wanted = DEVICE_PROVIDERS[device]
    if wanted[0] not in have:
        raise ConfigError(
            f"device {device!r} needs ONNX Runtime's {wanted[0]}, which this install lacks",
            "install onnxruntime-gpu on a CUDA machine, or use --device cpu",
        )
    return [p for p in wanted if p in have]


def _tensor_info(node: ort.NodeArg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorInfo(node.name, shape, np.dtype(_ORT_DTYPES.get(node.type, np.float32)))


class OrtBackend(Backend):
    """One ``InferenceSession`` with the chosen providers and thread settings."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warnings are not for soldiers
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = choose_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"{path.name} is not a loadable ONNX model ({first[:160]})",
                "the file is truncated or not ONNX; copy it again",
            ) from None
        self.path = path
        self.providers = self.session.get_providers()
        self.inputs = [_tensor_info(n) for n in self.session.get_inputs()]
        self.outputs = [_tensor_info(n) for n in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        log.info("onnxruntime session opened", extra={"model": path.name, "providers": self.providers})

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self._output_names, feeds)

    def close(self) -> None:
        super().close()
        self.session = None  # type: ignore[assignment]
