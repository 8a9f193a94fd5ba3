"""CLI of the field node: ``bastion node init|run|status|tail|clip|keygen|allow|clients|pin`` and ``bastion audit verify``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from bastion.console import err, out, print_json
from bastion.edge.cli_access import node_allow, node_clients, node_pin
from bastion.edge.cli_clip import node_clip
from bastion.edge.cli_options import CLIENT_KEY_OPTION, CONTROL_OPTION, SERVER_KEY_OPTION, STORAGE_OPTION

node_app = typer.Typer(help="The field node daemon: sources → detector → SQLite → ZeroMQ.", no_args_is_help=True)
audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
node_app.command("allow")(node_allow)  # who may use the control socket, in which role (edge/cli_access.py)
node_app.command("clients")(node_clients)
node_app.command("pin")(node_pin)
node_app.command("clip")(node_clip)  # an evidence clip, fetched with Client.clip (edge/cli_clip.py)

EXAMPLE_CONFIG = """\
# bastion field node — every key is optional except sources. Env overrides: BASTION_NODE_<FIELD>.
id: node-1
model: yolov5n            # bundle dir, .bastion file, registry name[:version] or zoo name (always verified)
# imgsz: 320              # network input long side (smaller = faster)
# lm: stories260K         # a task: lm bundle that answers `bastion ask --node tcp://127.0.0.1:7701 "…"`
conf: 0.25
iou: 0.45
# threads: 2              # inference threads (default: all cores)
# device: auto            # auto (first installed of trt > ort-trt > ort-cuda > ort-cpu) or one of those names
queue_size: 4             # frames buffered per source; the oldest is dropped when inference lags
max_batch: 4              # frames batched across sources when the model takes a batch
sources:
  - name: cam1
    uri: {video}          # a video file, a directory of images, rtsp://…, http://…, or a USB index (0)
    # uri: /dev/video0                          # a USB camera (or its index: 0)
    # uri: rtsp://user:pass@10.0.0.5:554/stream # an IP camera (reconnects on its own)
    loop: true            # files: start again at the end
    realtime: true        # files: read at the file's own fps, like a camera
    # fps: 10             # pace/limit to this rate
    # classes: [person, car]
    # conf: 0.4
    # roi: [0.0, 0.0, 1.0, 1.0]   # keep boxes centred in this normalised region
endpoints:
  events: tcp://127.0.0.1:7700    # PUB
  control: tcp://127.0.0.1:7701   # ROUTER (status, replay, snapshot, clip, ask, reload)
security:
  # CurveZMQ is switched on automatically for any endpoint beyond loopback.
  # curve: true
  # server_secret_key: keys/node.key_secret      # bastion node keygen --out keys --name node
  # allowed_clients: [keys/clients/]             # public .key files of allowed clients; their folder is their
  #   role: keys/clients/{{observer,operator,admin}}/ (bastion node allow); keys right in the listed folder: observer
  # audit_key: keys/node-audit.key               # signs audit checkpoints (default: STORAGE/node-audit.key)
  allow_unsigned: false           # DEVELOPMENT ONLY (audited)
storage:
  dir: node-data                  # events.db (SQLite, WAL), seq.json + seq.live (seq mark), audit.log, node.json
  retention_days: 30
  # max_mb: 1024
  # snapshots: true                 # encrypted JPEG of each frame that produced an event
  # snapshot_key: keys/snapshot.key # bastion node snapshot-key --out keys/snapshot.key
  # clips: true                     # encrypted video around each object.end / zone / line event (needs
  # clip_pre_s: 3                   #   snapshot_key and objects:); bastion node clip SEQ, docs/events.md
  # clip_post_s: 3
