"""The one ``bastion`` entry point: a typer app that mounts each area's commands.

Exit codes: 0 ok, 1 user error (one clear line, no traceback), 2 internal error.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup
from rich.markup import escape

from bastion import __version__
from bastion.console import err
from bastion.errors import BastionError
from bastion.log import setup_logging

app = typer.Typer(
    name="bastion",
    help="Sovereign edge-AI kit: distill, sign and serve detection models offline.\n\n"
    "Example: bastion detect bastion/samples/car-detection.mp4 --model yolov5n",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"bastion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v info, -vv debug)."),
    log_json: bool = typer.Option(False, "--log-json", help="Log as JSON lines on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    level = {0: "WARNING", 1: "INFO"}.get(verbose, "DEBUG")
    setup_logging(os.environ.get("BASTION_LOG_LEVEL", level), json_lines=log_json)


# Each top-level command, mounted only when it is run (or its own --help is asked): `bastion --version`,
# `bastion --help` and `bastion node run` never import distill, bench or onnxruntime for commands they do not
# run. name -> (loader "module:attr", the one-line help `bastion --help` lists without importing it).
# tests/test_imports.py holds each line to the command's real help.
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "bastion.demo:demo_command",
        "The whole loop on the vendored samples: distill → sign → detect → serve → subscribe → verify.",
    ),
    "detect": ("bastion.runtime.cli:detect_command", "Detect objects in an image, a directory of images or a video."),
    "ask": (
        "bastion.runtime.cli:ask_command",
        "Stream a language model's answer, from a local bundle or from a field node.",
    ),
    "quantize": (
        "bastion.distill.cli:quantize_command",
        "INT8 (ONNX Runtime static QDQ) of a detection bundle, kept only if its measured mAP50 drop is small.",
    ),
    "doctor": (
        "bastion.doctor:doctor_command",
        "Check offline readiness: state directory, trust store, registry, vendored models, providers, egress, "
        "installed versions against the lock.",
    ),
    "eval": ("bastion.distill.cli_eval:eval_app", "Measure model accuracy on a labelled dataset."),
    "distill": ("bastion.distill.cli:distill_app", "Make a smaller model for a narrower mission."),
    "bench": ("bastion.bench:bench_app", "Measure speed against a reference measured in the same run (JSON output)."),
    "bundle": ("bastion.cli:_bundle_app", "Create, sign, countersign, mark, verify, inspect and pack model bundles."),
    "keys": ("bastion.models.cli_keys:keys_app", "Signing keys and the trust store."),
    "policy": (
        "bastion.models.cli_policy:policy_app",
        "The signed coalition trust policy: roles, scopes, expiry, k-of-n rules, root rotation.",
    ),
    "models": ("bastion.models.cli_models:models_app", "The local model registry under BASTION_HOME."),
    "node": ("bastion.edge.cli:node_app", "The field node daemon: sources → detector → SQLite → ZeroMQ."),
    "audit": ("bastion.edge.cli:audit_app", "The node's hash-chained audit log."),
    "hw": ("bastion.hardware.cli:hw_app", "Know the machine: probe (plans and engine caches build on it)."),
    "engine": (
        "bastion.runtime.engine_cli:engine_app",
        "TensorRT engines, cached per GPU, TensorRT version, model, precision and shape.",
    ),
}


def _bundle_app() -> typer.Typer:
    """`bundle create` lives with the runtime (it reads ONNX heads); the other bundle commands with the models."""
    from bastion.models.cli import bundle_app
    from bastion.runtime.bundle_create import bundle_create_command

    if not any(c.name == "create" for c in bundle_app.registered_commands):
        bundle_app.command("create")(bundle_create_command)
    return bundle_app


def load_command(name: str) -> TyperCommand | TyperGroup:
    """Import one top-level command and turn it into the click command typer would have built."""
    module, _, attr = _COMMANDS[name][0].partition(":")
    target = getattr(importlib.import_module(module), attr)
    if attr == "_bundle_app":
        target = target()
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


class _LazyGroup(TyperGroup):
    """Lists every command from `_COMMANDS` and imports one only to run it (click's lazy-group pattern)."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | TyperGroup | None:
        if cmd_name not in _COMMANDS:
            return None
        if self._listing:  # `bastion --help`: the table's line, no import
            return TyperCommand(cmd_name, help=_COMMANDS[cmd_name][1], short_help=_COMMANDS[cmd_name][1])
        if cmd_name not in self.commands:
            self.commands[cmd_name] = load_command(cmd_name)
        return self.commands[cmd_name]

    def invoke(self, ctx: Any) -> Any:
        """Ctrl-C in any command: one line, exit 130. Typer's own handling (core._main) would turn the
        KeyboardInterrupt into a silent Exit(130) before main() could say anything."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if not os.environ.get("BASTION_DDP_WORKER"):  # a --nproc worker: its launcher says it (distill/ddp.py)
                err.print("interrupted")
            raise typer.Exit(130) from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app.info.cls = _LazyGroup


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map errors to exit codes (1 user error, 2 internal error)."""
    try:
        app(args=argv, prog_name="bastion")
        return 0
    except SystemExit as exc:  # typer's own exits: help, --version, usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 1 if code == 2 else code  # a usage error is a user error, not an internal one
    except BastionError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:  # before a command runs (the imports); in one, _LazyGroup.invoke says it
        err.print("interrupted")
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback for the logs
        logging.getLogger("bastion").debug("internal error", exc_info=True)
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with -vv for details)")
        if os.environ.get("BASTION_DEBUG"):
            raise
        return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
