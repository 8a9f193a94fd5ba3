"""The control ops (docs/protocol.md "control"): one handler per op, found by op in ``HANDLERS``.

A handler gets the node, the request already validated as its op's own model
(edge/protocol.py: every field typed and bounded, no others) and the client's
label for the audit log.  It returns the reply's fields, or a ``Deferred`` for
work that must not hold the control thread (``ask`` generates, ``reload``
unpacks and verifies a bundle): the server runs that in its lane and sends the
replies from there (edge/control_lanes.py).  A client's bad input is answered
``{"ok": false, "error": "…"}`` in one line; only a bug raises.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from bastion.edge.audit import AuditWriteError
from bastion.edge.clip_op import clip_answer
from bastion.edge.control_lanes import Deferred
from bastion.edge.events_v2 import event_v, read_events
from bastion.edge.protocol import (
    AskRequest,
    ClipRequest,
    PingRequest,
    ReloadRequest,
    ReplayRequest,
    SnapshotRequest,
    StatusRequest,
)
from bastion.edge.server import ANSWER_STALL_S, STREAM_STALL_S
from bastion.edge.store import StorageError
from bastion.errors import BastionError
from bastion.models.version import check_not_downgrade

if TYPE_CHECKING:
    from bastion.edge.node import Node
    from bastion.edge.protocol import ControlRequest

MAX_REPLAY_BYTES = 4 * 2**20  # one replay answer; the client asks again for the rest ("more": true)
REPLAY_CHUNK = 50  # events read from the store at a time while a replay page fills
Reply = dict[str, Any] | Deferred
Handler = Callable[["Node", Any, str], Reply]
HANDLERS: dict[str, Handler] = {}


def handles(op: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[op] = handler
        return handler

    return register


def dispatch(node: Node, request: ControlRequest, client: str) -> Reply:
    """The reply to ``request``: its op's handler (every op edge/protocol.py accepts has one, tests hold it)."""
    return HANDLERS[request.op](node, request, client)


@handles("ping")
def ping(node: Node, request: PingRequest, client: str) -> Reply:
    return {"pong": time.time()}


@handles("status")
def status(node: Node, request: StatusRequest, client: str) -> Reply:
    return {"status": {**node.status_dict(), "lanes": node.server.lane_status()}}


@handles("replay")
def replay(node: Node, request: ReplayRequest, client: str) -> Reply:
    """Events after ``since``, read from the store a chunk at a time until ``limit`` or ~4 MB of JSON: a page of
    large events stops early without reading (and validating) the ``limit`` events it will not send."""
    kept: list[dict[str, Any]] = []
    since, size = request.since, 0

    def page(more: bool) -> Reply:
        return {"events": kept, "last_seq": node.store.last_seq(), "more": more}

    while len(kept) < request.limit:
        want = min(REPLAY_CHUNK, request.limit - len(kept))
        try:
            events = read_events(node.store, since, want, request.v)  # v1 and v2 events (edge/events_v2.py)
        except StorageError as exc:  # a damaged store, or object events for a v1 reader: one clear line
            return {"ok": False, "error": str(exc)}
        for event in events:  # bounded in bytes too: many detections a frame make MBs of JSON an event
            size += 160 + 100 * len(getattr(event, "detections", ()))  # about what one event takes as JSON
            if kept and size > MAX_REPLAY_BYTES:
                return page(more=True)
            kept.append(event.model_dump(mode="json", exclude_none=event_v(event) > 1))
        if len(events) < want:
            return page(more=False)
        since = events[-1].seq
    return page(more=True)  # the client asks again after the last seq


@handles("snapshot")
def snapshot(node: Node, request: SnapshotRequest, client: str) -> Reply:
    if node.vault is None:
        return {"ok": False, "error": "this node keeps no snapshots (storage.snapshots is off)"}
    try:
        return {"seq": request.seq, "jpeg_b64": base64.b64encode(node.vault.load(request.seq)).decode()}
    except BastionError as exc:
        return {"ok": False, "error": str(exc)}


@handles("clip")
def clip(node: Node, request: ClipRequest, client: str) -> Reply:
    """An evidence clip, decrypted, a chunk at a time (edge/clip_op.py; docs/events.md "Evidence clips")."""
    return clip_answer(node, request.seq, request.offset)


@handles("reload")
def reload(node: Node, request: ReloadRequest, client: str) -> Reply:
    """Unpacking and verifying a bundle can take seconds (a large archive): in the reload lane, one at a time."""

    def answer() -> Iterator[dict[str, Any]]:
        yield _reload(node, request, client)

    return Deferred("reload", answer(), ANSWER_STALL_S, "reload failed")


def _reload(node: Node, request: ReloadRequest, client: str) -> dict[str, Any]:
    try:
        new = node._load_detector(request.bundle, audit_refusal=False)
    except Exception as exc:  # BastionError, or OSError for a name too long …: a client's bad input
        return node._reload_refused(request.bundle, exc, client)
    try:  # an older version of the running model only when asked (#15 item 9)
        rollback = check_not_downgrade(node.detector.manifest, new.manifest, request.allow_downgrade)
        if node.objects is not None:  # the zones' and lines' classes must exist in the new model
            node.objects.check_classes(new.names)
    except BastionError as exc:
        new.close()
        return {**node._reload_refused(request.bundle, exc, client), "error": f"reload refused: {exc}"}
    try:  # what runs changes only when the trail can say so
        node.audit.append(
            "reload",
            strict=True,
            sha256=new.bundle_sha256,
            **({"downgrade_from": node.detector.manifest.version} if rollback else {}),
        )
    except AuditWriteError as exc:
        new.close()
        return {"ok": False, "error": f"reload refused: {exc}"}
    with node._detector_lock:
        old, node.detector = node.detector, new
    old.close()
    return {"model": {"name": new.manifest.name, "sha256": new.bundle_sha256}}


@handles("ask")
def ask(node: Node, request: AskRequest, client: str) -> Reply:
    """Checked here (a model loaded, the prompt within the node's limit); generated in the lm lane, streamed to
    this client only: ``{"text": piece, "done": false}`` each, then ``{"done": true, "tokens": n}``."""
    result = node._ask(request)
    if "stream" not in result:
        return result
    return Deferred("lm", _as_replies(result["stream"]), STREAM_STALL_S, "generation failed", streams=True)


def _as_replies(pieces: Iterator[str]) -> Iterator[dict[str, Any]]:
    count = 0
    try:
        for piece in pieces:
            count += 1
            yield {"text": piece, "done": False}
        yield {"done": True, "tokens": count}
    finally:  # the reader left: stop generating (the node audits the ask as it ends)
        getattr(pieces, "close", lambda: None)()
