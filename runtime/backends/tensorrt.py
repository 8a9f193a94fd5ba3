"""Native TensorRT backend (``[tensorrt]`` extra): ONNX → engine (cached per device) → device buffers on a stream.

Written against the TensorRT 10 Python API (``build_serialized_network``, named I/O tensors,
``set_input_shape``/``set_tensor_address``/``execute_async_v3``) with ``cuda-python`` for memory and streams —
no torch, no pycuda. TensorRT and cuda-python are imported lazily through ``importlib`` so nothing on the
field-node path needs them, and a machine without them gets one line saying what to install.

Engines are not portable: every plan is stored in the ``EngineCache`` under a key of GPU name, compute
capability, TensorRT version, model sha256, precision and shape profile, and a plan built for anything else is
rebuilt, never loaded. One timing cache per GPU + TensorRT version makes rebuilds fast.

Precision: ``fp32``, ``fp16`` (FP16 kernels where faster), or ``int8`` from a QDQ model (``bastion quantize``
writes one): TensorRT 10 deprecates implicit INT8 calibrators in favour of explicit quantization, so the
calibration happens once, in ONNX Runtime's quantizer, and is gated on measured mAP before TensorRT sees it.

Loader and runner are separate (Polygraphy's split): ``TrtEngineLoader`` turns verified ONNX bytes into a plan
(cached or built) and a deserialized engine; ``TensorRTBackend`` runs it. The runner shares one execution context,
one stream and one set of device buffers across calls, so it is not thread safe (``thread_safe = False``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from bastion.errors import ConfigError, MissingExtraError, ModelLoadError
from bastion.hardware.engine_cache import EngineCache, EngineKey
from bastion.runtime.backends.base import Backend, OpenOptions, TensorInfo
from bastion.runtime.backends.registry import BackendConfig, BackendSpec, register_backend

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_BYTES = 1 << 30


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and _cudart_spec() is not None


def _cudart_spec():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            continue
    return None


def _missing() -> MissingExtraError | None:
    """What is not installed for the native backend (checked without importing it), or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return MissingExtraError(
            "the native TensorRT backend",
            "tensorrt",
            "tensorrt",
            "— on a Jetson it comes with JetPack (python3-libnvinfer); on x86 from NVIDIA's "
            "own index (PyPI's tensorrt is a placeholder); or use --device ort-cuda",
        )
    if _cudart_spec() is None:
        return MissingExtraError("the native TensorRT backend", "tensorrt", "cuda-python")
    return None


def _modules():
    """(tensorrt, cudart) or a MissingExtraError that says what to install."""
    missing = _missing()
    if missing is not None:
        raise missing
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:  # installed but broken (a JetPack library missing): say so in one line
        raise ModelLoadError(f"TensorRT is installed but does not import ({exc})", "run 'bastion doctor'") from None
    return trt, importlib.import_module(_cudart_spec())


