"""``Generator``: a signed ``task: lm`` bundle → ONNX Runtime with a KV cache → streamed text. No torch.

The bundle holds ``model.onnx`` (written by ``bastion.distill.lm_onnx``), ``tokenizer.json`` (Hugging Face
``tokenizers``) and, in the manifest's decoder params, the shapes and stop tokens.

The graph's KV cache is a set of fixed-size buffers ("slots", one per position): a pass writes the new keys and
values into the slots named by ``position_ids``, attends over the slots ``attention_mask`` marks filled, and
returns the buffers.  Generation allocates them once for the prompt plus the answer and binds (a prefix of)
each buffer as both ``past`` and ``present`` (ONNX Runtime IOBinding), so ONNX Runtime writes the prompt, then one
slot per token, in place: nothing is copied, allocated or converted between steps, and the Python side of a step
is three integers and an argmax.  ``forward`` is the plain functional form of the same pass (tests, perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.errors import ConfigError, ModelLoadError
from bastion.lm_limits import MAX_NEW_TOKENS
from bastion.models.bundle import Bundle
from bastion.models.manifest import Manifest
from bastion.runtime.backends import open_backend

# what a bundle's ``decoder.params.generation`` may set, and the values for bundles that set nothing
GENERATION_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
MIN_ORT = (1, 28)  # opset 24 TensorScatter/Attention with nonpad_kv_seqlen and bottom-right is_causal (lm_onnx)


def check_generation(**values: float) -> None:
    """Sampling settings (a bundle's defaults or a caller's) in range, else one line saying which is wrong."""
    unknown = set(values) - set(GENERATION_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"unknown generation setting(s): {', '.join(sorted(unknown))}", f"known: {', '.join(GENERATION_DEFAULTS)}"
        )
    limits = {
        "max_new_tokens": (1, MAX_NEW_TOKENS),
        "temperature": (0.0, 100.0),
        "top_k": (0, 1 << 30),
        "top_p": (1e-6, 1.0),
    }
    for name, value in values.items():
        low, high = limits[name]
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {low}..{high}, got {value}")


class LMParams(BaseModel):
    """The ``llama-kv`` decoder params the runtime and the planner read, bounded: a manifest naming a
    billion-slot cache or lacking a field is refused in one line at load, not by a KeyError or a MemoryError."""

    model_config = ConfigDict(extra="allow")
    n_layers: int = Field(ge=1, le=1024)
    n_kv_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=4096)
    max_seq_len: int = Field(ge=2, le=1 << 20)
    vocab_size: int = Field(ge=2, le=1 << 22)
    stop: list[int] = Field([2], max_length=64)
    generation: dict[str, int | float] = {}


def lm_params(manifest: Manifest) -> LMParams:
    """The manifest's LM decoder params, validated (ModelLoadError naming the bad field)."""
    try:
        return LMParams.model_validate(manifest.decoder.params.model_dump() if manifest.decoder else {})
    except ValidationError as exc:
        from bastion.models.textfiles import first_error

        raise ModelLoadError(
            f"bundle {manifest.name}: {first_error(exc, 'decoder.params')}",
            "the bundle was not made by bastion's LM export; export it again",
        ) from None


@dataclass
class KVCache:
    """The graph's cache buffers (``past.{i}.key|value``, each [1, slots, n_kv·head_dim]) and how many slots
    hold tokens."""

    tensors: dict[str, np.ndarray]
    length: int

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    def grown(self, capacity: int) -> "KVCache":
        return KVCache(
            {k: np.pad(v, ((0, 0), (0, capacity - v.shape[1]), (0, 0))) for k, v in self.tensors.items()}, self.length
        )


