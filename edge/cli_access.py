"""Who may do what on a node, from its shell: ``bastion node allow|clients|pin`` (registered in edge/cli.py).

``allow`` files a client's public certificate under its role folder (edge/curve_allow.py: the folder is the
role), ``clients`` lists what a node's allow list grants, ``pin`` shows or clears the model an admin pinned with
a persisted reload (edge/pin.py).  The node reads its allow list and its pin at start: restart it to apply.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from bastion.console import out, print_json

_JSON = typer.Option(False, "--json", help="Print the result as JSON.")
_ZPL = (
    '#   ZeroMQ CURVE Public Certificate (written by bastion node allow)\n\nmetadata\ncurve\n    public-key = "{key}"\n'
)


def node_allow(
    certificate: str = typer.Argument(..., help="The client's public certificate (NAME.key) or its z85 key."),
    role: str = typer.Option(
        ..., "--role", help="observer (status, replay, events), operator (+ snapshot, clip, ask) or admin (+ reload)."
    ),
    clients: Path = typer.Option(..., "--clients", help="The allow-list folder node.yaml names (allowed_clients)."),
    name: Optional[str] = typer.Option(None, "--name", help="File stem in the role folder [default: the file's]."),
    json_out: bool = _JSON,
) -> None:
    """Allow a client key in a role: write its public certificate to CLIENTS/ROLE/NAME.key (moved if it had
    another role). Only the public key is copied: whatever role a certificate claims, its folder decides.

    Example: bastion node allow alice.key --role operator --clients /etc/bastion/keys/clients
    """
    from bastion.edge.curve import key_id, load_public
    from bastion.edge.curve_allow import client_certificates
    from bastion.edge.roles import ROLES
    from bastion.errors import ConfigError
    from bastion.models.atomic import atomic_write_bytes

    if role not in ROLES:
        raise ConfigError(f"--role {role!r} is not a role", f"use one of {', '.join(ROLES)}")
    if name is None and len(certificate) == 40 and not Path(certificate).exists():
        raise ConfigError("a z85 key needs a file name for its certificate", "add --name alice")
    stem = name or Path(certificate).name.split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", stem):
        raise ConfigError(f"{stem!r} is not a certificate name", "--name: letters, digits, _ . - (100 at most)")
    key = load_public(certificate)
    target = clients / role / f"{stem}.key"
    listed = client_certificates([clients]) if clients.is_dir() else []
    if target.exists() and load_public(target) != key:
        raise ConfigError(f"{target} already holds another client's key", "choose another --name")
    moved = [cert for k, _, cert in listed if k == key and cert != target]
    atomic_write_bytes(target, _ZPL.format(key=key.decode()).encode(), 0o644)
    for cert in moved:  # one key, one role: the copies under other roles go
        cert.unlink(missing_ok=True)
    result = {"key_id": key_id(key), "role": role, "file": str(target), "removed": [str(p) for p in moved]}
    if json_out:
        print_json(result)
        return
    out.print(
        f"allowed client {result['key_id']} as {role}: {target}"
        + (f" (removed {', '.join(result['removed'])})" if moved else "")
        + " — restart the node to apply"
    )


def node_clients(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Node YAML: its security.allowed_clients."),
    clients: Optional[list[Path]] = typer.Option(None, "--clients", help="Or: allow-list files or folders."),
    json_out: bool = _JSON,
) -> None:
    """List the client keys a node's allow list lets in, each with its role and certificate file.

    Example: bastion node clients --config /etc/bastion/node.yaml
    """
    from bastion.edge.curve import key_id
    from bastion.edge.curve_allow import client_certificates
    from bastion.errors import ConfigError

    if (config is None) == (not clients):
        raise ConfigError("give exactly one of --config NODE.yaml or --clients FOLDER")
    if config is not None:
        from bastion.edge.config import load_config

        clients = load_config(config).security.allowed_clients
    rows = [{"key_id": key_id(k), "role": r, "file": str(f)} for k, r, f in client_certificates(list(clients or []))]
    if json_out:
        print_json(rows)
        return
    for row in rows:
        out.print(f"{row['key_id']}  {row['role']:<8}  {row['file']}", markup=False, highlight=False)
    if not rows:
        out.print("no client keys: with CurveZMQ on, no client gets in")


def node_pin(
    storage: Path = typer.Option(..., "--storage", help="The node's storage dir (holds pin.json)."),
    clear: bool = typer.Option(False, "--clear", help="Remove the pin: the config's model runs from the next start."),
    json_out: bool = _JSON,
) -> None:
    """Show (or clear) the model an admin pinned with `reload … persist`: the node runs it after every restart.

    Example: bastion node pin --storage /var/lib/bastion --clear
    """
    from bastion.edge.pin import clear_pin, pin_summary
    from bastion.errors import ConfigError

    try:
        pin = pin_summary(storage)
    except ConfigError:  # a damaged pin is named in one line; --clear removes it all the same
        if not clear:
            raise
        pin = None
    cleared = clear_pin(storage) if clear else False
    if json_out:
        print_json({"pin": pin, "cleared": cleared})
        return
    if pin is None:
        out.print("no pin: the node runs its config's model")
        return
    out.print(
        f"{'cleared pin' if cleared else 'pinned'}: {pin['name']} {pin['version']} ({pin['sha256'][:12]}) from "
        f"{pin['bundle']}, by {pin['by']}"
        + (" — the node runs its config's model from its next start" if cleared else ""),
        markup=False,
        highlight=False,
    )
