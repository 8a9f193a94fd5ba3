"""``bastion node clip SEQ --out FILE``: fetch the evidence clip a node kept for one event (registered in
edge/cli.py).

The SDK does the work (``Client.clip``, edge/clip_client.py: chunks put together, checked against the size and
sha256 the node announced); this is the same thing from a shell, with the node reached the way ``node status``
reaches it (edge/cli_options.py). The video is written only once it is whole and checked (temp file, fsync,
rename), so a clip that fails half-way leaves no half a file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bastion.console import out, print_json
from bastion.edge.cli_options import CLIENT_KEY_OPTION, CONTROL_OPTION, SERVER_KEY_OPTION, STORAGE_OPTION


def node_clip(
    seq: int = typer.Argument(..., help="The event's seq (an object.end, zone or line event; see `node tail`)."),
    out_path: str = typer.Option(  # a str: a trailing / (a folder, made if missing) survives
        "./", "--out", "-o", help="Video file to write, or a folder (DIR/) for clip-SEQ.avi/.mp4 (default: here)."
    ),
    control: Optional[str] = CONTROL_OPTION,
    storage: Optional[Path] = STORAGE_OPTION,
    server_key: Optional[str] = SERVER_KEY_OPTION,
    client_key: Optional[Path] = CLIENT_KEY_OPTION,
    timeout: float = typer.Option(10.0, help="Seconds to wait for each answer of the node."),
    json_out: bool = typer.Option(False, "--json", help="Print the clip's metadata (and the file written) as JSON."),
) -> None:
    """Fetch the evidence clip a node kept for event SEQ (needs storage.clips on the node and an operator key
    with CurveZMQ) and write it, decrypted, as a video OpenCV and common players open.

    Example: bastion node clip 1234 --out exit-1234.avi --storage node-data
    """
    from bastion.edge.cli import _client_for  # the one way a command reaches a node (edge/cli.py)
    from bastion.errors import ConfigError

    target = Path(out_path)
    if target.exists() and not target.is_dir() and not target.is_file():
        raise ConfigError(f"--out {out_path} is neither a file nor a folder", "give a file name or a folder")
    client = _client_for(control, storage, server_key, client_key, timeout)
    try:
        clip = client.clip(seq)
    finally:
        client.close()
    try:
        written = clip.save(out_path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the clip of event {seq} to {out_path}: {exc.strerror or exc}",
            "choose another --out (a folder you can write to)",
        ) from None
    meta = clip.meta
    if json_out:
        print_json({**meta.model_dump(mode="json"), "file": str(written)})
        return
    out.print(
        f"clip of event {meta.seq} ({meta.kind}, source {meta.source}): {meta.frames} frames {meta.width}x"
        f"{meta.height} at {meta.fps:g} fps, {meta.end_ts - meta.start_ts:.1f} s, {meta.codec} in "
        f"{meta.container}, {meta.size / 1e6:.2f} MB → {written}",
        markup=False,
        highlight=False,
    )
