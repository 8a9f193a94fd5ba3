"""``bastion hw probe``: what this machine is, for planning and for bug reports."""

from __future__ import annotations

import typer
from rich.table import Table

from bastion.console import out, print_json

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
        table.add_row(f"gpu {g.index}", f"{g.name}, {g.memory_mb} MB, compute {g.compute_capability}, driver "
                                        f"{g.driver}" + (f", {g.power_limit_w:.0f} W" if g.power_limit_w else ""))
    if not report.gpus:
        table.add_row("gpu", "none found (no NVML driver, or not an NVIDIA machine)")
    table.add_row("software", ", ".join(f"{k} {v}" for k, v in report.software.items() if v))
    table.add_row("ORT providers", ", ".join(report.ort_providers))
    out.print(table)
