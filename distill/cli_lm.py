"""``bastion distill lm`` and ``bastion distill lm-export``: the language-model commands of the model team.

Flags map onto an ``LMRunSpec`` (``distill/spec.py``) and nothing else; the run lives in ``lm_pipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bastion.console import out, print_json, progress, stage_bars
from bastion.distill.ddp import NPROC_HELP
from bastion.distill.torch_device import DEVICE_HELP, training_device
from bastion.models.cli_options import CLASSIFICATION_HELP, MARKING_HELP, RELEASABLE_TO_HELP, markings_from

LM_TEACHER_OPTION = typer.Option(
    ...,
    "--teacher",
    help="A llama2.c .bin checkpoint or a local Hugging Face "
    "Llama/Mistral/Qwen2 directory (config.json + *.safetensors).",
)
LM_TOKENIZER_OPTION = typer.Option(
    None,
    "--tokenizer",
    help="Its Hugging Face tokenizer.json (default: tokenizer.json inside a Hugging Face --teacher directory).",
)


def teacher_tokenizer(teacher: Path, tokenizer: Optional[Path]) -> Path:
    """``--tokenizer``, or the tokenizer.json of a Hugging Face teacher directory — one that loads."""
    from tokenizers import Tokenizer

    from bastion.errors import ConfigError, InputNotFoundError

    if tokenizer is None:
        if not (teacher.is_dir() and (teacher / "tokenizer.json").is_file()):
            raise ConfigError(f"no tokenizer for {teacher}", "give --tokenizer tokenizer.json")
        tokenizer = teacher / "tokenizer.json"
    if not tokenizer.is_file():
        raise InputNotFoundError(f"tokenizer not found: {tokenizer}")
    try:
        Tokenizer.from_file(str(tokenizer))
    except Exception as exc:  # tokenizers raises bare Exceptions for files it cannot parse
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(
            f"{tokenizer} is not a Hugging Face tokenizer.json ({first})",
            "give the tokenizer.json that belongs to the teacher",
        ) from None
    return tokenizer


def distill_lm_export_command(
    teacher: Path = LM_TEACHER_OPTION,
    tokenizer: Optional[Path] = LM_TOKENIZER_OPTION,
    out_dir: Path = typer.Option(..., "--out", help="New bundle directory."),
    name: str = typer.Option(..., help="Bundle name."),
    version: str = typer.Option("1.0", help="Bundle version."),
    weights_license: str = typer.Option(..., help="License of the weights."),
    source: str = typer.Option(..., help="Where the weights came from."),
    license_file: list[Path] = typer.Option([], help="License text to ship in the bundle (repeatable)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign with this private key."),
    max_new_tokens: int = typer.Option(128, help="Default answer length the bundle carries (tokens)."),
    temperature: float = typer.Option(0.0, help="Default sampling temperature the bundle carries (0: greedy)."),
    top_k: int = typer.Option(0, help="Default top-k the bundle carries (0: all tokens)."),
    top_p: float = typer.Option(1.0, help="Default top-p the bundle carries."),
) -> None:
    """Export a Llama checkpoint to a signed task: lm bundle (ONNX with KV cache + tokenizer) for `bastion ask`.

    The generation defaults travel signed with the model; `bastion ask` and a node's `ask` use them unless told
    otherwise.

    Example: bastion distill lm-export --teacher stories260K.bin --tokenizer tokenizer.json --name stories260K
    --weights-license MIT --source "karpathy/tinyllamas" --temperature 0.8 --top-p 0.95 --sign team.key
    --out bundles/stories260K
    """
    import importlib.util

    from bastion.distill.lm_export import export_lm_bundle
    from bastion.errors import ConfigError, InputNotFoundError, MissingExtraError

    if importlib.util.find_spec("torch") is None:
        raise MissingExtraError("LM export", "distill", "torch")
    tokenizer = teacher_tokenizer(teacher, tokenizer)
    if not teacher.exists():
        raise InputNotFoundError(f"teacher not found: {teacher}")
    for path in (tokenizer, *license_file):
        if not path.is_file():
            raise InputNotFoundError(f"file not found: {path}")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists", "choose a new --out directory")
    key = None
    if sign is not None:
        from bastion.models.keys import load_private_key, read_passphrase

        key = load_private_key(sign, read_passphrase(False))
    manifest = export_lm_bundle(
        teacher,
        tokenizer,
        out_dir,
        name,
        version,
        weights_license,
        source,
        list(license_file),
        key,
        generation={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p},
    )
    out.print(f"exported {manifest.name}:{manifest.version} to {out_dir} ({'signed' if key else 'UNSIGNED'})")


def distill_lm_command(
    teacher: Path = LM_TEACHER_OPTION,
    tokenizer: Optional[Path] = LM_TOKENIZER_OPTION,
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Domain text (.txt/.jsonl file or directory)."),
    synthetic: int = typer.Option(0, "--synthetic", help="Without a corpus: this many teacher-written texts."),
    keep_layers: Optional[str] = typer.Option(None, help="Teacher layers the student keeps, e.g. 0,2,4."),
    depth: Optional[int] = typer.Option(None, help="Or: keep this many layers (see --layer-choice)."),
    layer_choice: str = typer.Option(
        "even",
        help="With --depth: 'even' (spread, first and last kept) or "
        "'importance' (the layers that change the hidden state most on the corpus).",
    ),
    ffn_ratio: float = typer.Option(1.0, help="Keep this share of each MLP's hidden units (the most active ones)."),
    student_config: Optional[Path] = typer.Option(
        None,
        help="Instead of pruning: a fresh student from a YAML "
        "config (dim, n_layers, n_heads[, hidden_dim, n_kv_heads]).",
    ),
    max_int8_ppl_rise: float = typer.Option(
        0.05, help="Keep the INT8 student only if perplexity rises by at most this share (and it is faster)."
    ),
    gguf_type: str = typer.Option(
        "f16", "--gguf", help="Also write RUN/student.gguf for llama.cpp: f32, f16, q8_0 or none."
    ),
    steps: int = typer.Option(200, help="Training steps."),
    batch: int = typer.Option(16, help="Windows per step."),
    block: int = typer.Option(128, help="Tokens per window."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (cosine schedule with warm-up)."),
    accumulate: int = typer.Option(1, min=1, help="Batches per optimizer step (gradient accumulation)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    nproc: str = typer.Option("1", "--nproc", help=NPROC_HELP),
    temperature: float = typer.Option(1.0, help="KD temperature (1 beat 2 on stories260K, docs/benchmarks.md)."),
    alpha: float = typer.Option(0.1, help="Weight of cross-entropy next to the KL term (0.1 beat 0, 0.3 and 0.5)."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory (checkpoint resumes; bundle in RUN/bundle)."),
    weights_license: str = typer.Option(..., help="License of the teacher's weights (the student inherits it)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the student bundle with this private key."),
    classification: Optional[str] = typer.Option(None, "--classification", help=CLASSIFICATION_HELP),
    releasable_to: list[str] = typer.Option([], "--releasable-to", help=RELEASABLE_TO_HELP),
    marking: Optional[str] = typer.Option(None, "--marking", help=MARKING_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """A smaller language model: drop teacher layers, then distil (KL to the teacher's logits + cross-entropy).

    Example: bastion distill lm --teacher stories260K.bin --tokenizer tokenizer.json --synthetic 4096 --depth 3
    --ffn-ratio 0.75 --steps 3000 --weights-license MIT --out runs/lm/s3   (or --teacher path/to/hf-model-dir;
    this one: 1.65x the teacher's tokens/s at +9.5 % perplexity, ~8 min on one CPU core)

    Data-parallel: add --nproc 2 (two torchrun workers, the same --batch split between them), or start it under
    torchrun --nnodes 2 --nproc-per-node 8 … -m bastion.cli distill lm … (docs/scale.md).
    """
    from bastion.distill import ddp
    from bastion.distill.lm_pipeline import run_lm_distill
    from bastion.distill.spec import LMDistillSpec, LMRunSpec, checked
    from bastion.errors import ConfigError

    workers = ddp.check_nproc(nproc)
    world = ddp.launched_world_for(workers)
    tokenizer = teacher_tokenizer(teacher, tokenizer)
    try:
        layers = [int(x) for x in keep_layers.split(",")] if keep_layers else None
    except ValueError:
        raise ConfigError(f"--keep-layers {keep_layers!r}: give layer numbers like 0,2,4") from None
    key = None
    if sign is not None and workers == 1 and (world is None or world.is_main):  # rank 0 signs; asked once
        from bastion.models.keys import load_private_key, read_passphrase

        key = load_private_key(sign, read_passphrase(False))
    spec = checked(
        LMRunSpec,
        teacher=teacher,
        tokenizer=tokenizer,
        out=out_dir,
        weights_license=weights_license,
        corpus=corpus,
        synthetic=synthetic,
        keep_layers=layers,
        depth=depth,
        layer_choice=layer_choice,
        ffn_ratio=ffn_ratio,
        student_config=student_config,
        gguf_type=None if gguf_type == "none" else gguf_type,
        max_int8_ppl_rise=max_int8_ppl_rise,
        markings=markings_from(classification, releasable_to, marking),
        train=checked(
            LMDistillSpec,
            steps=steps,
            batch=batch,
            block=block,
            lr=lr,
            temperature=temperature,
            alpha=alpha,
            accumulate=accumulate,
            device=device,
        ),
    )
    if workers > 1:  # checked once here; each worker checks again and rank 0 prints the report
        if training_device(device).startswith("cuda"):
            import torch

            if workers > torch.cuda.device_count():
                raise ConfigError(
                    f"--nproc {workers}: torch sees {torch.cuda.device_count()} CUDA device(s)",
                    "one process per GPU, or --device cpu",
                )
        if sign is not None and not sign.is_file():
            raise ConfigError(f"--sign {sign}: no such key file")
        if batch % workers:
            raise ConfigError(
                f"--batch {batch} does not split over {workers} processes", f"give a multiple of {workers}"
            )
        ddp.launch_local(workers, ddp.argv())
        return
    main = world is None or world.is_main
    with progress(disable=json_out or not main) as bar:
        report = run_lm_distill(spec, key, stage_bars(bar))
    if report is None:  # a worker other than rank 0: quiet
        return
    if json_out:
        print_json(report)
        return
    out.print((out_dir / "report.md").read_text())
