"""Llama → ONNX decoder written node by node from the weights (no tracing, no torch).

Why not ``torch.onnx.export``: at this model size a decode step is dominated by per-node dispatch, and the traced
graph keeps ~215 nodes after ONNX Runtime's optimiser (reshapes, transposes, RoPE arithmetic, a mask, a concat per
cache).  Written directly on the operators made for this — ONNX ``Attention`` (grouped KV heads, causal masking
and the cache length in one node) and ``RotaryEmbedding``, and ONNX Runtime's ``SkipSimplifiedLayerNormalization``
(residual add + RMSNorm) — the same model is ~100 nodes, with logits within 1e-5 of the torch module and the same
greedy tokens.

The KV cache is a set of fixed-size slot buffers, one slot per position: a pass writes its keys and values into
the slots from ``position_ids``' first value on (opset 24 ``TensorScatter``), and ``Attention`` reads the buffers
with ``nonpad_kv_seqlen`` = the filled slots and ``is_causal`` (bottom-right aligned: the token in slot p sees
slots 0..p), so what the free slots hold never matters.  Bound as both ``past`` and ``present``
(``bastion.runtime.lm``), the buffers are written in place: a decode step copies nothing, where a growing cache is
re-copied whole every token; and the prompt is written straight into the same buffers.  Two reductions replace
the eleven mask and slot-index nodes an explicit boolean mask needed.  (ONNX Runtime's CPU kernel still does its
arithmetic over every slot it is given, so the runtime binds only a prefix of the buffers: ``WINDOW``.)

Measured alternatives (docs/benchmarks.md): ONNX Runtime's ``GroupQueryAttention`` — its CPU kernel runs one small
GEMM per query head and grows fastest with the context, and its fused rotary refuses head sizes that are not a
multiple of 16; standard ``RMSNormalization`` + ``Add`` (~3 µs a step slower than the fused skip-norm); q/k/v as
one projection (no faster); ``ScatterND`` + a boolean causal/padding mask (the opset 23 form: same tokens, slower).

The contract (batch 1, as the node serves): inputs ``input_ids`` [1, S], ``attention_mask`` [1, C] (one per cache
slot: 1 for the slots filled once this pass has written — the cache so far and the S new tokens — then 0 for the
free tail; no holes), ``position_ids`` [1, S] (the slots the S tokens take, consecutive, also their RoPE positions),
``past.{i}.key|value`` [1, C, n_kv·head_dim]; outputs ``logits`` [1, S, vocab] and ``present.{i}.key|value`` (the
buffers with the S slots written).  Needs ONNX Runtime >= 1.28: earlier releases lack opset 24 (< 1.25) or align
``is_causal`` top-left with ``nonpad_kv_seqlen`` (1.25–1.27: a prompt fed in two chunks would attend wrongly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
OPSET = 24


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


def build_decoder(config, weights: dict[str, np.ndarray]) -> onnx.ModelProto:  # LlamaConfig
    """``weights``: the ``Llama`` module's state dict as float32 numpy arrays (bastion's names, interleaved RoPE)."""
    c = config
    d = c.head_dim
    g = _GraphWriter()
    inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(c.max_seq_len, dtype=np.float64), inv)
    cos = g.const("rope.cos", np.cos(angles).astype(np.float32))
    sin = g.const("rope.sin", np.sin(angles).astype(np.float32))

    # the filled slots (attention_mask's ones, counted: the cache holds no holes at batch 1) and the first slot
    # this pass writes; Attention's is_causal then lets the token in slot p see slots 0..p (bottom-right aligned)
    axis1 = g.const("axis1", np.array([1], np.int64))
    g.node("ReduceSum", ["attention_mask", axis1], ["slots.filled"], keepdims=0)  # [1]
    g.node("ReduceMin", ["position_ids", axis1], ["slots.write_at"], keepdims=0)  # [1]

    residual = g.node("Gather", [g.const("embed", weights["tok_embeddings.weight"]), "input_ids"], ["embedded"])
    branch: str | None = None  # the last block output not yet added to the residual stream
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h, residual = _norm(g, f"l{i}.attn_norm", branch, residual, weights[p + "attention_norm.weight"], c.norm_eps)
        q, k, v = (
            g.linear(h, f"l{i}.{n}", weights[f"{p}{n}.weight"], weights.get(f"{p}{n}.bias")) for n in ("wq", "wk", "wv")
        )
        q, k = (
            g.node("RotaryEmbedding", [t, cos, sin, "position_ids"], [f"{t}.rotated"], interleaved=1, num_heads=heads)
            for t, heads in ((q, c.n_heads), (k, c.n_kv_heads))
        )
        keys = g.node("TensorScatter", [f"past.{i}.key", k, "slots.write_at"], [f"present.{i}.key"], axis=1)
        values = g.node("TensorScatter", [f"past.{i}.value", v, "slots.write_at"], [f"present.{i}.value"], axis=1)
        att = g.node(
            "Attention",
            [q, keys, values, "", "", "", "slots.filled"],
            [f"l{i}.attention"],
            q_num_heads=c.n_heads,
            kv_num_heads=c.n_kv_heads,
            is_causal=1,
        )
        o = g.linear(att, f"l{i}.wo", weights[p + "wo.weight"], None)
        h, residual = _norm(g, f"l{i}.ffn_norm", o, residual, weights[p + "ffn_norm.weight"], c.norm_eps)
        gate = g.linear(h, f"l{i}.w1", weights[p + "w1.weight"], None)
        up = g.linear(h, f"l{i}.w3", weights[p + "w3.weight"], None)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], [f"l{i}.gate.sigmoid"])], [f"l{i}.silu"])
        branch = g.linear(g.node("Mul", [silu, up], [f"l{i}.gated"]), f"l{i}.w2", weights[p + "w2.weight"], None)
    h, _ = _norm(g, "final_norm", branch, residual, weights["norm.weight"], c.norm_eps)
    g.node("MatMul", [h, g.const("lm_head.weight", weights["output.weight"].T.astype(np.float32))], ["logits"])

    kv_width = c.n_kv_heads * d
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "slots"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", c.vocab_size])]
    for i in range(c.n_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{part}", TensorProto.FLOAT, [1, "slots", kv_width]))
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT, [1, "slots", kv_width])
            )
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="bastion"
    )
    model.ir_version = 11  # opset 24 needs ≥ 11; ONNX Runtime 1.28 reads up to 11
    return model


def _norm(
    g: _GraphWriter, name: str, branch: str | None, residual: str, weight: np.ndarray, eps: float
) -> tuple[str, str]:
    """RMSNorm of ``residual + branch`` (no branch yet: of ``residual``) → (normalized, the new residual stream)."""
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    if branch is None:
        return g.node("SimplifiedLayerNormalization", [residual, w], [f"{name}.out"], axis=-1, epsilon=eps), residual
    g.node(
        "SkipSimplifiedLayerNormalization",
        [branch, residual, w],
        [f"{name}.out", "", "", f"{name}.residual"],
        domain=MS,
        epsilon=eps,
    )
    return f"{name}.out", f"{name}.residual"


def export_decoder(model, path: Path) -> dict:  # a bastion.distill.llama.Llama
    """Write ``model`` (a ``Llama`` module) as the decoder above; returns the config for the manifest."""
    from dataclasses import asdict

    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    onnx.save(build_decoder(model.c, weights), str(path))
    return asdict(model.c)
