"""RFC 7512 ``pkcs11:`` URIs: which token, which key, which module, where the PIN comes from.

Why our own parser: no maintained RFC 7512 parser is on PyPI, and the grammar is small (``;``-separated path
attributes, ``&``-separated query attributes, percent-encoding).  It is strict on purpose: a URI that names an
attribute bastion does not know, names one twice, or carries a character the RFC does not allow is refused in one
line rather than half-understood, because a loosely read URI could select the wrong key on a token holding several.

``pin-value`` is a secret: ``redact`` removes it from every string bastion shows or logs, and ``Pkcs11Uri``'s repr
never includes it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import NoReturn

from bastion.errors import KeyFileError

SCHEME = "pkcs11"
MAX_URI_CHARS = 4096  # a URI names a few attributes; anything longer is not one
EXAMPLE = "pkcs11:token=bastion;object=model-team?module-path=/usr/lib/softhsm/libsofthsm2.so"

# RFC 7512 section 2.3: the attributes a consumer may meet (vendor attributes start with "x-")
PATH_ATTRIBUTES = frozenset(
    {
        "id",
        "library-description",
        "library-manufacturer",
        "library-version",
        "manufacturer",
        "model",
        "object",
        "serial",
        "slot-description",
        "slot-id",
        "slot-manufacturer",
        "token",
        "type",
    }
)
QUERY_ATTRIBUTES = frozenset({"module-name", "module-path", "pin-source", "pin-value"})
OBJECT_TYPES = frozenset({"cert", "data", "private", "public", "secret-key"})

# pk11-pchar / pk11-qchar of RFC 7512 (unreserved, the allowed sub-delims, ":" "[" "]" "@", percent-encoding);
# "&" may stand in a path value and "/" "?" "|" ";" in a query value
_UNRESERVED = r"A-Za-z0-9\-._~"
_PATH_VALUE = re.compile(rf"(?:[{_UNRESERVED}:\[\]@!$'()*+,=&]|%[0-9A-Fa-f]{{2}})*")
_QUERY_VALUE = re.compile(rf"(?:[{_UNRESERVED}:\[\]@!$'()*+,=/?|;]|%[0-9A-Fa-f]{{2}})*")
_NAME = re.compile(r"[a-z][a-z0-9\-]*")
_PIN_VALUE = re.compile(r"(pin-value=)[^&]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with any ``pin-value`` replaced by ``***`` (works on malformed URIs too), cut to a readable size."""
    shown = _PIN_VALUE.sub(r"\1***", text)
    return shown if len(shown) <= 200 else shown[:200] + "…"


def is_pkcs11_uri(text: str) -> bool:
    return text[: len(SCHEME) + 1].lower() == SCHEME + ":"


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed URI: decoded path attributes (``id`` as bytes, the rest as text) and query attributes."""

    path: Mapping[str, str] = field(default_factory=dict)
    object_id: bytes | None = None
    query: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold pin-value: never in a repr
    text: str = field(default="", repr=False)

    @property
    def shown(self) -> str:
        """The URI as bastion prints it: the PIN never appears."""
        return redact(self.text)

    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def object(self) -> str | None:
        return self.path.get("object")

    @property
    def type(self) -> str | None:
        return self.path.get("type")

    @property
    def slot_id(self) -> int | None:
        value = self.path.get("slot-id")
        return int(value) if value is not None else None

    @property
    def module_path(self) -> str | None:
        return self.query.get("module-path")

    @property
    def pin_value(self) -> str | None:
        return self.query.get("pin-value")

    @property
    def pin_source(self) -> str | None:
        return self.query.get("pin-source")


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse ``text`` or raise one ``KeyFileError`` naming what is wrong (the PIN never appears in it)."""
    if len(text) > MAX_URI_CHARS:
        _refuse(text, f"longer than {MAX_URI_CHARS} characters")
    if not is_pkcs11_uri(text):
        _refuse(text, "it does not start with pkcs11:")
    body = text[len(SCHEME) + 1 :]
    path_part, _, query_part = body.partition("?")
    path = _attributes(text, path_part, ";", _PATH_VALUE, PATH_ATTRIBUTES, "path")
    query = _attributes(text, query_part, "&", _QUERY_VALUE, QUERY_ATTRIBUTES, "query")
    if "pin-value" in query and "pin-source" in query:
        _refuse(text, "it gives both pin-value and pin-source; give one")
    if "module-name" in query:
        _refuse(text, "module-name is not supported; name the module file with module-path=/path/to/module.so")
    texts = {name: _text(text, name, value) for name, value in path.items() if name != "id"}
    if "slot-id" in texts and not texts["slot-id"].isdigit():
        _refuse(text, "slot-id must be a decimal number")
    if "type" in texts and texts["type"] not in OBJECT_TYPES:
        _refuse(text, f"type must be one of {', '.join(sorted(OBJECT_TYPES))}")
    decoded_query = {name: _text(text, name, value) for name, value in query.items()}
    return Pkcs11Uri(texts, path.get("id"), decoded_query, text)


def _attributes(
    text: str, part: str, separator: str, allowed: re.Pattern, names: frozenset, where: str
) -> dict[str, bytes]:
    """``name=value`` pairs of one part of the URI, values percent-decoded to bytes; refusals name the attribute."""
    found: dict[str, bytes] = {}
    if not part:
        return found
    for item in part.split(separator):
        name, equals, value = item.partition("=")
        name = name.lower()
        if not equals or not _NAME.fullmatch(name):
            _refuse(text, f"{item[:40]!r} is not a name=value {where} attribute")
        if name not in names and not name.startswith("x-"):
            known = ", ".join(sorted(names))
            _refuse(text, f"unknown {where} attribute {name!r} (known: {known})")
        if name in found:
            _refuse(text, f"the {where} attribute {name!r} appears twice")
        if not allowed.fullmatch(value):
            _refuse(text, f"the value of {name!r} holds a character a pkcs11: URI must percent-encode (%XX)")
        found[name] = _percent_decode(value)
    return found


def _percent_decode(value: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "%":  # the pattern has checked two hex digits follow
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out += value[i].encode("ascii")
            i += 1
    return bytes(out)


def _text(text: str, name: str, value: bytes) -> str:
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError:
        _refuse(text, f"the value of {name!r} is not UTF-8 once percent-decoded")
    # a NUL, newline or terminal escape (%00, %0a, %1b) in a label would be echoed raw into every message and log
    # line that names the key: refused, as no token label or file path a soldier types needs one
    if any(unicodedata.category(ch) == "Cc" for ch in decoded):
        _refuse(text, f"the value of {name!r} holds a control character once percent-decoded (%00-%1f, %7f)")
    return decoded


def _refuse(text: str, why: str) -> NoReturn:
    raise KeyFileError(f"not a usable pkcs11: URI ({why}): {redact(text)}", f"for example: {EXAMPLE}")
