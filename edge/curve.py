"""CurveZMQ keys for the node and its clients (``zmq.auth`` certificate files)."""

from __future__ import annotations

import struct
from pathlib import Path

import zmq
import zmq.auth

from bastion.errors import KeyFileError


def generate_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) in ``directory``; never overwrite."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise KeyFileError(f"{public} already exists", "choose another name")
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def load_public(path_or_key: str | Path) -> bytes:
    """A z85 public key given directly (40 chars) or as a certificate file; refused unless it is a real key (an
    allow-list entry that can never match a client must not pass as one: a typo would look like access granted)."""
    text = str(path_or_key)
    if len(text) == 40 and not Path(text).exists():
        return checked_key(text.encode(), "the key given")
    try:
        public, _ = zmq.auth.load_certificate(str(path_or_key))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read CurveZMQ certificate {path_or_key}: {exc}") from None
    return checked_key(public, f"CurveZMQ certificate {path_or_key}")


def checked_key(z85_key: bytes, where: str) -> bytes:
    """``z85_key`` if it is the z85 text of a 32-byte Curve25519 key, else one KeyFileError line naming ``where``."""
    from zmq.utils import z85

    try:
        raw = z85.decode(z85_key)
        canonical = len(raw) == 32 and z85.encode(raw) == z85_key
    except (KeyError, ValueError, TypeError, struct.error):
        canonical = False
    if not canonical:
        shown = z85_key[:40].decode("ascii", errors="replace")
        raise KeyFileError(
            f"{where}: {shown!r} is not a CurveZMQ public key (40 z85 characters)",
            "copy the key again from the client's NAME.key (bastion node keygen writes one)",
        )
    return z85_key


def load_secret(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read CurveZMQ certificate {path}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key", "give the .key_secret file")
    return public, secret


def key_id(z85_public: bytes) -> str:
    return z85_public.decode(errors="replace")[:12]


def apply_client(socket: zmq.Socket, server_public: bytes, client_cert: Path | None) -> None:
    """Make ``socket`` a CurveZMQ client of ``server_public`` (an ephemeral key pair if no certificate)."""
    if client_cert is not None:
        public, secret = load_secret(client_cert)
    else:
        public, secret = zmq.curve_keypair()
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public
