"""What a node says about an evidence clip, and the bounds both ends of the ``clip`` op hold (docs/protocol.md).

Its own small module so the SDK's ``Client.clip`` (edge/clip_client.py) reads answers without importing the
node's encoder and vault.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# One clip's video: ~10 s of 1080p MJPEG at 10 fps is ~20-30 MB; the node never keeps or sends more.
MAX_CLIP_BYTES = 48 * 2**20
# Video bytes in one ``clip`` answer (base64 makes it ~5.6 MB of JSON, like a replay page); the client asks for
# the next ``offset`` while ``more`` is true.
CLIP_CHUNK_BYTES = 4 * 2**20


class ClipMeta(BaseModel):
    """A clip's metadata: sealed inside its file with the video, sent with every chunk of it."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1)  # the event that asked for it
    kind: str = Field(max_length=40)  # object.end, zone.enter, zone.leave, loiter, line.cross
    source: str = Field(max_length=200)
    codec: str = Field(max_length=20)  # mjpeg | mp4v | h264: what was written (edge/clip_codec.py)
    container: str = Field(max_length=8)  # avi | mp4
    frames: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    fps: float = Field(gt=0)
    start_ts: float  # read time of the first and the last frame
    end_ts: float
    event_ts: float
    size: int = Field(ge=1, le=MAX_CLIP_BYTES)  # bytes of the video
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the video: the client checks what it put together
