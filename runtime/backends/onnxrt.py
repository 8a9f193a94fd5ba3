"""ONNX Runtime backends ``ort-cpu``, ``ort-cuda``, ``ort-trt``: CPU everywhere, CUDA / TensorRT execution providers
where the onnxruntime-gpu build is installed.

Loader and runner are separate (Polygraphy's split): ``OrtSessionLoader`` holds the model's verified bytes and
turns them into an ``InferenceSession`` (general, or pinned to one input shape); ``OrtBackend`` runs sessions made
by its loader and never sees a path, so what runs is exactly what was verified.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import Field

from bastion.errors import ConfigError, ModelLoadError
from bastion.hardware.backend_names import AUTO, device_name
from bastion.runtime.backends.base import Backend, OpenOptions, TensorInfo
from bastion.runtime.backends.registry import BackendConfig, BackendSpec, register_backend

log = logging.getLogger(__name__)

# Preference order for device="auto": fastest first.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {  # backend name -> providers, the first one required, the rest fallbacks inside the session
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
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


def _missing_provider(name: str) -> str | None:
    """None when this onnxruntime build has the provider backend ``name`` needs, else the one line to show."""
    wanted = DEVICE_PROVIDERS[name][0]
    if wanted in available_providers():
        return None
    return (
        f"{name} needs ONNX Runtime's {wanted}, which this install lacks — "
        "install onnxruntime-gpu on a CUDA machine, or use --device ort-cpu"
    )


def choose_providers(device: str) -> list[str]:
    """Providers for ``device`` ('auto' or an ONNX Runtime backend name or alias) that this install has."""
    have = set(available_providers())
    name = device_name(device)
    if name == AUTO:
        return [p for p in PROVIDER_ORDER if p in have]
    if name not in DEVICE_PROVIDERS:
        raise ConfigError(f"{name} is not an ONNX Runtime backend", "use ort-cpu, ort-cuda or ort-trt")
    missing = _missing_provider(name)
    if missing:
        raise ConfigError(missing)
    return [p for p in DEVICE_PROVIDERS[name] if p in have]


THREADS_ENV = "BASTION_THREADS"


def default_threads() -> int | None:
    """The CPU threads of a session that no command, config or caller sized: ``BASTION_THREADS``, else None
    (ONNX Runtime's choice: one per physical core of the *host*, which oversubscribes a container held to fewer
    cores by its CPU quota, and several processes sharing a few cores)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1024:
        raise ConfigError(f"{THREADS_ENV}={raw!r} is not a number of threads", f"e.g. {THREADS_ENV}=2, or unset it")
    return int(raw)