objects:                          # tracked objects and rules (docs/events.md); remove for v1 frame events only
  tracker: bytetrack              # or none
  track_buffer: 30                # frames a lost object keeps its id (an occlusion)
  min_hits: 3                     # frames seen before object.new
  update_s: 10                    # object.update at least this often while seen
  frame_events: false             # true: also one event per frame with detections (topic det.<source>)
  zones:                          # normalised polygons: x 0 (left) .. 1 (right), y 0 (top) .. 1 (bottom)
    - name: table                 # the floor around the table in the sample video
      points: [[0.45, 0.45], [0.85, 0.45], [0.85, 0.95], [0.45, 0.95]]
      classes: [person]
      loiter_s: 20                # a loiter event once per visit after 20 s inside
  lines:                          # directed a→b: crossing left-to-right of a→b (as drawn) is "in"
    - name: exit                  # right of the table: the sample's walkers leave across it, "out"
      a: [0.7, 0.05]
      b: [0.7, 0.95]
      classes: [person]
# sinks:                         # bridges fed from the store: in order, at least once (docs/bridges.md)
#   - type: mqtt                  # topics bastion/<node>/<kind>/<source>, QoS 1
#     host: 127.0.0.1
#   - type: nats                  # JetStream: subjects bastion.<node>.<kind>.<source>, stream BASTION
#     url: nats://127.0.0.1:4222
# metrics: 127.0.0.1:9108         # Prometheus endpoint (loopback; beyond it needs metrics_allow_remote: true)
heartbeat_s: 1.0                  # 0.05 .. 3600
health_log_s: 30                  # 1 .. 86400
audit_checkpoint_s: 60            # sign the audit log's head this often (and at every clean stop)
trust_recheck_s: 10               # re-verify the running bundles' signatures: a revoked key stops the node
# Relative paths (storage.dir, keys, source files, bundle dirs) are relative to this file.
"""


@node_app.command("init")
def node_init(
    out_arg: str = typer.Option(
        "node.yaml", "--out", help="Where to write the example: a file, or a folder (ending in /) for node.yaml in it."
    ),
) -> None:
    """Write a commented example node config.

    Example: bastion node init --out /etc/bastion/node.yaml
    """
    from bastion.sample_paths import DEFAULT_VIDEO
    from bastion.errors import ConfigError
    from bastion.models.atomic import atomic_write_bytes

    out_path = Path(out_arg)  # Path drops a trailing "/": "DIR/" asks for a folder, so it is read before that
    if out_arg.endswith(("/", os.sep)) or out_path.is_dir():
        out_path.mkdir(parents=True, exist_ok=True)
        out_path = out_path / "node.yaml"
    if out_path.exists():
        raise ConfigError(f"{out_path} already exists", "choose another --out")
    atomic_write_bytes(out_path, EXAMPLE_CONFIG.format(video=DEFAULT_VIDEO).encode())
    out.print(f"wrote {out_path}; start it with: bastion node run --config {out_path}")


@node_app.command("run")
def node_run(
    config: Path = typer.Option(..., "--config", "-c", help="Node YAML (bastion node init writes one)."),
    log_level: str = typer.Option("INFO", help="Log level for the daemon."),
    accept_seq_gap: bool = typer.Option(
        False,
        "--accept-seq-gap",
        help="Once, after events.db was lost or restored from an older copy: start anyway and continue seq above "
        "its high-water mark (audited). Never put it in a unit file.",
    ),
) -> None:
    """Run the field node until SIGTERM/SIGINT (systemd-ready: sd_notify READY/WATCHDOG).

    Example: bastion node run --config node.yaml
    """
    import logging

    from bastion.edge.config import load_config
    from bastion.edge.node import Node

    from bastion.runtime.stop_signals import StopSignals

    logging.getLogger("bastion").setLevel(log_level.upper())
    built: list[Node] = []  # the watcher stops the node once there is one; before, run() sees `received` at once
    # SIGTERM/SIGINT from here on, the model load included, is a clean stop (node_stop audited, seq mark exact)
    with StopSignals(on_stop=lambda signum: [n.stop_requested(signum) for n in built]) as signals:
        node = Node(load_config(config), accept_seq_gap=accept_seq_gap)
        built.append(node)
        if signals.received:  # came during the load, before there was a node to stop: start, then stop at once
            node.stop()
        err.print(
            f"node {node.config.id} serving events on {node.server.events_endpoint}, control on "
            f"{node.server.control_endpoint}"
        )
        node.run(take_signals=False)  # a node that failed raises NodeFailed: one line, exit 1
    err.print(f"node {node.config.id} stopped cleanly: {node.published} events published since start")


def _client_for(
    control: Optional[str],
    storage: Optional[Path],
    server_key: Optional[str],
    client_key: Optional[Path],
    timeout: float,
):
    from bastion.edge.client import Client
    from bastion.edge.node import RUNTIME_FILE

    if control is None and storage is not None:
        from bastion.errors import ConfigError
        from bastion.models.safe_read import read_bounded

        if not (storage / RUNTIME_FILE).is_file():  # never the default address: another node may answer there
            raise ConfigError(
                f"no node is running with storage {storage} (no {RUNTIME_FILE}: a node writes it when it starts "
                "and removes it when it stops)",
                "start the node (bastion node run --config …), check the folder, or give --control",
            )
        try:  # written by the node; damaged or hand-edited, it is named in one line
            info = json.loads(read_bounded(storage / RUNTIME_FILE, 64 * 1024))
            control = info["control"]
            server_key = server_key or info.get("server_public_key")
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"{storage / RUNTIME_FILE} is damaged (not the runtime file a node writes)",
                "restart the node, or give --control (and --server-key)",
            ) from None
    return Client(
        control or "tcp://127.0.0.1:7701", server_key=server_key, client_key=client_key, timeout_s=timeout, retries=0
    )


@node_app.command("status")
def node_status(
    control: Optional[str] = CONTROL_OPTION,
    storage: Optional[Path] = STORAGE_OPTION,
    server_key: Optional[str] = SERVER_KEY_OPTION,
    client_key: Optional[Path] = CLIENT_KEY_OPTION,
    timeout: float = typer.Option(3.0, help="Seconds to wait for the node."),
    json_out: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Ask a running node how it is doing.

    Example: bastion node status --storage node-data --json
    """
    client = _client_for(control, storage, server_key, client_key, timeout)
    try:
        status = client.status()
    finally:
        client.close()
    if json_out:
        print_json(status)
        return
    from rich.table import Table

    m = status["model"]
    out.print(
        f"node {status['node']} {status.get('state', 'running')} up {status['uptime_s']:.0f} s — model "
        f"{m['name']} {m['sha256'][:12]} (signer {m['signer'] or 'UNVERIFIED'}) — last seq {status['last_seq']}"
        + (f" — STORAGE ERROR: {status['storage_error']}" if status["storage_error"] else "")
        + (f" — FAILED: {status['failure']}" if status.get("failure") else "")
    )
    pin = status.get("pin")  # a model an admin pinned with a persisted reload (edge/pin.py)
    if pin:
        out.print(
            f"pinned: {pin.get('name')} {pin.get('version')} from {pin.get('bundle')} by {pin.get('by')} — "
            + {"running": "running", "after_restart": "runs again at the next start"}.get(
                pin.get("state"), f"REFUSED at start: {pin.get('reason')}"
            ),
            markup=False,
            highlight=False,
        )
    if m.get("trust_policy") or len(m.get("signers") or ()) > 1:  # k-of-n: who released it, under which rule
        under = f" under {m['trust_policy']}" if m.get("trust_policy") else ""
        out.print(f"signed by {', '.join(m.get('signers') or ())}{under}", markup=False, highlight=False)
    if m.get("markings") or m.get("sealed") or status.get("nation"):  # coalition: what runs, where it may
        out.print(
            f"markings: {m.get('markings') or 'none'}; sealed: {'yes' if m.get('sealed') else 'no'}; "
            f"this unit's nation: {status.get('nation') or 'not set (no releasability check)'}",
            markup=False,
            highlight=False,
        )
    precision = m.get("precision")
    if precision:
        out.print("precision: " + ", ".join(f"{k} {v}" for k, v in precision.items()))
    objects = status.get("objects")
    if objects:
        tracks = ", ".join(f"{k} {v}" for k, v in objects["active_tracks"].items()) or "none yet"
        out.print(
            f"objects: tracker {objects['tracker']}, active tracks {tracks}, ids allocated {objects['ids_allocated']}"
            f", frame events {'on' if objects['frame_events'] else 'off'}, {objects['ms_per_frame']} ms a frame"
        )
    clips = status.get("clips")  # evidence clips (docs/events.md)
    if clips:
        out.print(
            f"clips: {clips['state']}, {clips['recorded']} kept, {clips['stored']} stored "
            f"({clips['stored_bytes'] / 1e6:.1f} MB), {clips['in_flight']} in flight, "
            f"{sum((clips.get('dropped') or {}).values())} dropped, {clips['failed']} failed"
            + (f" — {clips['error']}" if clips.get("error") else ""),
            markup=False,
            highlight=False,
        )
    audit = status.get("audit")
    if audit:
        out.print(
            f"audit log: {audit['count']} records, head {audit['head']} (key {audit['key_id']})"
            + (f" — {audit['pending']} waiting to be written: {audit['error']}" if audit["pending"] else "")
        )
    latency = (status.get("inference") or {}).get("latency") or {}
    kinds = ", ".join(f"{k} {n}" for k, n in sorted((status.get("events_by_kind") or {}).items())) or "none yet"
    mean = f"mean {1000 * latency['sum_s'] / latency['count']:.1f} ms" if latency.get("count") else "none yet"
    stored = (status.get("store") or {}).get("bytes")
    out.print(  # the numbers the metrics endpoint serves too (its histogram in full: --json)
        f"inference: {latency.get('count', 0)} batches, {mean}; events published by kind: {kinds}"
        + (f"; event store {stored / 1e6:.1f} MB" if stored is not None else ""),
        markup=False,
        highlight=False,
    )
    table = Table(show_edge=False)
    for col in ("source", "state", "fps", "read", "inferred", "dropped", "errors", "queue"):
        table.add_column(col)
    for name, s in status["sources"].items():
        table.add_row(
            name,
            s["state"],
            f"{s['fps']:.1f}",
            *(str(s[k]) for k in ("read", "inferred", "dropped", "errors", "queue")),
        )
    out.print(table)
    for name, s in (status.get("sinks") or {}).items():  # docs/bridges.md
        out.print(
            f"sink {name} ({s['type']}) {s['state']} — cursor {s['cursor']}, backlog {s['backlog']}, lag {s['lag_s']} s"
            + (f" — sink.error: {s['error']}" if s.get("error") else ""),
            markup=False,
            highlight=False,
        )
    if status.get("metrics"):  # where Prometheus scrapes (docs/bridges.md)
        out.print(f"metrics: http://{status['metrics']}/metrics", markup=False, highlight=False)


