"""The one ``bastion`` entry point: a typer app that mounts each area's commands.

Exit codes: 0 ok, 1 user error (one clear line, no traceback), 2 internal error.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
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


def _mount() -> None:
    from bastion.bench import bench_app
    from bastion.demo import demo_command
    from bastion.distill.cli import distill_app, eval_app, quantize_command
    from bastion.doctor import doctor_command
    from bastion.edge.cli import audit_app, node_app
    from bastion.hardware.cli import hw_app
    from bastion.models.cli import bundle_app, keys_app, models_app
    from bastion.runtime.bundle_create import bundle_create_command
    from bastion.runtime.cli import ask_command, detect_command
    from bastion.runtime.engine_cli import engine_app

    app.command("demo")(demo_command)
    app.command("detect")(detect_command)
    app.command("ask")(ask_command)
    app.add_typer(eval_app, name="eval")
    app.command("quantize")(quantize_command)
    app.add_typer(distill_app, name="distill")
    app.add_typer(bench_app, name="bench")
    bundle_app.command("create")(bundle_create_command)
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(keys_app, name="keys")
    app.add_typer(models_app, name="models")
    app.add_typer(node_app, name="node")
    app.add_typer(audit_app, name="audit")
    app.add_typer(hw_app, name="hw")
    app.add_typer(engine_app, name="engine")
    app.command("doctor")(doctor_command)


_mount()


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
    except KeyboardInterrupt:
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
