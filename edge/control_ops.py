"""The control ops (docs/protocol.md "control"): one handler per op, found by op in ``HANDLERS``.

A handler gets the node, the request already validated as its op's own model
(edge/protocol.py: every field typed and bounded, no others) and the client's
label for the audit log; ``dispatch`` has checked first, in this one place,
that the client's role may run the op (edge/roles.py ``OP_ROLES``: a handler
names no role, the table does).  It returns the reply's fields, or a ``Deferred`` for
work that must not hold the control thread (``ask`` generates, ``reload``
unpacks and verifies a bundle): the server runs that in its lane and sends the
replies from there (edge/control_lanes.py).  A client's bad input is answered
``{"ok": false, "error": "…"}`` in one line; only a bug raises.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from bastion.edge.audit import AuditWriteError
from bastion.edge.clip_op import clip_answer
from bastion.edge.control_lanes import Deferred
from bastion.edge.events_v2 import event_v, read_events
from bastion.edge.limits import clip as clip_text
from bastion.edge.pin import Pin, clear_pin, new_pin, read_pin, write_pin
from bastion.edge.protocol import (
    AskRequest,
    ClipRequest,
    PingRequest,
    ReloadRequest,
    ReplayRequest,
    SnapshotRequest,
    StatusRequest,
)
from bastion.edge.roles import allows, needs, refusal
from bastion.edge.server import ANSWER_STALL_S, STREAM_STALL_S
from bastion.edge.store import StorageError
from bastion.errors import BastionError
from bastion.models.version import check_not_downgrade

if TYPE_CHECKING:
    from bastion.edge.node import Node
    from bastion.edge.protocol import ControlRequest

log = logging.getLogger("bastion.edge.node")  # the refusal lines keep the name they had in the node
RELOAD_REFUSED = "reload refused: not a bundle this node can verify and load (the node's audit log says why)"
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


def dispatch(node: Node, request: ControlRequest, client: str, role: str | None) -> Reply:
    """The reply to ``request``: its op's handler (every op edge/protocol.py accepts has one, tests hold it), once
    the client's ``role`` may run it.  A refusal is one line back and an ``op_refused`` record, coalesced per client
    and minute (edge/limits.py), so a client looping on a refused op cannot fill the audit log."""
    if not allows(role, request.op):
        if node.server.refusals.refuse("op_refused", client, op=request.op, role=role, needs=needs(request.op)):
            log.warning("%s refused for %s (role %s; repeats are counted in the audit log)", request.op, client, role)
        return {"ok": False, "error": refusal(request.op, role), "refused": True}
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
        return _reload_refused(node, request.bundle, exc, client)
    try:  # an older version of the running model only when asked (#15 item 9)
        rollback = check_not_downgrade(node.detector.manifest, new.manifest, request.allow_downgrade)
        if node.objects is not None:  # the zones' and lines' classes must exist in the new model
            node.objects.check_classes(new.names)
    except BastionError as exc:
        new.close()
        return {**_reload_refused(node, request.bundle, exc, client), "error": f"reload refused: {exc}"}
    pin = new_pin(request.bundle, new, client) if request.persist else None
    try:  # the pin is on disk before the trail says so, and the trail before anything runs (edge/pin.py)
        before = _persist(node, pin)
    except OSError as exc:
        new.close()
        return {"ok": False, "error": f"reload refused: cannot persist the pin: {exc.strerror or exc}"}
    try:  # what runs changes only when the trail can say so
        node.audit.append(
            "reload",
            strict=True,
            sha256=new.bundle_sha256,
            client=client,  # who asked: a reload without persist leaves no pin to name them
            **({"downgrade_from": node.detector.manifest.version} if rollback else {}),
            **({"pinned": pin.bundle} if pin is not None else {}),
        )
    except AuditWriteError as exc:
        new.close()
        if pin is not None:
            _unpersist(node, before)
        return {"ok": False, "error": f"reload refused: {exc}"}
    with node._detector_lock:
        old, node.detector = node.detector, new
        if pin is not None:
            node.pin = {**pin.model_dump(), "state": "running"}
        elif node.pin is not None and node.pin.get("state") == "running":  # the pin runs again at the next start
            node.pin = {**node.pin, "state": "after_restart"}
    old.close()
    return {"model": {"name": new.manifest.name, "sha256": new.bundle_sha256}, "pinned": pin is not None}


def _persist(node: Node, pin: Pin | None) -> Pin | None:
    """Write ``pin`` (None: nothing to do) and return the pin it replaces, to put back if the audit fails."""
    if pin is None:
        return None
    try:
        before = read_pin(node.storage)
    except BastionError:  # a damaged pin is replaced, not kept
        before = None
    write_pin(node.storage, pin)
    return before


def _unpersist(node: Node, before: Pin | None) -> None:
    try:
        if before is not None:
            write_pin(node.storage, before)
        else:
            clear_pin(node.storage)
    except OSError as exc:  # the disk that failed the audit fails this too: the next start says which pin it met
        log.error("cannot put the previous model pin back: %s", exc)


def _reload_refused(node: Node, bundle: str, exc: Exception, client: str) -> dict[str, Any]:
    """One answer for every refusal, whatever the path names (a file, a directory, nothing at all), so a
    client cannot map the host's files through ``reload``; the reason goes, clipped, to the audit log
    (repeats coalesced per client and minute, edge/limits.py) and to one log line."""
    reason = str(exc) if isinstance(exc, BastionError) else f"{type(exc).__name__}: {exc}"
    if node.server.refusals.refuse("bundle_refused", client, model=bundle, reason=reason, op="reload"):
        log.warning("reload refused for %s: %s", client, clip_text(reason))
    return {"ok": False, "error": RELOAD_REFUSED}


@handles("ask")
def ask(node: Node, request: AskRequest, client: str) -> Reply:
    """Checked here (a model loaded, the prompt within the node's limit); generated in the lm lane, streamed to
    this client only: ``{"text": piece, "done": false}`` each, then ``{"done": true, "tokens": n}``."""
    result = _ask(node, request)
    if "stream" not in result:
        return result
    return Deferred("lm", _as_replies(result["stream"]), STREAM_STALL_S, "generation failed", streams=True)


def _ask(node: Node, request: AskRequest) -> dict[str, Any]:
    """The answer, as pieces for this client only; checked here, generated in the server's lm lane, bounded."""
    if node.generator is None:
        return {
            "ok": False,
            "error": "no language model loaded on this node — add `lm: stories260K` (or your "
            "task: lm bundle) to its node.yaml and restart it",
        }
    prompt = request.prompt or ""
    if not prompt or len(prompt) > node.config.lm_max_prompt_chars:
        return {"ok": False, "error": f"prompt must be 1..{node.config.lm_max_prompt_chars} characters"}
    limit = min(request.max_new_tokens, node.config.lm_max_new_tokens)
    audit, generator = node.audit, node.generator

    def pieces() -> Iterator[str]:
        count = 0
        try:
            for piece in generator.generate(prompt, limit):
                count += 1
                yield piece
        finally:  # the text is not audited, only that it happened and how much
            audit.append("ask", prompt_chars=len(prompt), tokens_out=count)

    return {"stream": pieces()}


def _as_replies(pieces: Iterator[str]) -> Iterator[dict[str, Any]]:
    count = 0
    try:
        for piece in pieces:
            count += 1
            yield {"text": piece, "done": False}
        yield {"done": True, "tokens": count}
    finally:  # the reader left: stop generating (the node audits the ask as it ends)
        getattr(pieces, "close", lambda: None)()
