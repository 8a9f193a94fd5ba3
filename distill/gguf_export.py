"""A bastion Llama as a GGUF file for llama.cpp users (the ``gguf`` package, ``[distill]`` extra).

Follows llama.cpp's own Llama conversion: architecture ``llama``, tensors ``token_embd``, ``blk.N.attn_q`` …
``output``, RMSNorm weights in F32, and the SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``).
bastion's module keeps llama2.c's interleaved RoPE pairs — the layout ggml's ``llama`` rope expects — so q/k are
written as they are. A Hugging Face checkpoint is un-permuted into that layout when it is loaded
(``llama.load_hf``); ``../shared/NOTES.md`` measured that skipping this step makes llama.cpp diverge.

Precision: ``f32``, ``f16``, or ``q8_0`` (8-bit blocks of 32 along each row; a matrix whose rows are not a
multiple of 32 long stays F16, as llama.cpp's converter does).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from bastion.errors import ConfigError, MissingExtraError

log = logging.getLogger(__name__)
FTYPES = ("f32", "f16", "q8_0")
OURS_TO_GGUF = {
    "attention_norm": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "w1": "ffn_gate",
    "w2": "ffn_down",
    "w3": "ffn_up",
}


def _vocab(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """Tokens in id order, SentencePiece-BPE scores (later merges score lower), token types, special ids."""
    import gguf

    data = json.loads(Path(tokenizer_json).read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"{tokenizer_json} has ids beyond the model's vocabulary of {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [0.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for piece, i in {**vocab, **specials}.items():
        tokens[i] = piece
        if piece in specials or piece in ("<s>", "</s>"):
            types[i] = int(gguf.TokenType.CONTROL)
        elif piece == "<unk>":
            types[i] = int(gguf.TokenType.UNKNOWN)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            types[i] = int(gguf.TokenType.BYTE)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
            scores[i] = -float(i)
    ids = {"bos": vocab.get("<s>", 1), "eos": vocab.get("</s>", 2), "unk": vocab.get("<unk>", 0)}
    return tokens, scores, types, ids


def write_gguf(model, tokenizer_json: Path, path: Path, name: str, ftype: str = "f16") -> dict:
    """Write ``model`` (a bastion ``Llama``) with its tokenizer to ``path``; returns what was written."""
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("GGUF export", "distill", "gguf") from None
    if ftype not in FTYPES:
        raise ConfigError(f"GGUF type {ftype!r}: use one of {', '.join(FTYPES)}")
    c = model.c
    tokens, scores, types, special = _vocab(tokenizer_json, c.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[ftype]
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_unk_token_id(special["unk"])
    writer.add_add_bos_token(True)
    counts = {"F32": 0, "F16": 0, "Q8_0": 0}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if getattr(c, "attention_bias", False):
        raise ConfigError("GGUF export of q/k/v biases (Qwen2) is not supported yet")
    named = [
        ("token_embd.weight", state["tok_embeddings.weight"]),
        ("output_norm.weight", state["norm.weight"]),
        ("output.weight", state["output.weight"]),
    ]
    for i in range(c.n_layers):
        named += [
            (f"blk.{i}.{theirs}.weight", state[f"layers.{i}.{ours}.weight"]) for ours, theirs in OURS_TO_GGUF.items()
        ]
    for tensor_name, array in named:
        array = np.ascontiguousarray(array, np.float32)
        if array.ndim == 1 or ftype == "f32":
            writer.add_tensor(tensor_name, array)
            counts["F32"] += 1
        elif ftype == "q8_0" and array.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            counts["Q8_0"] += 1
        else:
            writer.add_tensor(tensor_name, array.astype(np.float16))
            counts["F16"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    log.info("GGUF %s written: %s", ftype, counts)
    return {"path": str(path), "type": ftype, "tensors": counts, "bytes": path.stat().st_size}


def read_gguf(path: Path):  # a bastion Llama
    """Rebuild a bastion ``Llama`` from a GGUF this module wrote (round-trip checks; F32/F16/Q8_0 tensors)."""
    import gguf
    import torch

    from bastion.distill.llama import Llama, LlamaConfig

    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    c = LlamaConfig(
        dim=field("llama.embedding_length"),
        hidden_dim=field("llama.feed_forward_length"),
        n_layers=field("llama.block_count"),
        n_heads=field("llama.attention.head_count"),
        n_kv_heads=field("llama.attention.head_count_kv"),
        vocab_size=field("llama.vocab_size"),
        max_seq_len=field("llama.context_length"),
        norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base"),
    )
    arrays = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        arrays[t.name] = np.asarray(data, np.float32).reshape([int(d) for d in reversed(t.shape)])
    sd = {
        "tok_embeddings.weight": arrays["token_embd.weight"],
        "norm.weight": arrays["output_norm.weight"],
        "output.weight": arrays["output.weight"],
    }
    for i in range(c.n_layers):
        for ours, theirs in OURS_TO_GGUF.items():
            sd[f"layers.{i}.{ours}.weight"] = arrays[f"blk.{i}.{theirs}.weight"]
    model = Llama(c)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()})
    return model.eval()
