"""What reads a model's raw outputs: one typed spec per decoder family, told apart by ``type``.

``manifest.decoder`` is a discriminated union (pydantic, on ``type``): a YOLO output decoder (``yolov5``,
``yolov8``, ``yolox``: optional anchor-grid ``strides``, no parameters) or a language model's KV-cache layout
(``llama-kv``: the Llama config the runtime sizes its cache from, and the sampling defaults the model team chose).
Every field is typed and bounded and an unknown one is refused, so a mistyped or hostile manifest fails at load
in one line instead of a KeyError or a MemoryError later.

The JSON keeps the shape it always had (``{type, strides, params}``) and a spec dumps exactly the keys it was
given (``_AsWritten``), numbers as written: a manifest's signature covers its canonical bytes, so a bundle signed
before these types existed still verifies.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_serializer

from bastion.lm_limits import MAX_NEW_TOKENS

MAX_STRIDE = 256
YoloDecoderName = Literal["yolov5", "yolov8", "yolox"]
YOLO_DECODERS: tuple[str, ...] = get_args(YoloDecoderName)
# int or float as the maker wrote it: 10000 and 10000.0 are different signed bytes
Real = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _AsWritten(_Strict):
    """Dumps only the fields its maker gave, so optional fields added later never change a signed manifest."""

    @model_serializer(mode="wrap")
    def _only_given(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}


class YoloParams(_Strict):
    """The YOLO decoders take no parameters (all they need is the class count and the input size); anything given
    here is a typo or another tool's field, and refused."""


class YoloDecoderSpec(_Strict):
    """YOLO output decoders (``bastion.runtime.decoders``): ``strides`` for grid decoders (YOLOX), else null."""

    type: YoloDecoderName
    strides: list[Annotated[int, Field(ge=1, le=MAX_STRIDE)]] | None = Field(None, max_length=16)
    params: YoloParams = YoloParams()


class GenerationDefaults(_AsWritten):
    """The sampling defaults a model team signs with an LM (``bastion distill lm-export --temperature …``)."""

    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    temperature: Annotated[Real, Field(ge=0, le=100)] = 0.0
    top_k: int = Field(0, ge=0, le=1 << 30)
    top_p: Annotated[Real, Field(ge=1e-6, le=1)] = 1.0


class LlamaKvParams(_AsWritten):
    """The Llama config of an LM bundle's graph (docs/bundle.md, ``task: lm``): the cache is
    ``2 · n_layers · max_seq_len · n_kv_heads · head_dim`` floats, so each factor is bounded."""

    n_layers: int = Field(ge=1, le=1024)
    n_kv_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=4096)
    max_seq_len: int = Field(ge=2, le=1 << 20)
    vocab_size: int = Field(ge=2, le=1 << 22)
    dim: int | None = Field(None, ge=1, le=1 << 16)
    hidden_dim: int | None = Field(None, ge=1, le=1 << 18)
    n_heads: int | None = Field(None, ge=1, le=1024)
    norm_eps: Annotated[Real, Field(gt=0, le=1)] = 1e-5
    rope_theta: Annotated[Real, Field(gt=0, le=1e9)] = 10000.0
    attention_bias: bool = False  # Qwen2: biases on q/k/v
    stop: list[Annotated[int, Field(ge=0, le=1 << 22)]] = Field([2], max_length=64)
    bos: int | None = Field(None, ge=0, le=1 << 22)
    generation: GenerationDefaults = GenerationDefaults()


class LlamaKvDecoderSpec(_Strict):
    """A language model's KV-cache spec: ``type: llama-kv``, no strides, the Llama config in ``params``."""

    type: Literal["llama-kv"]
    strides: None = None
    params: LlamaKvParams


DecoderSpec = Annotated[Union[YoloDecoderSpec, LlamaKvDecoderSpec], Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(DecoderSpec)


def decoder_spec(data: dict) -> YoloDecoderSpec | LlamaKvDecoderSpec:
    """A decoder spec from its JSON form (``{"type": …, …}``); raises pydantic's ValidationError."""
    return _ADAPTER.validate_python(data)