@dataclass(frozen=True, repr=False)
class OrtSessionLoader:
    """The loader: a model's bytes (read and hashed once) + how to open them → ``InferenceSession``s.

    Every session a backend ever uses — the general one and any pinned to one input shape — comes from
    ``self.data``; nothing re-opens a path."""

    data: bytes
    label: str
    providers: tuple[str, ...]
    threads: int | None = None

    @classmethod
    def from_model(
        cls, model: str | Path | bytes, device: str = "auto", threads: int | None = None, label: str | None = None
    ) -> "OrtSessionLoader":
        data, read_label = read_model(model)
        return cls(data, label or read_label, tuple(choose_providers(device)), threads)

    def __call__(self, fixed_dims: dict[str, int] | None = None) -> ort.InferenceSession:
        """An ``InferenceSession`` on the bytes, or a ModelLoadError naming the model."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warnings are not for soldiers
        threads = self.threads or default_threads()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        for name, value in (fixed_dims or {}).items():  # a dynamic model pinned to one shape plans better
            options.add_free_dimension_override_by_name(name, int(value))
        try:
            return ort.InferenceSession(self.data, sess_options=options, providers=list(self.providers))
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"{self.label} is not a loadable ONNX model ({first[:160]})",
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
    """The runner: one ``InferenceSession`` (plus shape-pinned ones) from an ``OrtSessionLoader``.

    ``model`` is a loader, the model's bytes (a bundle's ``model_bytes()``: verified) or a path (a bare ONNX file,
    read once here). ONNX Runtime's ``run`` may be called from several threads at once: ``thread_safe``.
    """

    name = "onnxruntime"
    thread_safe = True

    def __init__(
        self,
        model: "str | Path | bytes | OrtSessionLoader",
        device: str = "auto",
        threads: int | None = None,
        fixed_dims: dict[str, int] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__()
        loader = (
            model if isinstance(model, OrtSessionLoader) else OrtSessionLoader.from_model(model, device, threads, label)
        )
        self.label = loader.label
        self.session = loader(fixed_dims)
        self.providers = self.session.get_providers()
        self.inputs = [_tensor_info(n) for n in self.session.get_inputs()]
        self.outputs = [_tensor_info(n) for n in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        # one image input with a dynamic axis: the only kind a stream can pin (LMs have many inputs)
        self._pinnable = len(self.inputs) == 1 and any(d is None for d in self.inputs[0].shape)
        # the loader (and its verified bytes), kept only while a pinned session may still be built from it
        self._loader: OrtSessionLoader | None = loader if self._pinnable else None
        self._specialized: dict[tuple[int, ...], ort.InferenceSession] = {}
        self._pinning: dict[tuple[int, ...], threading.Thread] = {}
        self._seen: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        log.info("onnxruntime session opened", extra={"model": self.label, "providers": self.providers})

    # -- what the LM's decoding loop needs (runtime/lm.py): ONNX Runtime's IOBinding on the general session --
    def io_binding(self) -> ort.IOBinding:
        """A fresh IOBinding on the general session (inputs and outputs bound in place, no copies)."""
        self._check_open()
        return self.session.io_binding()

    def run_bound(self, binding: ort.IOBinding) -> None:
        """Run the general session on what ``binding`` holds (outputs land in the bound arrays)."""
        self._check_open()
        self.session.run_with_iobinding(binding)

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
                    loader = self._loader
                    if len(self._pinning) + 1 >= self.MAX_SPECIALIZED:
                        self._loader = None  # the last pinned session to build: it holds the bytes now
                    self._pinning[shape] = threading.Thread(
                        target=self._pin, args=(shape, loader), daemon=False, name="bastion-pin-session"
                    )
                    self._pinning[shape].start()
        return self.session

    def _pin(self, shape: tuple[int, ...], loader: OrtSessionLoader | None) -> None:
        session = self.session  # None once closed: a close() that stopped waiting must not kill this thread
        if loader is None or session is None:
            return
        names = session.get_inputs()[0].shape
        dims = {n: v for n, v in zip(names, shape) if isinstance(n, str)}
        try:  # the bytes the general session was built from: a file rewritten since never gets in
            pinned = loader(dims)
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

    # close() waits this long for a pinned session still being built (~100 ms on a CPU; a TensorRT EP build can
    # take minutes). Bounded, so a closing node never hangs on it; the thread is no daemon, so the interpreter's
    # exit still waits for the build to end instead of killing it inside ONNX Runtime (which aborts the process).
    PIN_CLOSE_WAIT_S = 30.0

    def close(self) -> None:
        super().close()
        # a build in flight finishes (and is then dropped) before the sessions go
        self.wait_pinned(self.PIN_CLOSE_WAIT_S)
        if any(thread.is_alive() for thread in self._pinning.values()):
            log.warning(
                "a pinned session is still being built after %.0f s; the exit waits for it", self.PIN_CLOSE_WAIT_S
            )
        self.session = None  # type: ignore[assignment]
        self._loader = None
        self._specialized.clear()


# -- the registry's faces of this backend: ort-cpu, ort-cuda, ort-trt -----------------------------------------------
class OrtConfig(BackendConfig):
    threads: int | None = Field(None, ge=1, le=1024)  # intra-op threads; None: ONNX Runtime's default (all cores)


class _OrtSpec(BackendSpec):
    thread_safe = OrtBackend.thread_safe
    library = "onnxruntime"
    needs = "onnxruntime-gpu on a CUDA machine"

    @classmethod
    def why_unavailable(cls) -> str | None:
        return _missing_provider(cls.name)

    @classmethod
    def version(cls) -> str | None:
        return ort.__version__

    @classmethod
    def config_for(cls, options: OpenOptions) -> BackendConfig:
        return cls.config(threads=options.threads)

    @classmethod
    def load(cls, model: bytes, config: BackendConfig, label: str) -> Backend:
        return OrtBackend(OrtSessionLoader(model, label, tuple(choose_providers(cls.name)), config.threads))


class OrtCpuConfig(OrtConfig):
    type: Literal["ort-cpu"] = "ort-cpu"


class OrtCudaConfig(OrtConfig):
    type: Literal["ort-cuda"] = "ort-cuda"


class OrtTrtConfig(OrtConfig):
    type: Literal["ort-trt"] = "ort-trt"


@register_backend("ort-cpu")
class OrtCpu(_OrtSpec):
    config = OrtCpuConfig


@register_backend("ort-cuda")
class OrtCuda(_OrtSpec):
    config = OrtCudaConfig


@register_backend("ort-trt")
class OrtTrt(_OrtSpec):
    config = OrtTrtConfig
