"""Shared pieces of every CLI command: consoles, progress bars, JSON output, option parsing."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bastion.errors import ConfigError

out = Console(highlight=False)  # results
err = Console(stderr=True, highlight=False)  # messages, progress


def progress(transient: bool = True, disable: bool = False) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for --json)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=disable or not err.is_terminal,
    )


def stage_bars(bar: Progress) -> Callable[[str, int], Callable[[], None]]:
    """For a pipeline of stages: ``stage(label, total)`` adds one bar to ``bar`` and returns its advance."""

    def stage(label: str, total: int) -> Callable[[], None]:
        task = bar.add_task(label, total=total)
        return lambda: bar.advance(task)

    return stage


def print_json(obj: Any) -> None:
    """One compact JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(obj, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def split_csv(value: str | None) -> list[str] | None:
    """'person, car' → ['person', 'car']; None/'' → None."""
    if not value:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"empty list: {value!r}")
    return items


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}")


def print_counts(title: str, counts: dict[str, int]) -> None:
    """A titled table of detections per class, most frequent first."""
    from rich.table import Table

    out.print(title, style="bold")
    table = Table(show_edge=False)
    table.add_column("class")
    table.add_column("detections", justify="right")
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(name, str(n))
    out.print(table)