class Generator:
    def __init__(self, bundle: Bundle, threads: int | None = 1) -> None:
        m = bundle.manifest
        if m.task != "lm" or m.decoder is None or m.decoder.type != "llama-kv":
            raise ConfigError(
                f"{m.name} is not a language-model bundle (task {m.task})", "give a bundle made by bastion's LM export"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError:
            from bastion.errors import MissingExtraError

            raise MissingExtraError("language models", "lm", "tokenizers") from None
        tok_entry = next((f for f in m.files if f.role == "tokenizer"), None)
        if tok_entry is None:
            raise ModelLoadError(f"bundle {m.name} has no tokenizer file")
        # tokenizer and graph are built from bytes read and hashed here, never from paths that could have been
        # rewritten since Bundle.open verified them
        tok_text = bundle.read_verified(tok_entry)
        try:
            self.tokenizer = Tokenizer.from_str(tok_text.decode("utf-8"))
        except Exception as exc:
            raise ModelLoadError(
                f"bundle {m.name}: {tok_entry.path} is not a tokenizer ({str(exc)[:120]})",
                "the bundle mixes files from different tools; export it again",
            ) from None
        p = lm_params(m).model_dump()
        self.n_layers, self.n_kv, self.head_dim = p["n_layers"], p["n_kv_heads"], p["head_dim"]
        self.context = p["max_seq_len"]
        self.stop = tuple(p["stop"])
        if self.tokenizer.get_vocab_size() > p["vocab_size"]:
            raise ModelLoadError(
                f"tokenizer of {m.name} has {self.tokenizer.get_vocab_size()} tokens, the model {p['vocab_size']}",
                "the bundle mixes files from different models",
            )
        import onnxruntime

        if tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) < MIN_ORT:
            # 1.25-1.27 load the graph but align causal attention wrongly for a prompt fed after a cache
            raise ModelLoadError(
                f"{m.name} needs onnxruntime >= {'.'.join(map(str, MIN_ORT))} (ONNX opset 24 "
                f"Attention over a fixed KV cache); this machine has {onnxruntime.__version__}",
                "pip install -U onnxruntime (or onnxruntime-gpu)",
            )
        self.backend = open_backend(bundle.model_bytes(), device="ort-cpu", threads=threads, label=m.model_file().path)
        past = next((i for i in self.backend.inputs if i.name == "past.0.key"), None)
        if past is None or len(past.shape) != 3:
            self.backend.close()
            raise ModelLoadError(
                f"{m.name} was exported by an older bastion (its KV cache layout is not the "
                "slot buffers this runtime binds)",
                "re-export it: bastion distill lm-export --teacher CHECKPOINT ...",
            )
        self.kv_width = self.n_kv * self.head_dim
        self.vocab_size = p["vocab_size"]
        self.defaults = {**GENERATION_DEFAULTS, **p["generation"]}  # the model team's sampling choice
        self.bundle = bundle

    @classmethod
    def load(
        cls, model: str | Path, threads: int | None = 1, allow_unsigned: bool = False, nation: str | None = None
    ) -> "Generator":
        """Open, verify and load a ``task: lm`` bundle. ``nation``: this unit's nation (else ``BASTION_NATION``);
        a bundle whose signed markings do not release it there is refused, as ``Detector.load`` does."""
        return cls(Bundle.open(model, allow_unsigned=allow_unsigned, nation=nation), threads)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: tuple[int, ...] | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Token ids after ``ids``; greedy when ``temperature`` is 0. What is not given comes from the bundle's
        generation defaults (``self.defaults``). Settings are checked here, before the first token is asked for."""
        d = self.defaults
        max_new_tokens = d["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        temperature = d["temperature"] if temperature is None else temperature
        top_k = d["top_k"] if top_k is None else top_k
        top_p = d["top_p"] if top_p is None else top_p
        check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        if not ids:
            raise ConfigError("the prompt has no tokens", "start it with the BOS token (encode() adds it)")
        if len(ids) >= self.context:
            raise ConfigError(
                f"the prompt is {len(ids)} tokens; this model's context is {self.context}", "shorten the prompt"
            )
        steps = min(max_new_tokens, self.context - len(ids))
        return self._decode(
            ids, steps, self.stop if stop is None else stop, temperature, top_k, top_p, np.random.default_rng(seed)
        )

    def _decode(
        self,
        ids: list[int],
        steps: int,
        stop: tuple[int, ...],
        temperature: float,
        top_k: int,
        top_p: float,
        rng: np.random.Generator,
    ) -> Iterator[int]:
        decoder = _BoundDecoder(self, capacity=len(ids) + steps - 1)  # the last token needs no pass of its own
        logits = decoder.prefill(ids)
        greedy = temperature <= 0
        for produced in range(1, steps + 1):
            # ndarray.argmax, not np.argmax: the function's dispatch alone costs ~0.7 µs a token
            nxt = int(logits.argmax()) if greedy else self._sample(logits, temperature, top_k, top_p, rng)
            if nxt in stop:
                return
            yield nxt
            if produced < steps:
                logits = decoder.step(nxt)

    def empty_cache(self, capacity: int) -> KVCache:
        return KVCache(
            {
                f"past.{i}.{kv}": np.zeros((1, capacity, self.kv_width), np.float32)
                for i in range(self.n_layers)
                for kv in ("key", "value")
            },
            0,
        )

    def forward(self, ids: list[int], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """One pass of the graph, functional: ``ids`` after what ``cache`` holds (none: from the start) → logits
        [1, T, vocab] and a new cache (grown when the old one has no free slots left)."""
        cache = cache if cache is not None else self.empty_cache(len(ids))
        start, end = cache.length, cache.length + len(ids)
        if end > cache.capacity:
            cache = cache.grown(end)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": filled_mask(cache.capacity, end),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            **cache.tensors,
        }
        outputs = self.backend.run(feeds)
        return outputs[0], KVCache(dict(zip(cache.tensors, outputs[1:])), end)

    @staticmethod
    def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
        """One token drawn from softmax(logits / temperature) after top-k and nucleus (top-p) filtering."""
        z = logits.astype(np.float64) / temperature
        if top_k > 0:
            z[z < np.sort(z)[-top_k]] = -np.inf
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs)
            keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(rng.choice(len(probs), p=probs))

    def generate(self, prompt: str, max_new_tokens: int | None = None, **kwargs) -> Iterator[str]:
        """Stream text pieces; joined they are the decoded continuation (byte-fallback safe). Bad settings raise
        here, not at the first piece."""
        ids = self.encode(prompt)
        return self._pieces(ids, self.generate_ids(ids, max_new_tokens, **kwargs))

    def _pieces(self, ids: list[int], tokens: Iterator[int]) -> Iterator[str]:
        prefix = len(self.tokenizer.decode(ids))
        produced: list[int] = []
        shown = ""
        for token in tokens:
            produced.append(token)
            piece = self.tokenizer.decode(ids + produced)[prefix:][len(shown) :]
            if piece and not piece.endswith("\ufffd"):
                shown += piece
                yield piece

    def close(self) -> None:
        self.backend.close()


def filled_mask(capacity: int, filled: int) -> np.ndarray:
    """The graph's ``attention_mask``: 1 for the first ``filled`` slots, 0 for the free tail."""
    mask = np.zeros((1, capacity), np.int64)
    mask[0, :filled] = 1
    return mask


