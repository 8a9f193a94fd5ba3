"""Llama → ONNX decoder written node by node from the weights (no tracing, no torch).

Why not ``torch.onnx.export``: at this model size a decode step is dominated by per-node dispatch, and the traced
graph keeps ~215 nodes after ONNX Runtime's optimiser (reshapes, transposes, RoPE arithmetic, a mask, a concat per
cache).  Written directly on the operators made for this — ONNX opset 23 ``Attention`` (grouped KV heads, causal
mask, KV-cache append in one node) and ``RotaryEmbedding``, and ONNX Runtime's
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm) — the same model is ~90 nodes, with logits within
1e-5 of the torch module and the same greedy tokens: a decode step of stories260K takes ~70 µs instead of ~106.

Measured alternatives (stories260K, 1 thread, µs per decode step at 16 / 150 / 300 cached tokens):
ONNX Runtime's ``GroupQueryAttention`` 72 / 105 / 146 (57 / 86 / 122 with past and present sharing one
preallocated buffer) — its CPU kernel runs one small GEMM per query head, which grows fastest with the context —
against 71 / 83 / 97 for ``Attention``; standard ``RMSNormalization`` + ``Add`` cost ~3 µs more than the fused
skip-norm.  GroupQueryAttention's fused rotary also refuses head sizes that are not a multiple of 16.

The contract (batch 1, as the node serves): inputs ``input_ids`` [1, S], ``attention_mask`` [1, P+S] (0 hides a
key position, e.g. padding), ``position_ids`` [1, S], ``past.{i}.key|value`` [1, n_kv, P, head_dim]; outputs
``logits`` [1, S, vocab] and ``present.{i}.key|value`` [1, n_kv, P+S, head_dim].  Needs ONNX Runtime >= 1.23
(opset 23).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
OPSET = 23


class _GraphWriter:
    """Collects nodes and initializers; names each node after its first output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", domain=domain, **attrs))
        return outputs[0]

    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        """x @ weightᵀ (+ bias); ``weight`` in torch's [out, in] layout."""
        y = self.node("MatMul", [x, self.const(f"{name}.weight", weight.T.astype(np.float32))], [f"{name}.out"])
        if bias is not None:
            y = self.node("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))], [f"{name}.biased"])
        return y


def build_decoder(config, weights: dict[str, np.ndarray]) -> onnx.ModelProto:  # noqa: ANN001 - LlamaConfig
    """``weights``: the ``Llama`` module's state dict as float32 numpy arrays (bastion's names, interleaved RoPE)."""
    c = config
    d = c.head_dim
    g = _GraphWriter()
    inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(c.max_seq_len, dtype=np.float64), inv)
    cos = g.const("rope.cos", np.cos(angles).astype(np.float32))
    sin = g.const("rope.sin", np.sin(angles).astype(np.float32))

    # attention_mask [1, T] → a boolean mask [1, 1, S, T] (Attention wants the query length spelled out)
    g.node("Cast", ["attention_mask"], ["mask.bool"], to=TensorProto.BOOL)
    g.node("Reshape", ["mask.bool", g.const("mask.shape4", np.array([1, 1, 1, -1], np.int64))], ["mask.row"])
    g.node("Shape", ["input_ids"], ["mask.queries"], start=1, end=2)
    g.node("Concat", [g.const("ones2", np.array([1, 1], np.int64)), "mask.queries",
                      g.const("one", np.array([1], np.int64))], ["mask.expand_to"], axis=0)
    g.node("Expand", ["mask.row", "mask.expand_to"], ["attn_mask"])

    residual = g.node("Gather", [g.const("embed", weights["tok_embeddings.weight"]), "input_ids"], ["embedded"])
    branch: str | None = None  # the last block output not yet added to the residual stream
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = _norm(g, f"l{i}.attn_norm", branch, residual, weights[p + "attention_norm.weight"], c.norm_eps)
        if branch is not None:
            residual = f"l{i}.attn_norm.residual"
        q, k, v = (g.linear(h, f"l{i}.{n}", weights[f"{p}{n}.weight"], weights.get(f"{p}{n}.bias"))
                   for n in ("wq", "wk", "wv"))
        q, k = (g.node("RotaryEmbedding", [t, cos, sin, "position_ids"], [f"{t}.rotated"], interleaved=1,
                       num_heads=heads) for t, heads in ((q, c.n_heads), (k, c.n_kv_heads)))
        att = g.node("Attention", [q, k, v, "attn_mask", f"past.{i}.key", f"past.{i}.value"],
                     [f"l{i}.attention", f"present.{i}.key", f"present.{i}.value"],
                     q_num_heads=c.n_heads, kv_num_heads=c.n_kv_heads, is_causal=1)
        o = g.linear(att, f"l{i}.wo", weights[p + "wo.weight"], None)
        h = _norm(g, f"l{i}.ffn_norm", o, residual, weights[p + "ffn_norm.weight"], c.norm_eps)
        residual = f"l{i}.ffn_norm.residual"
        gate = g.linear(h, f"l{i}.w1", weights[p + "w1.weight"], None)
        up = g.linear(h, f"l{i}.w3", weights[p + "w3.weight"], None)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], [f"l{i}.gate.sigmoid"])], [f"l{i}.silu"])
        branch = g.linear(g.node("Mul", [silu, up], [f"l{i}.gated"]), f"l{i}.w2", weights[p + "w2.weight"], None)
    h = _norm(g, "final_norm", branch, residual, weights["norm.weight"], c.norm_eps)
    g.node("MatMul", [h, g.const("lm_head.weight", weights["output.weight"].T.astype(np.float32))], ["logits"])

    kv = [c.n_kv_heads, d]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", c.vocab_size])]
    for i in range(c.n_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{part}", TensorProto.FLOAT, [1, kv[0], "past", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT,
                                                         [1, kv[0], "total", d]))
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="bastion")
    model.ir_version = 10  # opset 23 needs ≥ 10; ONNX Runtime 1.23 reads up to 11
    return model


def _norm(g: _GraphWriter, name: str, branch: str | None, residual: str, weight: np.ndarray, eps: float) -> str:
    """RMSNorm of ``residual + branch``; the sum (the new residual) is the node's 4th output ``{name}.residual``."""
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    if branch is None:
        return g.node("SimplifiedLayerNormalization", [residual, w], [f"{name}.out"], axis=-1, epsilon=eps)
    return g.node("SkipSimplifiedLayerNormalization", [branch, residual, w],
                  [f"{name}.out", "", "", f"{name}.residual"], domain=MS, epsilon=eps)


def export_decoder(model, path: Path) -> dict:  # noqa: ANN001 - a bastion.distill.llama.Llama
    """Write ``model`` (a ``Llama`` module) as the decoder above; returns the config for the manifest."""
    from dataclasses import asdict

    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    onnx.save(build_decoder(model.c, weights), str(path))
    return asdict(model.c)
