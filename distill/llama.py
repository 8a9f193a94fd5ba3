"""A Llama decoder in one readable file (nanoGPT-style), a llama2.c ``.bin`` loader, and its ONNX export.

The module is the training and reference model: batch 1 in its cache path, explicit KV cache tensors in and out,
the causal mask computed from the lengths, RoPE with llama2.c's interleaved pairs (so llama2.c checkpoints load
without permuting).  Its ONNX form is written by ``bastion.distill.lm_onnx`` straight from the weights; the field
node runs that with ``bastion.runtime.lm`` (no torch).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bastion.errors import ModelLoadError


@dataclass
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False  # Qwen2: biases on q/k/v

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3) … — llama2.c's layout. x: [B, H, T, D]; cos/sin: [T, D] (each
    pair's angle twice).  (x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin) is written x·cos + (x @ swap)·sin, where
    ``swap`` is the fixed ±1 matrix taking (x0, x1) to (−x1, x0): one MatMul instead of strided slices, stacks and
    reshapes — a third of the exported graph's nodes, with bit-identical values."""
    return x * cos + (x @ swap) * sin


class Block(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.c = c
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attention_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=False)

    def forward(self, x, cos, sin, swap, mask, past_k, past_v):
        """Batch 1 (the export shape): reshapes use constants, so the ONNX graph needs no Shape arithmetic."""
        c = self.c
        rep = c.n_heads // c.n_kv_heads
        h = self.attention_norm(x)
        q = self.wq(h).reshape(1, -1, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(h).reshape(1, -1, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(h).reshape(1, -1, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin, swap), rope(k, cos, sin, swap)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        # grouped-query attention by broadcasting: q heads g·rep … g·rep+rep−1 share kv head g
        qg = q.reshape(1, c.n_kv_heads, rep, -1, c.head_dim)
        att = (qg @ k.unsqueeze(2).transpose(-2, -1)) / (c.head_dim**0.5) + mask
        y = (torch.softmax(att, dim=-1) @ v.unsqueeze(2)).reshape(1, c.n_heads, -1, c.head_dim)
        x = x + self.wo(y.transpose(1, 2).reshape(1, -1, c.n_heads * c.head_dim))
        h = self.ffn_norm(x)
        x = x + self.w2(torch.nn.functional.silu(self.w1(h)) * self.w3(h))
        return x, k, v


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        freqs = torch.outer(torch.arange(c.max_seq_len).float(), inv).repeat_interleave(2, dim=-1)
        self.register_buffer("cos_table", freqs.cos(), persistent=False)
        self.register_buffer("sin_table", freqs.sin(), persistent=False)
        swap = torch.zeros(c.head_dim, c.head_dim)
        swap[torch.arange(1, c.head_dim, 2), torch.arange(0, c.head_dim, 2)] = -1.0  # out 2i   = −x(2i+1)
        swap[torch.arange(0, c.head_dim, 2), torch.arange(1, c.head_dim, 2)] = 1.0  # out 2i+1 = x(2i)
        self.register_buffer("swap", swap, persistent=False)

    def forward(self, input_ids, position_ids, *past, attention_mask=None):
        """input_ids, position_ids: [1, T]; past: k0, v0, k1, v1 … each [1, n_kv, P, head_dim]; attention_mask
        (optional) [1, P+T], 0 for key positions to ignore (padding), as Hugging Face exports take it.
        Returns logits [1, T, vocab] and the present k/v (each [1, n_kv, P+T, head_dim])."""
        t = input_ids.shape[1]
        p = past[0].shape[2]
        cos = self.cos_table[position_ids[0]]
        sin = self.sin_table[position_ids[0]]
        rows = torch.arange(t, device=input_ids.device).unsqueeze(1) + p
        cols = torch.arange(p + t, device=input_ids.device).unsqueeze(0)
        mask = torch.where(cols <= rows, 0.0, float("-inf"))
        if attention_mask is not None:
            mask = mask + torch.where(attention_mask == 0, float("-inf"), 0.0)
        x = self.tok_embeddings(input_ids)
        present = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, self.swap, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.output(self.norm(x)), *present)

    def empty_past(self) -> list[torch.Tensor]:
        c = self.c
        device = self.cos_table.device  # the module's device (CPU, or CUDA while distilling on a GPU)
        return [torch.zeros(1, c.n_kv_heads, 0, c.head_dim, device=device) for _ in range(2 * c.n_layers)]


def load_llama2c(path: Path) -> Llama:
    """karpathy/llama2.c legacy (v0) checkpoint: 7 int32 header values, then fp32 weights in a fixed order."""
    data = Path(path).read_bytes()
    if len(data) < 28:
        raise ModelLoadError(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("7i", data[:28])
    shared = vocab > 0
    c = LlamaConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq)
    if min(dim, hidden, layers, heads, kv_heads, seq) <= 0 or dim % heads or heads % kv_heads:
        raise ModelLoadError(f"{path} is not a llama2.c checkpoint (header {dim, hidden, layers, heads, kv_heads})")
    w = np.frombuffer(data, dtype=np.float32, offset=28)
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > len(w):
            raise ModelLoadError(f"{path} is truncated (needs more weights than it holds)")
        out = torch.from_numpy(w[pos : pos + n].copy()).view(*shape)
        pos += n
        return out

    kv_dim = c.n_kv_heads * c.head_dim
    model = Llama(c)
    sd = {"tok_embeddings.weight": take(c.vocab_size, dim)}
    per_layer = {name: [] for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")}
    per_layer["attention_norm"] = [x for x in take(layers, dim)]
    per_layer["wq"] = list(take(layers, dim, dim))
    per_layer["wk"] = list(take(layers, kv_dim, dim))
    per_layer["wv"] = list(take(layers, kv_dim, dim))
    per_layer["wo"] = list(take(layers, dim, dim))
    per_layer["ffn_norm"] = list(take(layers, dim))
    per_layer["w1"] = list(take(layers, hidden, dim))
    per_layer["w2"] = list(take(layers, dim, hidden))
    per_layer["w3"] = list(take(layers, hidden, dim))
    sd["norm.weight"] = take(dim)
    take(seq, c.head_dim // 2)  # stored RoPE cos/sin tables (recomputed by the module)
    take(seq, c.head_dim // 2)
    sd["output.weight"] = sd["tok_embeddings.weight"] if shared else take(c.vocab_size, dim)
    for i in range(layers):
        for name, values in per_layer.items():
            suffix = "weight"
            sd[f"layers.{i}.{name}.{suffix}"] = values[i]
    model.load_state_dict(sd)
    return model.eval()


HF_FAMILIES = {"llama", "mistral", "qwen2"}  # the same decoder; Qwen2 adds q/k/v biases
HF_NAMES = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}


def load_teacher(path: Path) -> Llama:
    """A llama2.c ``.bin`` file or a local Hugging Face causal-LM directory (never the hub)."""
    path = Path(path)
    if path.is_dir():
        return load_hf(path)
    if not path.is_file():
        raise ModelLoadError(
            f"teacher not found: {path}", "give a llama2.c .bin file or a Hugging Face model directory"
        )
    return load_llama2c(path)


def hf_config(directory: Path) -> LlamaConfig:
    import json

    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from None
    family = cfg.get("model_type")
    if family not in HF_FAMILIES:
        raise ModelLoadError(
            f"{directory}: model_type {family!r} is not a causal LM bastion can distill",
            f"supported: {', '.join(sorted(HF_FAMILIES))}",
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelLoadError(
            f"{directory}: RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported yet",
            "use a checkpoint with default RoPE",
        )
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // heads):
        raise ModelLoadError(f"{directory}: head_dim {cfg['head_dim']} differs from hidden_size/heads; not supported")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{directory}: MLP biases are not supported")
    return LlamaConfig(
        dim=dim,
        hidden_dim=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
    )


def _hf_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the Hugging Face conversion's q/k permutation (half-split RoPE) → interleaved pairs, rows only."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_hf(directory: Path) -> Llama:
    """Weights from ``*.safetensors`` (sharded or not) of a Llama/Mistral/Qwen2 directory, read without transformers."""
    from safetensors.torch import load_file

    c = hf_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{directory} holds no .safetensors weights",
            "save the model with safe_serialization=True (pickled .bin weights are refused)",
        )
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    hf = {k.removeprefix("model."): v.float() for k, v in hf.items()}
    sd = {
        "tok_embeddings.weight": hf["embed_tokens.weight"],
        "norm.weight": hf["norm.weight"],
        "output.weight": hf.get("lm_head.weight", hf["embed_tokens.weight"]),
    }
    try:
        for i in range(c.n_layers):
            for ours, theirs in HF_NAMES.items():
                for kind in ("weight", "bias"):
                    key = f"layers.{i}.{theirs}.{kind}"
                    if key not in hf:
                        continue
                    t = hf[key]
                    if ours in ("wq", "wk"):
                        t = _hf_to_interleaved(t, c.n_heads if ours == "wq" else c.n_kv_heads)
                    sd[f"layers.{i}.{ours}.{kind}"] = t
        model = Llama(c)
        model.load_state_dict(sd)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{directory}: weights do not match its config.json ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()


@torch.no_grad()
def greedy(
    model: Llama,
    ids: list[int],
    max_new_tokens: int,
    stop: tuple[int, ...] = (1, 2),
    temperature: float = 0.0,
    rng: torch.Generator | None = None,
) -> list[int]:
    """Reference decoding with the KV cache, in torch: greedy, or sampled from softmax(logits / temperature)
    with ``rng`` when ``temperature`` > 0."""
    past = model.empty_past()
    tokens = list(ids)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    out = []
    for _ in range(max_new_tokens):
        logits, *past = model(x, pos, *past)
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits[0, -1] / temperature, -1), 1, generator=rng))
        else:
            nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        tokens.append(nxt)
        x = torch.tensor([[nxt]])
        pos = torch.tensor([[len(tokens) - 1]])
    return out
