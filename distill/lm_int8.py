"""ONNX Runtime dynamic INT8 (MatMul weights) for an LM bundle, kept only if it is better where it counts.

Kept when perplexity rises by at most ``max_ppl_rise`` **and** generation is at least ``min_speedup`` faster; on tiny models it
is usually slower (../shared/NOTES.md), and then the report says so and the bundle stays FP32.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bastion.runtime.lm_timing import interleaved_tokens_per_s
from bastion.models.bundle import Bundle
from bastion.models.manifest import MANIFEST_NAME, read_manifest, sha256_file, write_manifest
from bastion.runtime.lm import Generator


def perplexity(generator: Generator, ids: list[int], block: int = 128, windows: int = 8) -> float:
    """Full-window forward passes (no cache) through the bundle's own ONNX graph."""
    nll, count = 0.0, 0
    for s in range(0, min(len(ids) - block - 1, windows * block), block):
        logits = generator.forward(ids[s : s + block])[0][0]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = np.asarray(ids[s + 1 : s + block + 1])
        nll -= float(logp[np.arange(block), target].sum())
        count += block
    return math.exp(nll / max(count, 1))


def int8_gate(
    bundle_dir: Path, val_ids: list[int], out_dir: Path, max_ppl_rise: float = 0.05, min_speedup: float = 1.05
) -> dict:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = Generator(Bundle.open_fresh(bundle_dir))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "bundle"
        shutil.copytree(bundle_dir, staged)
        model = staged / "model.onnx"
        # ONNX shape inference cannot type the outputs of ORT's contrib ops (the fused norms); every tensor the
        # quantizer asks about is a float activation
        quantize_dynamic(
            str(bundle_dir / "model.onnx"),
            str(model),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
        manifest = read_manifest(staged / MANIFEST_NAME)
        files = [
            f.model_copy(update={"sha256": sha256_file(model), "size": model.stat().st_size})
            if f.role == "model"
            else f
            for f in manifest.files
        ]
        manifest = manifest.model_copy(
            update={"files": files, "precision": "int8", "version": f"{manifest.version}-int8"}
        )
        write_manifest(manifest, staged / MANIFEST_NAME)
        (staged / "signature").unlink(missing_ok=True)
        int8 = Generator(Bundle.open_fresh(staged))
        speeds = interleaved_tokens_per_s({"fp32": fp32, "int8": int8}, fp32.encode("Once upon a time"))
        result = {
            name: {"perplexity": round(perplexity(generator, val_ids), 4), "tokens_per_s": speeds[name]}
            for name, generator in (("fp32", fp32), ("int8", int8))
        }
        rise = result["int8"]["perplexity"] / result["fp32"]["perplexity"] - 1
        speedup = result["int8"]["tokens_per_s"] / result["fp32"]["tokens_per_s"]
        faster = speedup >= min_speedup  # a tie within noise is not worth a quantized model
        result["perplexity_rise"] = round(rise, 4)
        if rise > max_ppl_rise:
            result.update(
                accepted=False,
                reason=f"refused: perplexity rises {rise * 100:.1f} % (limit "
                f"{max_ppl_rise * 100:.0f} %); the model stays FP32",
            )
        elif not faster:
            result.update(
                accepted=False,
                reason=f"refused: INT8 is {speedup:.2f}× the FP32 speed here (need "
                f"{min_speedup}×); the model stays FP32",
            )
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(staged, out_dir)
            result.update(
                accepted=True,
                reason=f"accepted: perplexity +{rise * 100:.1f} %, {speedup:.2f}× faster",
                bundle=str(out_dir),
            )
        int8.close()
    fp32.close()
    return result
