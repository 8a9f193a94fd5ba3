"""The ``clip`` control op's answer: an evidence clip, decrypted by the node, in chunks of ``CLIP_CHUNK_BYTES``.

An answer decrypts only the sealed piece its ``offset`` falls in (clips are sealed in pieces of that size), so
one request costs the control thread one chunk's decryption whatever the clip's size, and an operator asking
chunk after chunk costs no more than reading the clip once.

Every way of not having a clip is its own line, so an operator knows whether to wait, look elsewhere or give
up: no clips on this node, no such event, the event aged out, the clip still recording, the clip dropped
(too many in flight, clips paused by a disk error …), the event not one that keeps a clip.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from bastion.edge.clip_meta import CLIP_CHUNK_BYTES
from bastion.errors import BastionError

if TYPE_CHECKING:
    from bastion.edge.node import Node


def _refuse(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def clip_answer(node: Node, seq: int, offset: int) -> dict[str, Any]:
    recorder = getattr(node, "clips", None)
    if recorder is None:
        return _refuse("this node keeps no clips (storage.clips is off)")
    last = node.store.last_seq()
    if seq < 1 or seq > last:
        return _refuse(f"no event {seq} on this node (the last is {last})")
    if recorder.recording(seq):
        return _refuse(f"the clip of event {seq} is still recording: ask again in a few seconds")
    if not recorder.vault.exists(seq):
        return _refuse(_why_none(node, recorder, seq))
    try:  # the header and the one sealed piece holding ``offset``: never the whole clip (edge/clip_store.py)
        meta, piece = recorder.vault.read_at(seq, offset)
    except BastionError as exc:  # unreadable, forged, another key: said, never a traceback
        return _refuse(str(exc))
    if offset > meta.size:
        return _refuse(f"offset {offset} is past the end of the clip of event {seq} ({meta.size} bytes)")
    chunk = piece[:CLIP_CHUNK_BYTES]
    return {
        "clip": meta.model_dump(mode="json"),
        "offset": offset,
        "data_b64": base64.b64encode(chunk).decode(),
        "more": offset + len(chunk) < meta.size,
    }


def _why_none(node: Node, recorder: Any, seq: int) -> str:
    reason = recorder.outcome(seq)
    if reason is not None:
        return f"event {seq} has no clip: {reason}"
    try:
        first = node.store.first_seq()
    except BastionError as exc:
        return f"event {seq} has no clip here, and the event store cannot say more ({exc})"
    if first is None or seq < first:
        return f"event {seq} is no longer stored (retention removed it and its clip)"
    return f"event {seq} has no clip (clips are kept for object.end and zone/line events)"
