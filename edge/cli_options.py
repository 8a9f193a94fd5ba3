"""How a command reaches a node's control socket: one definition of --control/--storage/--server-key/--client-key,
shared by `node status`, `node tail` and `ask --node`, so their flags and help cannot drift apart."""

from __future__ import annotations

import typer

CONTROL_OPTION = typer.Option(None, "--control", help="Control endpoint (default tcp://127.0.0.1:7701).")
STORAGE_OPTION = typer.Option(None, "--storage", help="Or: the node's storage dir (reads node.json).")
SERVER_KEY_OPTION = typer.Option(None, "--server-key", help="Node public key (z85 or .key file) for CurveZMQ.")
CLIENT_KEY_OPTION = typer.Option(None, "--client-key", help="Your .key_secret certificate for CurveZMQ.")
