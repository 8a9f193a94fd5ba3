"""Evidence clips at rest: one encrypted file per event seq, sealed in pieces with the snapshot key (edge/snapshots.py).

A clip is a sealed stream (``SealedFiles.seal_stream``): piece 0 is its header (``ClipMeta`` as JSON: codec,
container, frames, size, fps, time span, the triggering event's kind), pieces 1..n its video in pieces of
``CLIP_CHUNK_BYTES``. Everything but the format version, a salt and the two piece sizes is inside the
encryption, so the disk tells a thief nothing but that a file exists and about how large it is. Each piece is
bound to the node, the seq, the file and its place (``bastion-clip:<node>:<seq>``, its index, whether it is the
last): a clip renamed to another event, a piece swapped with another clip's, moved, dropped or a file cut short
does not decrypt. Serving the ``clip`` op's chunk at ``offset`` decrypts the header and the one piece holding
it (``read_at``), never the whole clip: what one request costs the control thread is bounded by the chunk.

Files written before clips were sealed in pieces (format version 1, one AES-GCM blob; never released) are refused
in one line, not read.

Retention: ``delete_before`` follows the events' retention (a clip goes with its event), ``prune_to`` keeps
the clips' own disk budget (``storage.clip_max_mb``), oldest first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from bastion.edge.clip_meta import CLIP_CHUNK_BYTES, MAX_CLIP_BYTES, ClipMeta
from bastion.edge.snapshots import MIN_PIECE_BYTES, STREAM_HEADER, TAG_BYTES, SealedFiles, SealedStream
from bastion.errors import BastionError

MAX_HEADER_BYTES = 4096
SUFFIX = ".clip.enc"


class ClipVault(SealedFiles):
    label = "clip"
    suffix = SUFFIX

    def __init__(self, directory: Path, key: bytes, node_id: str, piece_bytes: int = CLIP_CHUNK_BYTES) -> None:
        super().__init__(directory, key, node_id)
        self.piece_bytes = piece_bytes  # what new clips are sealed in; a file says its own

    def limit(self) -> int:
        pieces = MAX_CLIP_BYTES // MIN_PIECE_BYTES + 2  # the most a clip can have, its header included
        return STREAM_HEADER.size + MAX_HEADER_BYTES + MAX_CLIP_BYTES + TAG_BYTES * pieces

    def save(self, meta: ClipMeta, video: bytes) -> Path:
        header = meta.model_dump_json().encode()
        if len(header) > MAX_HEADER_BYTES or not 0 < len(video) <= MAX_CLIP_BYTES:
            raise BastionError(f"clip of event {meta.seq} is too large to keep ({len(video)} bytes)")
        return self.seal_stream(meta.seq, header, video, self.piece_bytes)

    def _meta(self, stream: SealedStream) -> ClipMeta:
        if stream.head_bytes > MAX_HEADER_BYTES:
            raise BastionError(f"clip {stream.name} is not a clip this node wrote")
        head = stream.piece(0)
        try:
            meta = ClipMeta.model_validate(json.loads(head))
        except (ValueError, ValidationError):
            raise BastionError(f"clip {stream.name} has an unreadable header") from None
        if meta.seq != stream.seq or stream.pieces != -(-meta.size // stream.piece_bytes):
            raise BastionError(f"clip {stream.name} does not hold the {meta.size} bytes its header says (cut short?)")
        return meta

    def read_at(self, seq: int, offset: int) -> tuple[ClipMeta, bytes]:
        """The clip's metadata and its video from ``offset`` to the end of the piece holding it (empty at or past
        the end): the header and that one piece are read and decrypted, nothing else."""
        with self.open_stream(seq) as stream:
            meta = self._meta(stream)
            if offset >= meta.size:
                return meta, b""
            index, skip = divmod(offset, stream.piece_bytes)
            return meta, stream.piece(index + 1)[skip:]

    def load(self, seq: int) -> tuple[ClipMeta, bytes]:
        """The clip of event ``seq``: its metadata and video bytes (BastionError: missing, unreadable, forged)."""
        with self.open_stream(seq) as stream:
            meta = self._meta(stream)
            video = b"".join(stream.piece(i) for i in range(1, stream.pieces + 1))
        if len(video) != meta.size:
            raise BastionError(f"clip {stream.name} does not hold the {meta.size} bytes its header says")
        return meta, video

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
