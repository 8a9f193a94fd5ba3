"""``bastion engine build|list|clear``: the per-device TensorRT engine cache, from the command line.

``build`` is what an operator runs once per unit (it takes minutes on a Jetson), so the node starts in under a
second afterwards; ``list`` shows what is cached and for which GPU and TensorRT; ``clear`` empties it.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from bastion.console import out, print_json, progress
from bastion.models.cli import ALLOW_UNSIGNED_HELP

engine_app = typer.Typer(
    help="TensorRT engines, cached per GPU, TensorRT version, model, precision and shape.", no_args_is_help=True
)


@engine_app.command("build")
def engine_build(
    model: str = typer.Argument(..., help="Detection bundle (directory, registry or zoo name)."),
    precision: Optional[str] = typer.Option(
        None, help="fp32, fp16 or int8 (default: int8 for an INT8 bundle, else fp16)."
    ),
    max_batch: int = typer.Option(
        8,
        help="Largest batch the engine accepts (dynamic-batch models). Use the "
        "max_batch of whatever will run it (node default 4, Detector default 8): it is "
        "part of the cache key.",
    ),
    imgsz: Optional[int] = typer.Option(
        None,
        help="Largest square input for dynamic-size models (default: the "
        "bundle's input size; use the node's imgsz if it sets one).",
    ),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build (or find) the engine for this unit's GPU, so the node starts without building.

    Example: bastion engine build yolov5n --precision fp16 --max-batch 4   (for a node with max_batch: 4)
    """
    from bastion.models.bundle import Bundle
    from bastion.runtime.backends.tensorrt import load_or_build

    bundle = Bundle.open(model, allow_unsigned=allow_unsigned)
    manifest = bundle.manifest
    if manifest.sealed is not None:  # the engine cache would hold the model in clear on disk
        from bastion.errors import ConfigError

        raise ConfigError(f"{manifest.name} is sealed: no TensorRT engine is built for it", "run it on ort-* devices")
    chosen = precision or ("int8" if manifest.precision == "int8" else "fp16")
    size = (imgsz, imgsz) if imgsz else (tuple(manifest.input.size) if manifest.input else None)
    with progress(disable=json_out) as bar:
        task = bar.add_task(f"TensorRT {chosen} engine for {manifest.name}", total=1)
        plan, key, built = load_or_build(
            bundle.model_bytes(), chosen, size, max_batch, label=manifest.model_file().path
        )
        bar.advance(task)
    result = {
        "model": f"{manifest.name}:{manifest.version}",
        "engine": key.digest(),
        "built": built,
        "bytes": len(plan),
        "gpu": key.gpu,
        "compute_capability": key.compute_capability,
        "tensorrt": key.tensorrt,
        "precision": key.precision,
        "shapes": [{"input": s[0], "min": s[1], "opt": s[2], "max": s[3]} for s in key.shapes],
    }
    if json_out:
        print_json(result)
        return
    out.print(
        f"{'built' if built else 'already cached'}: engine {key.digest()} for {result['model']} "
        f"({key.precision}, {key.gpu}, TensorRT {key.tensorrt}, {len(plan) / 1e6:.1f} MB)"
    )


@engine_app.command("list")
def engine_list(json_out: bool = typer.Option(False, "--json", help="Print the entries as JSON.")) -> None:
    """Cached engines and what each was built for.

    Example: bastion engine list --json
    """
    from bastion.hardware.engine_cache import EngineCache

    entries = EngineCache().entries()
    if json_out:
        print_json({"engines": entries})
        return
    if not entries:
        out.print("no cached engines (bastion engine build BUNDLE makes one)")
        return
    table = Table(show_edge=False)
    for col in ("engine", "gpu", "compute", "TensorRT", "precision", "model sha256", "MB"):
        table.add_column(col)
    for e in entries:
        if e.get("damaged"):
            table.add_row(e["id"], "[red]damaged: will be rebuilt[/]", "", "", "", "", "")
            continue
        table.add_row(
            e["id"],
            e["gpu"],
            e["compute_capability"],
            e["tensorrt"],
            e["precision"],
            e["bundle_sha256"][:16] + "…",
            f"{(e.get('size') or 0) / 1e6:.1f}",
        )
    out.print(table)


@engine_app.command("clear")
def engine_clear(json_out: bool = typer.Option(False, "--json", help="Print the count as JSON.")) -> None:
    """Delete every cached engine (they are rebuilt on next use; the timing caches go too).

    Example: bastion engine clear
    """
    from bastion.hardware.engine_cache import EngineCache

    removed = EngineCache().clear()
    if json_out:
        print_json({"removed": removed})
        return
    out.print(f"removed {removed} cached engine(s)")
