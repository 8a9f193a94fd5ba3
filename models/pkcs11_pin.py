"""The user PIN of a PKCS#11 token, from where RFC 7512 and bastion allow it to come: the URI (pin-value, or a
pin-source file), ``BASTION_PKCS11_PIN``, or a prompt on a terminal. Kept apart from the token code because the
PIN's rules are bastion's, not the token's: a pin-source is only ever a file (never a command to run), read bounded,
and a PIN is never logged or shown.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from bastion.errors import KeyFileError
from bastion.models.pkcs11_uri import Pkcs11Uri
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded

PIN_ENV = "BASTION_PKCS11_PIN"
MAX_PIN_BYTES = 256


def read_pin(uri: Pkcs11Uri, ask: bool) -> str | None:
    """The user PIN: the URI's pin-value or pin-source file, else BASTION_PKCS11_PIN, else asked on a terminal."""
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        return _pin_from_file(uri.pin_source)
    if os.environ.get(PIN_ENV):
        return os.environ[PIN_ENV]
    if not ask:
        return None
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise KeyFileError(
            f"the token of {uri.shown} needs its user PIN and there is no terminal to ask on",
            f"set {PIN_ENV} or add ?pin-source=file:/path/to/pin to the URI",
        )
    try:
        pin = getpass.getpass(f"PIN for {uri.token or 'the token'}: ")
    except (EOFError, KeyboardInterrupt):
        pin = ""
    if not pin:
        raise KeyFileError("no PIN given", f"type it at the prompt or set {PIN_ENV}")
    return pin


def _pin_from_file(source: str) -> str:
    """RFC 7512 pin-source: a file (``file:/path``, ``file:///path`` or a bare path); no other kind is run."""
    path = source[len("file:") :] if source.lower().startswith("file:") else source
    if path.startswith("//"):
        path = path[2:]
    if not path.startswith("/"):
        raise KeyFileError(
            f"pin-source {source!r} is not a file", "use pin-source=file:/absolute/path (bastion runs no commands)"
        )
    try:
        data = read_bounded(Path(path), MAX_PIN_BYTES)
    except FileNotFoundError:
        raise KeyFileError(f"PIN file not found: {path}") from None
    except (TooLarge, NotRegular):
        raise KeyFileError(f"{path} is not a PIN file (a regular file under {MAX_PIN_BYTES} bytes)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the PIN file {path}: {exc.strerror or exc}") from None
    try:
        return data.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"the PIN file {path} is not UTF-8 text") from None
