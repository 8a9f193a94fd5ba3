"""``bastion hw probe``: what this machine is, for planning and for bug reports."""

from __future__ import annotations

import typer
from rich.table import Table

from bastion.console import out, print_json
from bastion.models.cli import ALLOW_UNSIGNED_HELP

hw_app = typer.Typer(help="Know the machine: probe (plans and engine caches build on it).", no_args_is_help=True)


@hw_app.command("probe")
def hw_probe(json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """CPU, instruction sets, memory, NVIDIA GPUs, Jetson release, and inference software versions.

    Example: bastion hw probe --json
    """
    from bastion.hardware.probe import probe

    report = probe()
    if json_out:
        print_json(report.to_dict())
        return
    table = Table(show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("machine", f"{report.machine}{' (container)' if report.container else ''}")
    table.add_row("cpu", f"{report.cpu_model or '?'} — {report.cores_logical or '?'} logical cores")
    table.add_row("instruction sets", ", ".join(report.instruction_sets) or "-")
    table.add_row("memory", f"{report.memory_mb or '?'} MB")
    if report.jetson_model or report.l4t_release:
        table.add_row("jetson", f"{report.jetson_model or '?'} (L4T {report.l4t_release or '?'})")
    for g in report.gpus:
        table.add_row(
            f"gpu {g.index}",
            f"{g.name}, {g.memory_mb} MB, compute {g.compute_capability}, driver "
            f"{g.driver}" + (f", {g.power_limit_w:.0f} W" if g.power_limit_w else ""),
        )
    if not report.gpus:
        table.add_row("gpu", "none found (no NVML driver, or not an NVIDIA machine)")
    table.add_row("software", ", ".join(f"{k} {v}" for k, v in report.software.items() if v))
    table.add_row("ORT providers", ", ".join(report.ort_providers))
    out.print(table)


@hw_app.command("plan")
def hw_plan(
    bundle: str = typer.Argument(..., help="Bundle directory, registry or zoo name."),
    profile: str = typer.Option("x86-cpu", "--profile", help="Device profile name or YAML file (see --list)."),
    batch: int = typer.Option(0, help="Batch to plan for (0: the profile's maximum)."),
    imgsz: int = typer.Option(0, help="Input size to plan for (0: the bundle's, capped by the profile)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Does a bundle fit a device, with which backend/precision/batch/size, and how fast.

    A language model (e.g. stories260K) is planned as weights + KV cache + activations, in tokens/s.

    Example: bastion hw plan yolov5n --profile jetson-orin-nano-8gb
    """
    from bastion.hardware.profiles import load_profile
    from bastion.models.bundle import Bundle
    from bastion.hardware.planner import plan

    result = plan(
        Bundle.open(bundle, allow_unsigned=allow_unsigned), load_profile(profile), batch or None, imgsz or None
    )
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    lm = result.task == "lm"
    table.add_row(
        "fits",
        ("[green]yes[/]" if result.fits else "[red]no[/]")
        + f" — {result.total_mb:.0f} of {result.budget_mb} MB (weights {result.weights_mb:.0f}, "
        + (f"KV cache {result.kv_cache_mb:.0f}, " if lm else "")
        + f"activations {result.activations_mb:.0f}, workspace {result.workspace_mb:.0f})",
    )
    table.add_row(
        "run with",
        f"{result.backend}, {result.precision}, "
        + (f"context {result.context} tokens" if lm else f"batch {result.batch}, imgsz {result.imgsz}"),
    )
    table.add_row(
        f"expected {result.speed_unit}",
        f"{result.expected_fps if result.expected_fps is not None else '?'} ({result.fps_source})",
    )
    for note in result.notes:
        table.add_row("note", note)
    out.print(f"{result.bundle} on {result.profile}", style="bold")
    out.print(table)


@hw_app.command("profiles")
def hw_profiles(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the device profiles the planner knows.

    Example: bastion hw profiles
    """
    from bastion.hardware.profiles import load_profile, profile_names

    profiles = [load_profile(n) for n in profile_names()]
    if json_out:
        print_json([p.model_dump() for p in profiles])
        return
    table = Table(show_edge=False, pad_edge=False)
    # the name is what `hw plan --profile NAME` needs typed: never cut it; the other columns fold instead, and
    # their headers are short so that 80 columns hold every row on one line
    table.add_column("name", no_wrap=True, min_width=max((len(p.name) for p in profiles), default=4))
    for col in ("kind", "MB", "backend", "prec", "batch", "imgsz", "ref ms"):
        table.add_column(col, overflow="fold")
    for p in profiles:
        table.add_row(
            p.name,
            p.kind,
            str(p.memory_mb),
            p.preferred_backend,
            p.precision,
            str(p.max_batch),
            str(p.max_imgsz),
            f"{p.reference.latency_ms}" if p.reference else "-",
        )
    out.print(table)
