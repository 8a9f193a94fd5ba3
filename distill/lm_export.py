"""LM bundle export: a llama2.c (or bastion-trained) Llama → ONNX with KV cache + tokenizer → ``task: lm`` bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

from bastion import __version__
from bastion.models.bundle import seal_bundle, staged_bundle
from bastion.models.manifest import (
    FileEntry,
    LicenseInfo,
    LlamaKvDecoderSpec,
    Manifest,
    Markings,
    Provenance,
    sha256_file,
)
from bastion.models.provenance import stamp


def export_lm_bundle(
    checkpoint,
    tokenizer: Path,
    out_dir: Path,
    name: str,
    version: str,
    weights_license: str,
    source: str,
    license_files: list[Path],
    sign_key=None,
    teachers: list[str] | None = None,
    datasets: list[dict] | None = None,
    evaluation: list[dict] | None = None,
    generation: dict | None = None,
    markings: Markings | None = None,
) -> Manifest:
    """``checkpoint``: a llama2.c file path, or a ``Llama`` module (e.g. a freshly distilled student).
    ``generation``: the sampling defaults the bundle carries (``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``; unset ones are greedy, 128 tokens)."""
    from bastion.distill.llama import Llama, load_teacher
    from bastion.distill.lm_onnx import export_decoder
    from bastion.runtime.lm import GENERATION_DEFAULTS, check_generation

    generation = {**GENERATION_DEFAULTS, **(generation or {})}
    check_generation(**generation)

    model = checkpoint if isinstance(checkpoint, Llama) else load_teacher(checkpoint)
    with staged_bundle(out_dir) as staging:
        config = export_decoder(model, staging / "model.onnx")
        shutil.copy2(tokenizer, staging / "tokenizer.json")
        files = [("model.onnx", "model"), ("tokenizer.json", "tokenizer")]
        for lic in license_files:
            shutil.copy2(lic, staging / lic.name)
            files.append((lic.name, "license"))
        manifest = Manifest(
            name=name,
            version=version,
            task="lm",
            files=[
                FileEntry(path=f, sha256=sha256_file(staging / f), size=(staging / f).stat().st_size, role=r)
                for f, r in files
            ],
            decoder=LlamaKvDecoderSpec(
                type="llama-kv",
                params={**config, "head_dim": model.c.head_dim, "stop": [1, 2], "bos": 1, "generation": generation},
            ),
            precision="fp32",
            provenance=Provenance(
                source=source,
                **stamp(),
                bastion_version=__version__,
                teachers=teachers or [],
                datasets=datasets or [],
            ),
            evaluation=evaluation or [],
            license=LicenseInfo(weights=weights_license, files=[p.name for p in license_files]),
            markings=markings,
        )
        seal_bundle(staging, manifest, out_dir, sign_key)
        return manifest
