"""``Client.clip(seq)``: an evidence clip fetched a chunk at a time, checked whole, kept in memory or written.

The node answers ``clip`` in chunks of at most ``CLIP_CHUNK_BYTES`` (edge/clip_op.py); this puts them
together and holds the node to its word: the metadata must not change between chunks, every chunk must start
where the last ended, the total must be the announced size (never past ``MAX_CLIP_BYTES``) and its sha256 the
announced one. Anything else is a ``NodeRequestError`` naming what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bastion.edge.answers import bad_answer
from bastion.edge.clip_meta import MAX_CLIP_BYTES, ClipMeta
from bastion.models.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from bastion.edge.client import Client


@dataclass(frozen=True)
class Clip:
    """One evidence clip: what the node says about it, and its video (``meta.container``: avi or mp4)."""

    meta: ClipMeta
    data: bytes

    def save(self, path: str | Path) -> Path:
        """Write the video to ``path`` (temp file, fsync, rename); a directory gets ``clip-<seq>.<container>``, and
        so does a name ending in ``/`` (made if missing: ``clips/`` is a folder to an operator, not a file)."""
        folder = isinstance(path, str) and path.endswith(("/", os.sep))
        path = Path(path)
        if folder or path.is_dir():
            path = path / f"clip-{self.meta.seq}.{self.meta.container}"
        atomic_write_bytes(path, self.data)
        return path


def _chunk(answer: dict[str, Any], offset: int) -> tuple[ClipMeta, bytes, bool]:
    try:
        meta = ClipMeta.model_validate(answer.get("clip"))
    except ValidationError as exc:
        raise bad_answer("clip", f"has no valid clip metadata ({exc.errors()[0]['msg']})") from None
    if answer.get("offset") != offset:
        raise bad_answer("clip", f"starts at {answer.get('offset')!r:.20}, not at the {offset} bytes already read")
    raw = answer.get("data_b64")
    try:
        if not isinstance(raw, str):
            raise ValueError
        data = base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        raise bad_answer("clip", "holds no base64 video (data_b64)") from None
    return meta, data, answer.get("more") is True


def fetch_clip(client: Client, seq: int) -> Clip:
    meta: ClipMeta | None = None
    parts: list[bytes] = []
    offset = 0
    while True:
        got, data, more = _chunk(client.request("clip", seq=seq, offset=offset), offset)
        if meta is None:
            meta = got
            if meta.seq != seq:
                raise bad_answer("clip", f"is the clip of event {meta.seq}, not {seq}")
        elif got != meta:
            raise bad_answer("clip", "changed between two of its chunks")
        parts.append(data)
        offset += len(data)
        if offset > min(meta.size, MAX_CLIP_BYTES):
            raise bad_answer("clip", f"sent more than the {meta.size} bytes it announced")
        if not more:
            break
        if not data:
            raise bad_answer("clip", "says there is more but sent nothing")
    video = b"".join(parts)
    if len(video) != meta.size or hashlib.sha256(video).hexdigest() != meta.sha256:
        raise bad_answer("clip", f"does not match its metadata ({len(video)} of {meta.size} bytes, or another sha256)")
    return Clip(meta, video)
