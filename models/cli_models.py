"""CLI commands for the local model registry: ``bastion models``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from bastion.console import out, print_json
from bastion.models.cli import ALLOW_UNSIGNED_HELP

models_app = typer.Typer(help="The local model registry under BASTION_HOME.", no_args_is_help=True)


# -- models (registry) --------------------------------------------------------------------------------
@models_app.command("add")
def models_add(
    bundle: Path = typer.Argument(..., help="Bundle directory or .bastion file."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    allow_downgrade: bool = typer.Option(
        False,
        "--allow-downgrade",
        help="Add a version older than one already in the registry (recorded; the bare name still means the highest).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the entry as JSON."),
) -> None:
    """Verify a bundle and store it in the local registry (content-addressed).

    A bare NAME always resolves to its highest version; adding an older version than one already present
    is refused unless --allow-downgrade is given, and is then recorded in the registry's audit.jsonl.

    Example: bastion models add person-vehicle-1.0.bastion
    """
    import sys
    from functools import partial

    from bastion.models.bundle import Bundle
    from bastion.models.registry import Registry
    from bastion.models.version import is_older

    registry = Registry()
    entry = registry.add(bundle, partial(Bundle.open, allow_unsigned=allow_unsigned), allow_downgrade=allow_downgrade)
    newest = registry.resolve(entry.name)
    if newest is not None and is_older(entry.version, newest.version):
        sys.stderr.write(
            f"WARNING: {entry.name}:{entry.version} is older than {newest.name}:{newest.version}: "
            f"kept because of --allow-downgrade (recorded in {registry.audit_path}); "
            f"'{entry.name}' still resolves to {newest.version}.\n"
        )
    if json_out:
        print_json({"name": entry.name, "version": entry.version, "sha256": entry.sha256, "path": str(entry.path)})
        return
    out.print(f"added {entry.name}:{entry.version} ({entry.sha256[:16]}) → {entry.path}")


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List bundles in the registry and the vendored zoo.

    Example: bastion models list
    """
    from bastion.models.registry import Registry
    from bastion.models.zoo import zoo_names, zoo_path

    rows = [
        {
            "name": e.name,
            "version": e.version,
            "task": e.task,
            "sha256": e.sha256,
            "where": "registry",
            "path": str(e.path),
        }
        for e in Registry().entries()
    ]
    from bastion.models.manifest import MANIFEST_NAME, read_manifest

    for n in zoo_names():
        m = read_manifest(zoo_path(n) / MANIFEST_NAME)
        rows.append(
            {
                "name": n,
                "version": m.version,
                "task": m.task,
                "sha256": m.sha256(),
                "where": "zoo",
                "path": str(zoo_path(n)),
            }
        )
    if json_out:
        print_json({"models": rows})
        return
    table = Table(show_edge=False)
    for col in ("name", "version", "task", "sha256", "where"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["version"], r["task"], r["sha256"][:16], r["where"])
    out.print(table)


@models_app.command("remove")
def models_remove(ref: str = typer.Argument(..., help="NAME or NAME:VERSION.")) -> None:
    """Remove a bundle from the registry.

    Example: bastion models remove person-vehicle:1.0
    """
    from bastion.models.registry import Registry

    entry = Registry().remove(ref)
    out.print(f"removed {entry.name}:{entry.version} ({entry.sha256[:16]})")


@models_app.command("path")
def models_path(ref: str = typer.Argument(..., help="NAME or NAME:VERSION.")) -> None:
    """Print the directory of a bundle that `models list` shows: registry first, then the vendored zoo (for scripts).

    Example: bastion models path person-vehicle:1.0
    """
    from bastion.errors import RegistryError
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.registry import Registry, split_ref
    from bastion.models.zoo import zoo_path

    entry = Registry().resolve(ref)
    if entry is not None:
        print(entry.path)
        return
    name, version = split_ref(ref)
    zoo = zoo_path(name)
    if zoo is not None and (version is None or read_manifest(zoo / MANIFEST_NAME).version == version):
        print(zoo)
        return
    raise RegistryError(f"no bundle {ref!r} in the registry or the zoo", "see: bastion models list")