def _check(result):
    """cuda-python returns (err, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ModelLoadError(f"CUDA call failed: {err}", "check the GPU driver and free GPU memory")
    return values[0] if len(values) == 1 else values


def _profile(
    onnx_inputs: list[tuple[str, list]], opt_hw: tuple[int, int] | None, max_batch: int
) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """(name, min, opt, max) per input: dynamic batch 1..max_batch, dynamic H/W from 32 up to ``opt_hw``."""
    shapes = []
    for name, dims in onnx_inputs:
        bounds = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                bounds.append((d, d, d))
            elif axis == 0:
                bounds.append((1, 1, max_batch))
            elif opt_hw is not None and axis >= len(dims) - 2:
                size = opt_hw[axis - (len(dims) - 2)]
                bounds.append((32, size, size))
            else:
                raise ConfigError(
                    f"input {name} axis {axis} is dynamic and bastion cannot guess its range",
                    "export the model with a fixed size for that axis",
                )
        lo, opt, hi = zip(*bounds)
        shapes.append((name, tuple(lo), tuple(opt), tuple(hi)))
    return tuple(shapes)


def device_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of device 0, from the CUDA runtime."""
    _, cudart = _modules()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def build_engine(model: bytes, key: EngineKey, cache: EngineCache, label: str = "the model") -> bytes:
    """Parse the ONNX bytes (verified; never re-read from a path), build a serialized plan for ``key`` (reusing and
    refreshing the timing cache)."""
    trt, _ = _modules()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):  # no path given: external data was refused before (models.onnx_refs)
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(
            f"TensorRT cannot parse {label}: {errors}", "use --device ort-cuda (ONNX Runtime) for this model"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if key.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the scales come from the QDQ nodes
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in key.shapes:
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing_path = cache.timing_cache_path(key)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(
            f"TensorRT could not build an engine for {label} ({key.precision})",
            "try --precision fp32, a smaller --max-batch, or --device ort-cuda",
        )
    from bastion.models.atomic import atomic_write_bytes

    atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    log.info(
        "built TensorRT engine",
        extra={"model": label, "precision": key.precision, "seconds": round(time.perf_counter() - t0, 1)},
    )
    return bytes(plan)


def engine_key(model: bytes, precision: str, opt_hw: tuple[int, int] | None, max_batch: int) -> EngineKey:
    """The cache key for these model bytes on this GPU and TensorRT (reads the ONNX input shapes with ORT's
    parser). The key's sha256 is of the very bytes the engine is built from."""
    trt, _ = _modules()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use fp32, fp16 or int8")
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = [(i.name, list(i.shape)) for i in session.get_inputs()]
    gpu, cc = device_identity()
    return EngineKey(
        gpu=gpu,
        compute_capability=cc,
        tensorrt=trt.__version__,
        bundle_sha256=hashlib.sha256(model).hexdigest(),
        precision=precision,
        shapes=_profile(inputs, opt_hw, max_batch),
    )


def load_or_build(
    model: str | Path | bytes,
    precision: str = "fp16",
    opt_hw: tuple[int, int] | None = None,
    max_batch: int = 1,
    cache: EngineCache | None = None,
    label: str | None = None,
) -> tuple[bytes, EngineKey, bool]:
    """(plan, key, built?) — the cached plan for exactly this key, else a fresh build stored atomically.
    ``model``: a bundle's verified bytes (or a path, read once): the key hashes and the build parses those bytes."""
    from bastion.runtime.backends.onnxrt import read_model

    data, read_label = read_model(model)
    cache = cache or EngineCache()
    key = engine_key(data, precision, opt_hw, max_batch)
    plan = cache.load(key)
    if plan is not None:
        return plan, key, False
    plan = build_engine(data, key, cache, label or read_label)
    cache.store(key, plan)
    return plan, key, True


@dataclass(frozen=True, repr=False)
class TrtEngineLoader:
    """The loader: verified ONNX bytes + precision and shape profile → (runtime, engine, key, built?).

    The cache key hashes these bytes and a build parses these bytes; no path is opened again."""

    data: bytes
    label: str = "the model"
    precision: str = "fp16"
    opt_hw: tuple[int, int] | None = None
    max_batch: int = 1
    cache: EngineCache | None = field(default=None, compare=False)

    def __call__(self):
        trt, _ = _modules()
        plan, key, built = load_or_build(self.data, self.precision, self.opt_hw, self.max_batch, self.cache, self.label)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise ModelLoadError("TensorRT could not load the cached engine", "run 'bastion engine clear' and retry")
        return runtime, engine, key, built


class TensorRTBackend(Backend):
    """The runner: one engine, one execution context, one stream; device buffers sized for the profile's largest
    shapes. The context, stream and buffers are shared by every call, so one thread at a time."""

    name = "tensorrt"
    thread_safe = False

    def __init__(
        self,
        model: "str | Path | bytes | TrtEngineLoader",
        precision: str = "fp16",
        opt_hw: tuple[int, int] | None = None,
        max_batch: int = 1,
        cache: EngineCache | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__()
        self._lock = threading.Lock()
        trt, cudart = _modules()
        self._trt, self._cudart = trt, cudart
        t0 = time.perf_counter()
        if not isinstance(model, TrtEngineLoader):
            from bastion.runtime.backends.onnxrt import read_model

            data, read_label = read_model(model)
            model = TrtEngineLoader(data, label or read_label, precision, opt_hw, max_batch, cache)
        self._runtime, self.engine, self.key, built = model()
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self._device: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        maxima = {name: hi for name, _, _, hi in self.key.shapes}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(self.engine.get_tensor_shape(name))
            info = TensorInfo(name, tuple(None if d < 0 else int(d) for d in shape), dtype)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(info)
            if is_input:
                self.context.set_input_shape(name, maxima[name])
        for info in self.inputs + self.outputs:  # the largest shape each tensor can take under the profile
            n = int(np.prod(self.context.get_tensor_shape(info.name))) * info.dtype.itemsize
            self._device[info.name] = (_check(cudart.cudaMalloc(n)), n)
            self.context.set_tensor_address(info.name, self._device[info.name][0])
        self.providers = [f"TensorRT {trt.__version__} ({self.key.precision}, {self.key.gpu})"]
        self.start_seconds = round(time.perf_counter() - t0, 3)
        log.info("TensorRT backend ready", extra={"cached": not built, "seconds": self.start_seconds})

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # thread_safe is False, so detect_stream gives this backend one worker; the lock still keeps any other
        # caller that shares it (the node's threads, an SDK user's) from interleaving two calls on one context
        with self._lock:
            return self._run_locked(feeds)

    def _run_locked(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for info in self.inputs:
            array = np.ascontiguousarray(feeds[info.name], dtype=info.dtype)
            pointer, capacity = self._device[info.name]
            if array.nbytes > capacity:
                raise ConfigError(
                    f"input {info.name} {array.shape} is larger than the engine's profile allows",
                    "rebuild with a larger --max-batch or size: bastion engine build",
                )
            if not self.context.set_input_shape(info.name, array.shape):
                raise ConfigError(f"input {info.name} shape {array.shape} is outside the engine's profile")
            _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):  # the Python API takes the raw handle
            raise ModelLoadError("TensorRT inference failed", "see the log; run 'bastion doctor'")
        results = []
        for info in self.outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(info.name)), dtype=info.dtype)
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._device[info.name][0], out.nbytes, d2h, self.stream))
            results.append(out)
        _check(cudart.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        with self._lock:  # never free the buffers under a call in flight
            if self._closed:
                return
            for pointer, _ in self._device.values():
                self._cudart.cudaFree(pointer)
            self._cudart.cudaStreamDestroy(self.stream)
            self.context = None
            self.engine = None
            super().close()


# -- the registry's face of this backend: trt ---------------------------------------------------------------------
class TrtConfig(BackendConfig):
    type: Literal["trt"] = "trt"
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    opt_hw: tuple[int, int] | None = None  # the profile's largest (and optimal) input size of a dynamic model
    max_batch: int = Field(1, ge=1, le=1024)


@register_backend("trt")
class NativeTensorRT(BackendSpec):
    config = TrtConfig
    thread_safe = TensorRTBackend.thread_safe
    library = "tensorrt"
    needs = "the [tensorrt] extra: JetPack, or NVIDIA's wheels + cuda-python"

    @classmethod
    def why_unavailable(cls) -> str | None:
        missing = _missing()
        return None if missing is None else str(missing)

    @classmethod
    def version(cls) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-libs"):
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return None

    @classmethod
    def config_for(cls, options: OpenOptions) -> BackendConfig:
        return TrtConfig(
            precision="int8" if options.precision == "int8" else "fp16",
            opt_hw=options.size_hw,
            max_batch=options.max_batch,
        )

    @classmethod
    def load(cls, model: bytes, config: BackendConfig, label: str) -> Backend:
        return TensorRTBackend(TrtEngineLoader(model, label, config.precision, config.opt_hw, config.max_batch))
