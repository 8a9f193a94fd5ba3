"""The ``bastion distill lm`` run: data → pruned student → distillation → measured report → signed bundle."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from bastion.distill.spec import LMRunSpec
from bastion.distill.progress import RunProgress, Tick
from bastion.distill.run import LMRunDir
from bastion.distill.torch_device import training_device
from bastion.errors import ConfigError, MissingExtraError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.bundle import Bundle
from bastion.models.manifest import files_sha256, report_line, sha256_file


def teacher_digest(path: Path) -> str:
    """sha256 of a teacher file, or of a Hugging Face directory's config + weights (names and bytes, sorted)."""
    if path.is_file():
        return sha256_file(path)
    return files_sha256(sorted([path / "config.json", *path.glob("*.safetensors")]))


LM_STAGES = 7  # teacher, corpus, student, distil, measure, bundle, int8 + report


def run_lm_distill(spec: LMRunSpec, sign_key=None, progress: Tick | None = None) -> dict | None:
    """Teacher → corpus → pruned (or fresh) student → distillation → measured report → bundle (+ INT8, GGUF).

    Under torchrun (``--nproc`` or an external launcher) every rank makes the same student and trains its share;
    rank 0 alone writes the corpus, the checkpoints, the bundle and the report, and returns it (others: None)."""
    try:
        import tokenizers  # noqa: F401  (only: is the extra installed?)
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError("bastion distill lm", "distill", "torch") from None
    from bastion.distill import ddp

    world, device = ddp.join(training_device(spec.train.device))  # refused before any work
    with ddp.in_world(world):
        if spec.train.batch % world.size:
            raise ConfigError(
                f"--batch {spec.train.batch} does not split over {world.size} processes",
                f"give a multiple of {world.size}",
            )
        return _run(
            spec,
            sign_key,
            RunProgress(progress) if world.is_main else RunProgress(None, plain=False, stream=io.StringIO()),
            world,
            device,
        )


