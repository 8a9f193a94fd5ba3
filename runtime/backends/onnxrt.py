"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers where present."""

from __future__ import annotations

import logging
import threading
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
        raise ConfigError(
            f"unknown device {device!r}",
            "use auto, cpu, cuda, tensorrt (ONNX Runtime's TensorRT provider) or trt (native TensorRT)",
        )
    wanted = DEVICE_PROVIDERS[device]
    if wanted[0] not in have:
        raise ConfigError(
            f"device {device!r} needs ONNX Runtime's {wanted[0]}, which this install lacks",
            "install onnxruntime-gpu on a CUDA machine, or use --device cpu",
        )
    return [p for p in wanted if p in have]


def _session(
    data: bytes, label: str, device: str, threads: int | None, fixed_dims: dict[str, int] | None = None
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``data`` (bytes, never a path), or a ModelLoadError naming ``label``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warnings are not for soldiers
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    for name, value in (fixed_dims or {}).items():  # a dynamic model pinned to one shape plans better
        options.add_free_dimension_override_by_name(name, int(value))
    providers = choose_providers(device)
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{label} is not a loadable ONNX model ({first[:160]})",
            "the file is truncated or not ONNX; copy it again",
        ) from None


def _tensor_info(node: ort.NodeArg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorInfo(node.name, shape, np.dtype(_ORT_DTYPES.get(node.type, np.float32)))


MAX_MODEL_BYTES = 2**31  # protobuf cannot serialise a larger ONNX file (and external data is refused)


def read_model(model: str | Path | bytes) -> tuple[bytes, str]:
    """(bytes, label) of a model given as bytes or as a path, read once: every session is built from these bytes,
    so nothing rewritten on disk later — or between a bundle's verification and this read, when the caller
    passes the bundle's verified bytes — can reach a session. External data is refused here (models.onnx_refs)."""
    from bastion.models.onnx_refs import refuse_external_data
    from bastion.models.safe_read import TooLarge, read_bounded

    if isinstance(model, (bytes, bytearray, memoryview)):
        data, label = bytes(model), "the model"
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            data, label = read_bounded(path, MAX_MODEL_BYTES), path.name
        except TooLarge as exc:
            raise ModelLoadError(
                f"{path.name} is {exc.size / 2**30:.1f} GiB: no ONNX model file is larger than "
                "2 GiB (protobuf's limit)",
                "is it really a model?",
            ) from None
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path} ({exc.strerror or exc})") from None
    refuse_external_data(data, label)
    return data, label


class OrtBackend(Backend):
    """One ``InferenceSession`` with the chosen providers and thread settings, built from the model's bytes.

    ``model`` is the model's bytes (a bundle's ``model_bytes()``: verified) or a path (a bare ONNX file, read
    once here). The sessions pinned to one input shape later are built from the same bytes, never from a path.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        device: str = "auto",
        threads: int | None = None,
        fixed_dims: dict[str, int] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__()
        data, read_label = read_model(model)
        label = label or read_label
        self._open_args = (device, threads)
        self.session = _session(data, label, device, threads, fixed_dims)
        self.label = label
        self.path = None if isinstance(model, (bytes, bytearray, memoryview)) else Path(model)  # display only
        self.providers = self.session.get_providers()
        self.inputs = [_tensor_info(n) for n in self.session.get_inputs()]
        self.outputs = [_tensor_info(n) for n in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        # one image input with a dynamic axis: the only kind a stream can pin (LMs have many inputs)
        self._pinnable = len(self.inputs) == 1 and any(d is None for d in self.inputs[0].shape)
        # the verified bytes, kept only while a pinned session may still be built from them
        self._model_bytes: bytes | None = data if self._pinnable else None
        self._specialized: dict[tuple[int, ...], ort.InferenceSession] = {}
        self._pinning: dict[tuple[int, ...], threading.Thread] = {}
        self._seen: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        log.info("onnxruntime session opened", extra={"model": label, "providers": self.providers})

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session_for(feeds).run(self._output_names, feeds)

    # A stream repeats one input shape (a camera, a video): after SPECIALIZE_AFTER runs of the same shape a
    # dynamic model gets a second session with that shape pinned (ORT then plans memory and picks kernels for
    # it: ~4 % faster per inference on this CPU, docs/benchmarks.md). The pinned session is built on a
    # background thread — building takes ~100 ms, which must not land inside a frame's inference — and the
    # general session serves until it is ready. Other shapes keep the general session; at most
    # MAX_SPECIALIZED shapes are pinned, so a folder of odd-sized images costs nothing extra.
    SPECIALIZE_AFTER = 3
    MAX_SPECIALIZED = 2

    def _session_for(self, feeds: dict[str, np.ndarray]) -> ort.InferenceSession:
        if not self._pinnable:
            return self.session
        shape = tuple(feeds[self.inputs[0].name].shape)
        special = self._specialized.get(shape)
        if special is not None:
            return special
        if len(self._seen) > 64:  # a folder of many sizes: stop counting
            return self.session
        seen = self._seen[shape] = self._seen.get(shape, 0) + 1
        if seen == self.SPECIALIZE_AFTER and len(self._pinning) < self.MAX_SPECIALIZED:
            with self._lock:
                if shape not in self._pinning:
                    # not a daemon: killing it inside ORT's session build at interpreter exit aborts the process
                    data = self._model_bytes
                    if len(self._pinning) + 1 >= self.MAX_SPECIALIZED:
                        self._model_bytes = None  # the last pinned session to build: it holds the bytes now
                    self._pinning[shape] = threading.Thread(
                        target=self._pin, args=(shape, data), daemon=False, name="bastion-pin-session"
                    )
                    self._pinning[shape].start()
        return self.session

    def _pin(self, shape: tuple[int, ...], data: bytes | None) -> None:
        names = self.session.get_inputs()[0].shape
        dims = {n: v for n, v in zip(names, shape) if isinstance(n, str)}
        if data is None:
            return
        try:  # the bytes the general session was built from: a file rewritten since never gets in
            pinned = _session(data, self.label, *self._open_args, dims)
        except Exception:
            log.warning("could not pin a session to shape %s", shape, exc_info=True)
            return
        if not self._closed:
            self._specialized[shape] = pinned
            log.info("pinned a session to input shape %s", shape)

    def wait_pinned(self, timeout: float | None = None) -> None:
        """Block until the pinned sessions being built are ready (tests, benchmarks that want a steady state)."""
        for thread in list(self._pinning.values()):
            thread.join(timeout)

    def close(self) -> None:
        super().close()
        self.wait_pinned()  # a build in flight finishes (and is then dropped) before the sessions go
        self.session = None  # type: ignore[assignment]
        self._model_bytes = None
        self._specialized.clear()
