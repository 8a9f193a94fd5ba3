"""One control message off the ROUTER socket, bounded before it is kept: the node's first line against a client
that sends more than any request can be (docs/protocol.md "Limits").

libzmq's ``maxmsgsize`` is per frame, and a multi-part message is handed over whole once it has arrived; so the
message is taken frame by frame and, past the total size or frame count, every further frame is released unread.
Only the last frame (the request) is kept, and only when the whole message is within the limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from bastion.edge.protocol import MAX_REQUEST_BYTES, MAX_REQUEST_FRAMES

NO_USER_ID = b""  # a CURVE message that carries no ZAP User-Id: no key, so no role (refused, fail closed)


@dataclass
class Incoming:
    """One control message as received: only the last frame is kept, and only when within the limits."""

    identity: bytes
    client: bytes  # whose bucket pays: the CurveZMQ key (User-Id) or, without CurveZMQ, the connection
    payload: bytes | None  # None: the message broke a limit and was dropped frame by frame
    frames: int
    size: int


def receive_bounded(control: zmq.Socket, curve_enabled: bool) -> Incoming:
    """One message, frame by frame: past the size or frame limit every further frame is dropped unread.

    The NOBLOCK receives never wait (the message is all there); copy=False keeps each dropped frame in libzmq's
    buffer until it is released here, instead of copying it into Python.
    """
    identity = control.recv(zmq.NOBLOCK, copy=False).bytes  # libzmq caps routing ids at 255 bytes
    # with CurveZMQ the client is its ZAP User-Id, never the routing id: that one the client chooses (an admin's
    # public key is public), and without a ZAP handler (its thread gone) libzmq lets CURVE clients in unnamed
    client, last, frames, size = (NO_USER_ID if curve_enabled else identity), None, 1, 0
    while control.getsockopt(zmq.RCVMORE):
        part = control.recv(zmq.NOBLOCK, copy=False)
        frames += 1
        size += len(part)
        if frames == 2 and curve_enabled:
            try:
                client = part.get("User-Id").encode()
            except zmq.ZMQError:
                pass
        last = part if frames <= MAX_REQUEST_FRAMES and size <= MAX_REQUEST_BYTES else None
    within = frames <= MAX_REQUEST_FRAMES and size <= MAX_REQUEST_BYTES and last is not None
    return Incoming(identity, client, last.bytes if within else None, frames, size)
