"""``Generator``: a signed ``task: lm`` bundle → ONNX Runtime with a KV cache → streamed text. No torch.

The bundle holds ``model.onnx`` (inputs ``input_ids``, ``position_ids``, ``past.{i}.key|value``; outputs
``logits``, ``present.*``), ``tokenizer.json`` (Hugging Face ``tokenizers``) and, in the manifest's decoder
params, the shapes and stop tokens.  The loop is a few lines of numpy around ``session.run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from bastion.errors import ConfigError, ModelLoadError
from bastion.models.bundle import Bundle
from bastion.runtime.backends import open_backend

MAX_NEW_TOKENS = 2048
MIN_ORT = (1, 23)  # bastion.distill.lm_onnx writes opset 23 Attention/RotaryEmbedding


class Generator:
    def __init__(self, bundle: Bundle, threads: int | None = 1) -> None:
        m = bundle.manifest
        if m.task != "lm" or m.decoder is None or m.decoder.type != "llama-kv":
            raise ConfigError(f"{m.name} is not a language-model bundle (task {m.task})",
                              "give a bundle made by bastion's LM export")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            from bastion.errors import MissingExtraError

            raise MissingExtraError("language models", "lm", "tokenizers") from None
        tok_file = next((bundle.root / f.path for f in m.files if f.role == "tokenizer"), None)
        if tok_file is None:
            raise ModelLoadError(f"bundle {m.name} has no tokenizer file")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        p = m.decoder.params
        self.n_layers, self.n_kv, self.head_dim = p["n_layers"], p["n_kv_heads"], p["head_dim"]
        self.context = p["max_seq_len"]
        self.stop = tuple(p.get("stop", [2]))
        if self.tokenizer.get_vocab_size() > p["vocab_size"]:
            raise ModelLoadError(f"tokenizer of {m.name} has {self.tokenizer.get_vocab_size()} tokens, the model "
                                 f"{p['vocab_size']}", "the bundle mixes files from different models")
        try:
            self.backend = open_backend(bundle.model_path, device="cpu", threads=threads)
        except ModelLoadError as exc:
            import onnxruntime

            if tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) < MIN_ORT:
                raise ModelLoadError(f"{m.name} needs onnxruntime >= {'.'.join(map(str, MIN_ORT))} (ONNX opset 23 "
                                     f"Attention); this machine has {onnxruntime.__version__}",
                                     "pip install -U onnxruntime (or onnxruntime-gpu)") from exc
            raise
        self._with_mask = any(i.name == "attention_mask" for i in self.backend.inputs)  # older exports lack it
        self.bundle = bundle

    @classmethod
    def load(cls, model: str | Path, threads: int | None = 1, allow_unsigned: bool = False) -> "Generator":
        return cls(Bundle.open(model, allow_unsigned=allow_unsigned), threads)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generate_ids(self, ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, stop: tuple[int, ...] | None = None, seed: int | None = None
                     ) -> Iterator[int]:
        """Token ids after ``ids``; greedy when ``temperature`` is 0."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        if len(ids) >= self.context:
            raise ConfigError(f"the prompt is {len(ids)} tokens; this model's context is {self.context}",
                              "shorten the prompt")
        stop = self.stop if stop is None else stop
        rng = np.random.default_rng(seed)
        steps = min(max_new_tokens, self.context - len(ids))
        logits, past = self.forward(ids)
        for produced in range(1, steps + 1):
            nxt = self._pick(logits[0, -1], temperature, top_k, top_p, rng)
            if nxt in stop:
                return
            yield nxt
            if produced < steps:  # the last token needs no pass of its own
                logits, past = self.forward([nxt], past)

    def empty_past(self) -> dict[str, np.ndarray]:
        return {f"past.{i}.{kv}": np.zeros((1, self.n_kv, 0, self.head_dim), np.float32)
                for i in range(self.n_layers) for kv in ("key", "value")}

    def forward(self, ids: list[int], past: dict[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pass of the graph: ``ids`` after the ``past`` cache (empty: from the start) → logits [1, T, vocab]
        and the new cache. Positions and the attention mask follow from the cache length."""
        past = past if past is not None else self.empty_past()
        start = next(iter(past.values())).shape[2]
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None], **past}
        if self._with_mask:
            feeds["attention_mask"] = np.ones((1, start + len(ids)), np.int64)
        outputs = self.backend.run(feeds)
        return outputs[0], dict(zip(past, outputs[1:]))

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
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

    def generate(self, prompt: str, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
        """Stream text pieces; joined they are the decoded continuation (byte-fallback safe)."""
        ids = self.encode(prompt)
        produced: list[int] = []
        shown = ""
        for token in self.generate_ids(ids, max_new_tokens, **kwargs):
            produced.append(token)
            text = self.tokenizer.decode(ids + produced)
            prefix = self.tokenizer.decode(ids)
            piece = text[len(prefix):][len(shown):]
            if piece and not piece.endswith("\ufffd"):
                shown += piece
                yield piece

    def close(self) -> None:
        self.backend.close()
