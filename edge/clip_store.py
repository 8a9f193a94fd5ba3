"""Evidence clips at rest: one encrypted file per event seq, sealed exactly like snapshots (edge/snapshots.py).

What is sealed is ``MAGIC || header length (4 bytes, big-endian) || header JSON || video``: the header
(``ClipMeta``: codec, container, frames, size, fps, time span, the triggering event's kind) travels inside
the encryption, so the disk tells a thief nothing but that a file exists. The associated data names the
node, the seq and the kind (``bastion-clip:<node>:<seq>``): a clip renamed to another event, or a snapshot
renamed to a clip, does not decrypt.

Retention: ``delete_before`` follows the events' retention (a clip goes with its event), ``prune_to`` keeps
the clips' own disk budget (``storage.clip_max_mb``), oldest first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from bastion.edge.clip_meta import MAX_CLIP_BYTES, ClipMeta
from bastion.edge.snapshots import SealedFiles
from bastion.errors import BastionError

MAGIC = b"BCLIP1"
MAX_HEADER_BYTES = 4096
SUFFIX = ".clip.enc"


class ClipVault(SealedFiles):
    label = "clip"
    suffix = SUFFIX

    def limit(self) -> int:
        return MAX_CLIP_BYTES + MAX_HEADER_BYTES + 64  # + magic, length, nonce, tag

    def save(self, meta: ClipMeta, video: bytes) -> Path:
        header = meta.model_dump_json().encode()
        if len(header) > MAX_HEADER_BYTES or len(video) > MAX_CLIP_BYTES:
            raise BastionError(f"clip of event {meta.seq} is too large to keep ({len(video)} bytes)")
        return self.seal(meta.seq, MAGIC + len(header).to_bytes(4, "big") + header + video)

    def load(self, seq: int) -> tuple[ClipMeta, bytes]:
        """The clip of event ``seq``: its metadata and video bytes (BastionError: missing, unreadable, forged)."""
        plain = self.unseal(seq)
        start = len(MAGIC) + 4
        length = int.from_bytes(plain[len(MAGIC) : start], "big")
        if not plain.startswith(MAGIC) or length > MAX_HEADER_BYTES:
            raise BastionError(f"clip {self.path(seq).name} is not a clip this node wrote")
        try:
            meta = ClipMeta.model_validate(json.loads(plain[start : start + length]))
        except (ValueError, ValidationError):
            raise BastionError(f"clip {self.path(seq).name} has an unreadable header") from None
        return meta, plain[start + length :]

    def exists(self, seq: int) -> bool:
        return self.path(seq).is_file()

    def usage(self) -> tuple[int, int]:
        """(clips, bytes) on disk."""
        count = size = 0
        for seq in self.seqs():
            try:
                size += os.stat(self.path(seq)).st_size
                count += 1
            except OSError:
                continue
        return count, size

    def prune_to(self, max_bytes: int) -> list[int]:
        """Delete the oldest clips until the rest take at most ``max_bytes``; returns the seqs that went."""
        sizes = []
        for seq in self.seqs():
            try:
                sizes.append((seq, os.stat(self.path(seq)).st_size))
            except OSError:
                continue
        total = sum(size for _, size in sizes)
        removed = []
        for seq, size in sizes:
            if total <= max_bytes:
                break
            self.path(seq).unlink(missing_ok=True)
            total -= size
            removed.append(seq)
        return removed