@node_app.command("tail")
def node_tail(
    control: Optional[str] = CONTROL_OPTION,
    storage: Optional[Path] = STORAGE_OPTION,
    server_key: Optional[str] = SERVER_KEY_OPTION,
    client_key: Optional[Path] = CLIENT_KEY_OPTION,
    timeout: float = typer.Option(3.0, help="Seconds to wait for each answer of the node."),
    kinds: Optional[str] = typer.Option(None, help="Comma-separated kinds: det,object.new,line.cross … (all)."),
    since: Optional[int] = typer.Option(None, help="Replay stored events after this seq first (0: all)."),
    duration: Optional[float] = typer.Option(None, help="Stop after this many seconds (default: Ctrl-C)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Print a node's events live: a table on a terminal, plain lines in a pipe, JSON lines with --json.

    Example: bastion node tail --storage node-data --kinds object.new,line.cross --since 0
    """
    from bastion.edge.tail_view import tail

    wanted = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
    client = _client_for(control, storage, server_key, client_key, timeout)
    try:
        if since is not None and 0 <= since and since > (last := client.status()["last_seq"]):
            from bastion.errors import ConfigError  # the SDK would call it the node's store going back: say both

            raise ConfigError(
                f"--since {since} is past the node's last event ({last}): there is nothing after it yet",
                f"give --since {last} or less (0: every stored event); if {since} is a bookmark from this node, its "
                "store went back: bastion node status, bastion audit verify",
            )
        tail(client, wanted, since, duration, json_out)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


@node_app.command("keygen")
def node_keygen(
    out_dir: Path = typer.Option(..., "--out", help="Directory for the certificate pair."),
    name: str = typer.Option("node", help="File stem: NAME.key (public) and NAME.key_secret."),
) -> None:
    """Make a CurveZMQ certificate pair for a node or a client.

    Example: bastion node keygen --out keys --name node
    """
    from bastion.edge.curve import generate_certificate

    public, secret = generate_certificate(out_dir, name)
    out.print(
        f"public {public} (share it: CurveZMQ names the PUBLIC certificate .key), secret {secret} "
        "(mode 0600, keep it on this machine)"
    )


@node_app.command("snapshot-key")
def node_snapshot_key(out_path: Path = typer.Option(..., "--out", help="Key file to create (mode 0600).")) -> None:
    """Make the 256-bit key that encrypts a node's snapshots and evidence clips at rest.

    Example: bastion node snapshot-key --out /etc/bastion/snapshot.key
    """
    from bastion.edge.snapshots import generate_key_file

    out.print(f"wrote {generate_key_file(out_path)} (keep a copy: without it the snapshots and clips are unreadable)")


@audit_app.command("verify")
def audit_verify(
    path: Path = typer.Argument(..., help="audit.log (in the node's storage dir)."),
    key: Optional[Path] = typer.Option(
        None,
        "--key",
        help="The node's checkpoint key (STORAGE/node-audit.pub): "
        "every record must be anchored by a checkpoint it signed.",
    ),
    expect_count: Optional[int] = typer.Option(
        None, "--expect-count", min=1, help="A record count you kept (heartbeat or status audit_count)."
    ),
    expect_head: Optional[str] = typer.Option(
        None, "--expect-head", help="The head hash kept with it (audit_head): it must still be there."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Prove the audit log's hash chain (and with --key its signed checkpoints), or name the first problem (exit 1).

    Example: bastion audit verify node-data/audit.log --key node-data/node-audit.pub --expect-count 120
    --expect-head 3f…
    """
    from dataclasses import asdict

    from bastion.edge.audit_verify import verify_audit_log
    from bastion.errors import BastionError, ConfigError
    from bastion.models.keys import load_public_key

    if expect_head is not None and expect_count is None:
        raise ConfigError("--expect-head needs --expect-count (the record count that head was published with)")
    public = load_public_key(key) if key is not None else None
    result = verify_audit_log(path, public, expect_count, expect_head)
    if json_out:
        print_json(asdict(result))
        if not result.ok:
            raise typer.Exit(1)
        return
    if not result.ok:
        raise BastionError(
            f"audit log {path} is NOT intact: {result.reason}", f"records before #{result.first_bad} are intact"
        )
    anchored = (
        f", {result.checkpoints} signed checkpoints (last #{result.last_checkpoint})"
        if result.checkpoints
        else ", no signed checkpoint"
    )
    tail = (
        f"; {result.unanchored} record(s) after the last checkpoint are not anchored yet (check with --key)"
        if result.unanchored and key is None
        else ""
    )
    out.print(
        f"audit log {path}: {result.records} records, hash chain intact{anchored}"
        f"{', signed by the given key' if key is not None else ''}{tail}"
    )