# ONNX Runtime's CPU Attention works over every slot it is given, filled or not (a decode step at slot 60 costs
# 55 µs over 61 bound slots and 94 µs over 512): the decoder binds a prefix of the buffers — the prompt exactly,
# then the filled slots plus up to this many — and rebinds a longer prefix when the answer reaches its end
# (16, 32, 64 and 128 measured alike within noise; 32 by a hair).
WINDOW = 32
# For the same reason a long prompt goes in chunks (383 tokens: TTFT 3.9 ms in one pass, 3.3 in chunks of 64;
# 96/128/192 in between).
PREFILL_CHUNK = 64


class _BoundDecoder:
    """One generation's decoding loop on IOBinding: a prefix of each cache buffer (contiguous memory, no copy) is
    bound as both ``past`` and ``present`` (ONNX Runtime writes the new slots in place), with the same prefix of
    the attention mask; the prompt pass binds its own token/position/logits arrays, then the decode steps bind
    one-token arrays once and only change three integers (token, position, the newly filled mask slot) — and
    the bound prefix every ``WINDOW`` tokens."""

    def __init__(self, generator: Generator, capacity: int) -> None:
        self.backend = generator.backend  # an OrtBackend: IOBinding is ONNX Runtime's (bound in place, no copies)
        self.binding = self.backend.io_binding()
        self.vocab = generator.vocab_size
        self.cache = generator.empty_cache(capacity)
        self.mask = filled_mask(capacity, 0)  # bound arrays are read in place at every run
        self.bound = 0

    def _bind_slots(self, slots: int) -> None:
        for name, buffer in self.cache.tensors.items():
            prefix = buffer[:, :slots]  # batch 1, slot-major: the first `slots` slots are one contiguous block
            self.binding.bind_cpu_input(name, prefix)
            self.binding.bind_output(
                name.replace("past.", "present.", 1), "cpu", 0, np.float32, prefix.shape, prefix.ctypes.data
            )
        self.binding.bind_cpu_input("attention_mask", self.mask[:, :slots])
        self.bound = slots

    def _bind_tokens(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("position_ids", positions)
        logits = np.empty((1, ids.shape[1], self.vocab), np.float32)
        self.binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        return logits

    def prefill(self, ids: list[int]) -> np.ndarray:
        """The prompt written straight into the cache buffers, in passes of ``PREFILL_CHUNK`` tokens each bound to
        exactly the slots filled so far: ONNX Runtime's CPU Attention scores every query against every bound key
        and masks afterwards, so one 383-token pass computes 383×383 scores, chunks of 64 ~58 % of that."""
        logits = np.empty(0, np.float32)
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            end = start + len(chunk)
            self._bind_slots(end)
            self._prompt = (np.asarray([chunk], np.int64), np.arange(start, end, dtype=np.int64)[None])  # bound
            logits = self._bind_tokens(*self._prompt)
            self.mask[0, start:end] = 1
            self.backend.run_bound(self.binding)
        self.cache.length = len(ids)
        token, position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        self.logits = self._bind_tokens(token, position)[0, 0]  # a view: ONNX Runtime rewrites it every step
        self.token, self.position, self.filled = token.reshape(1), position.reshape(1), self.mask.reshape(-1)
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        n = self.cache.length
        if n == self.bound:
            self._bind_slots(min(n + WINDOW, self.cache.capacity))
        self.token[0] = token
        self.position[0] = n
        self.filled[n] = 1
        self.backend.run_bound(self.binding)
        self.cache.length = n + 1
        return self.logits