def _run(spec: LMRunSpec, sign_key, shown: RunProgress, world, device: str) -> dict | None:
    import torch
    from tokenizers import Tokenizer

    from bastion.distill import ddp
    from bastion.distill.llama import load_teacher
    from bastion.distill.lm_distill import distill, evaluate, read_corpus, synthetic_corpus, tokens_per_s
    from bastion.distill.lm_export import export_lm_bundle
    from bastion.runtime.lm import Generator

    train = spec.train.model_copy(update={"device": device})
    run = LMRunDir(spec.out)
    if world.is_main:
        run.record("spec", spec.model_dump(mode="json"))
    teacher_path, tokenizer_path = spec.teacher, spec.tokenizer
    shown.stage(1, LM_STAGES, "teacher", f"loading {teacher_path.name} and exporting it to time against")
    teacher = load_teacher(teacher_path)
    tok = Tokenizer.from_file(str(tokenizer_path))
    if tok.get_vocab_size() > teacher.c.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.get_vocab_size()} tokens, the model {teacher.c.vocab_size}",
            "give the tokenizer that belongs to this checkpoint",
        )
    # the teacher as the node would serve it: it writes the synthetic corpus and is timed against the student
    scratch = tempfile.TemporaryDirectory(prefix="bastion-distill-lm-")  # removed at the end (or at exit)
    served_teacher = Path(scratch.name) / "teacher"
    export_lm_bundle(  # (rank 0's alone would do; a few seconds on the others too keep this function one piece)
        teacher,
        tokenizer_path,
        served_teacher,
        "teacher",
        "scratch",
        spec.weights_license,
        "the teacher, exported to sample from and to time",
        [],
    )
    text_file = run.corpus
    shown.stage(2, LM_STAGES, "corpus", "cached" if text_file.is_file() else str(spec.corpus or "the teacher writes"))
    if world.is_main and not text_file.is_file():  # cached: a resumed run trains on the same text
        if spec.corpus:
            text = read_corpus(spec.corpus)
        else:
            # one thread decodes a small model fastest (2,048 stories260K texts: ~35 s; ORT's default pool is ~1.7×
            # slower there); a wide one gains from all cores
            sampler = Generator(Bundle.open_fresh(served_teacher), threads=1 if teacher.c.dim < 512 else None)
            write = shown.bar("teacher writes", spec.synthetic)
            text = "\n".join(synthetic_corpus(sampler, spec.synthetic, tick=write))
            sampler.close()
        atomic_write_bytes(text_file, text.encode())  # a run killed mid-write must not cache half a corpus
    ddp.barrier()  # the other ranks read the corpus rank 0 wrote
    ids = torch.tensor(tok.encode(text_file.read_text()).ids)
    train.eval_every = max(1, min(train.eval_every, train.steps // 5))  # at least ~5 points on the curves
    if len(ids) < 4 * (train.block + 1):
        raise ConfigError(f"the corpus has only {len(ids)} tokens; need at least {4 * (train.block + 1)}")
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    shown.stage(3, LM_STAGES, "student", f"{len(ids)} tokens, 10 % held out; making the student")
    student, layers, how, influence = _student(spec, teacher, train_ids, train.block)
    pruned_eval = evaluate(student, teacher, val_ids, train.block)
    shown.stage(4, LM_STAGES, "distil", f"{how}: {train.steps} steps on {train.device}")
    history = distill(
        teacher,
        student,
        train_ids,
        val_ids,
        train,
        run.checkpoint,
        progress=shown.training("distil student") if world.is_main else None,
    )
    if not world.is_main:
        return None  # rank 0 measures, exports and reports
    shown.stage(5, LM_STAGES, "measure", "held-out perplexity, agreement and speed of teacher and student")
    for model in (teacher, student):  # measured, timed and exported on the CPU, as the field node holds them
        model.cpu()
    prompt = tok.encode("Once upon a time").ids
    report = {
        "teacher": {
            "layers": teacher.c.n_layers,
            **evaluate(teacher, teacher, val_ids, train.block),
            "tokens_per_s_torch": tokens_per_s(teacher, prompt),
        },
        "pruned_only": {"layers": layers, "hidden_dim": student.c.hidden_dim, **pruned_eval},
        "student_shape": {
            "n_layers": student.c.n_layers,
            "dim": student.c.dim,
            "hidden_dim": student.c.hidden_dim,
            "parameters": sum(p.numel() for p in student.parameters()),
        },
        "layer_influence": influence,
        "how": how,
        "student": {
            "layers": layers,
            **evaluate(student, teacher, val_ids, train.block),
            "tokens_per_s_torch": tokens_per_s(student, prompt),
        },
        "history": history,
        "corpus": str(spec.corpus) if spec.corpus else f"synthetic ({spec.synthetic} teacher texts)",
        "corpus_sha256": sha256_file(text_file),
        "tokens": len(ids),
    }
    report["speedup_torch"] = round(
        report["student"]["tokens_per_s_torch"] / report["teacher"]["tokens_per_s_torch"], 2
    )
    report["perplexity_rise"] = round(report["student"]["perplexity"] / report["teacher"]["perplexity"] - 1, 4)
    bundle = run.bundle
    shown.stage(6, LM_STAGES, "bundle", f"exporting the student to {bundle}")
    shutil.rmtree(bundle, ignore_errors=True)
    teacher_sha = teacher_digest(Path(teacher_path))
    export_lm_bundle(
        student.eval(),
        tokenizer_path,
        bundle,
        f"{Path(teacher_path).stem}-{student.c.n_layers}L",
        "1.0",
        spec.weights_license,
        f"distilled from {Path(teacher_path).name}: {how}",
        [],
        sign_key,
        teachers=[teacher_sha],
        datasets=[{"name": report["corpus"], "sha256": report["corpus_sha256"]}],
        evaluation=[
            {
                "metric": "perplexity",
                "value": report["student"]["perplexity"],
                "dataset": "held-out 10 % of the corpus",
                "dataset_sha256": report["corpus_sha256"],
            },
            {
                "metric": "top1_agreement",
                "value": report["student"]["top1_agreement"],
                "dataset": "held-out 10 % of the corpus",
                "dataset_sha256": report["corpus_sha256"],
            },
        ],
        markings=spec.markings,
    )
    report["bundle"] = str(bundle)
    report["markings"] = spec.markings.summary() if spec.markings is not None else None
    # what the field node will run: both as ONNX bundles through bastion's generator, 1 thread, taking turns
    speeds = _served_tokens_per_s({"teacher": served_teacher, "student": bundle}, prompt)
    scratch.cleanup()
    report["teacher"]["tokens_per_s_ort"], report["student"]["tokens_per_s_ort"] = speeds["teacher"], speeds["student"]
    report["speedup_ort"] = round(report["student"]["tokens_per_s_ort"] / report["teacher"]["tokens_per_s_ort"], 2)
    from bastion.distill.lm_int8 import int8_gate

    shown.stage(7, LM_STAGES, "int8 + report", "the INT8 gate, GGUF, curves and report")
    report["int8_gate"] = int8_gate(bundle, val_ids.tolist(), run.bundle_int8, max_ppl_rise=spec.max_int8_ppl_rise)
    if report["int8_gate"]["accepted"] and sign_key is not None:
        from bastion.models.manifest import read_manifest
        from bastion.models.signing import sign_manifest

        sign_manifest(run.bundle_int8, read_manifest(run.bundle_int8 / "manifest.json"), sign_key)
    name = f"{Path(teacher_path).stem}-{student.c.n_layers}L"
    report["gguf"] = _gguf(student, tokenizer_path, run.gguf, name, spec.gguf_type)
    report["curves"] = _curves(history, run.root)
    run.report_json.write_text(json.dumps(report, indent=2))
    run.report_md.write_text(
        _report_md(report, teacher_path, how, bundle, sign_key is not None, influence)
        + report_line(spec.markings)
        + "\n"
    )
    return report


def _student(spec: LMRunSpec, teacher, train_ids, block: int):
    """(student, kept layers, how it was made, layer influence or None): a fresh config, or the teacher pruned to
    the kept layers (given, evenly spread, or the most influential) with its MLPs optionally narrowed."""
    from bastion.distill.lm_distill import (
        evenly,
        fresh_student,
        layer_importance,
        most_important,
        narrow_ffn,
        prune_layers,
    )

    if spec.student_config is not None:  # a fresh architecture: nothing inherited but the vocabulary
        student = fresh_student(teacher, spec.student_config)
        return student, [], f"a fresh {student.c.n_layers}-layer config ({spec.student_config.name})", None
    influence = None
    depth = spec.depth or max(1, teacher.c.n_layers // 2)
    if spec.keep_layers:
        layers = spec.keep_layers
    elif spec.layer_choice == "importance":
        influence = layer_importance(teacher, train_ids, block)
        layers = most_important(influence, depth)
    else:
        layers = evenly(teacher.c.n_layers, depth)
    student = prune_layers(teacher, layers)
    if spec.ffn_ratio < 1.0:
        student = narrow_ffn(student, spec.ffn_ratio, train_ids, block)
    narrowed = f", MLP {student.c.hidden_dim}/{teacher.c.hidden_dim}" if spec.ffn_ratio < 1 else ""
    return student, layers, f"layers {layers}{narrowed}", influence


def _report_md(report: dict, teacher_path: Path, how: str, bundle: Path, signed: bool, influence) -> str:
    t, p, s = report["teacher"], report["pruned_only"], report["student"]
    return (
        f"# LM distillation: {Path(teacher_path).name} → {how}\n\n"
        f"Corpus: {report['corpus']} ({report['tokens']} tokens, 10 % held out).\n\n"
        "| model | perplexity (held-out) | top-1 agreement with teacher | tokens/s ONNX Runtime (served) | "
        "tokens/s torch |\n|---|---|---|---|---|\n"
        f"| teacher ({t['layers']} layers) | {t['perplexity']} | 1.0 | {t['tokens_per_s_ort']} | "
        f"{t['tokens_per_s_torch']} |\n"
        f"| pruned only, before distillation | {p['perplexity']} | {p['top1_agreement']} | – | – |\n"
        f"| **distilled student** | {s['perplexity']} | {s['top1_agreement']} | {s['tokens_per_s_ort']} | "
        f"{s['tokens_per_s_torch']} |\n\n"
        f"Speed-up {report['speedup_ort']}× as served ({report['speedup_torch']}× in torch), perplexity rise "
        f"{report['perplexity_rise'] * 100:.1f} %. "
        f"INT8 gate: {report['int8_gate']['reason']}. "
        f"Bundle: `{bundle}`{' (signed)' if signed else ' (unsigned: bastion bundle sign it)'}.\n"
        + (f"\nLayer influence (1 − cos(in, out), higher = kept first): {influence}\n" if influence else "")
        + (f"\n![training curves]({report['curves']})\n" if report["curves"] else "")
    )


def _served_tokens_per_s(bundles: dict[str, Path], prompt: list[int]) -> dict[str, float]:
    """Greedy tokens/s of each bundle through bastion's ONNX Runtime generator, 1 thread, timed taking turns."""
    from bastion.runtime.lm_timing import interleaved_tokens_per_s
    from bastion.runtime.lm import Generator

    generators = {name: Generator(Bundle.open_fresh(path), threads=1) for name, path in bundles.items()}
    try:
        return interleaved_tokens_per_s(generators, prompt)
    finally:
        for generator in generators.values():
            generator.close()


def _gguf(student, tokenizer_path: Path, path: Path, name: str, gguf_type: str | None):
    """RUN/student.gguf for llama.cpp users, when the gguf package is installed (the [distill] extra has it)."""
    import importlib.util

    if gguf_type is None:
        return None
    if importlib.util.find_spec("gguf") is None:
        return {"skipped": "the gguf package is not installed (pip install gguf)"}
    from bastion.distill.gguf_export import write_gguf

    return write_gguf(student, tokenizer_path, path, name, gguf_type)


def _curves(history: list[dict], out: Path) -> str | None:
    """curves.png: held-out perplexity (its first 4 windows: a quick look) and training loss per evaluation step."""
    if len(history) < 2:
        return None
    from bastion.distill.charts import lines

    steps = [h["step"] for h in history]
    lines(
        steps,
        {"held-out perplexity": [h["perplexity"] for h in history], "train loss": [h["loss"] for h in history]},
        out / "curves.png",
        "LM distillation",
        "step",
        "value",
    )
    return "curves.png"
