"""Ed25519 keys held on a PKCS#11 token (an HSM, a smart card, SoftHSM2): sign without the key leaving the token.

Why: a PEM file can be copied by anyone who gets the disk or the login for a minute; a token key cannot be read
out at all (generated on the token, CKA_SENSITIVE and not CKA_EXTRACTABLE), only used while the token is plugged
in and unlocked with its PIN.  The signatures are the same Ed25519 (CKM_EDDSA, PKCS#11 3.0) over the same
canonical manifest bytes, and the public key read from the token (CKA_EC_POINT) gives the same key id as a file
key: verifiers never know or care where the private half lives.

``pkcs11`` (python-pkcs11, the ``[hsm]`` extra) is imported only here and only when a ``pkcs11:`` URI is used; the
field path never loads it.  Every refusal (module missing, no such token or key, wrong PIN, token removed) is one
``KeyFileError`` line; the PIN is never logged or shown.
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import KeyFileError, MissingExtraError
from bastion.models.pkcs11_pin import PIN_ENV, read_pin
from bastion.models.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri

log = logging.getLogger(__name__)

MODULE_ENV = "BASTION_PKCS11_MODULE"
ED25519_PARAMS = bytes.fromhex("06032b6570")  # CKA_EC_PARAMS: DER of the OID 1.3.101.112 (id-Ed25519, RFC 8410)
MODULE_HINT = (
    f"add ?module-path=/path/to/module.so to the URI or set {MODULE_ENV} (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
)

# what a refusing token raises (python-pkcs11 exception class names, most specific first on the MRO) → what to say
_REFUSALS: dict[str, tuple[str, str]] = {
    "PinIncorrect": ("wrong PIN for {where}", f"check {PIN_ENV} or the URI's pin-source (the token locks after a few)"),
    "PinLocked": ("{where} is locked after too many wrong PINs", "unlock it with its security officer PIN"),
    "PinExpired": ("the PIN of {where} has expired", "set a new user PIN with the token's own tool"),
    "PinInvalid": ("the PIN given is not a valid PIN for {where}", f"check {PIN_ENV} or the URI's pin-source"),
    "PinLenRange": ("the PIN given has the wrong length for {where}", f"check {PIN_ENV} or the URI's pin-source"),
    "UserPinNotInitialized": ("{where} has no user PIN yet", "set one: softhsm2-util --init-pin, or the token's tool"),
    "TokenNotPresent": ("{where} was removed", "plug it in again and repeat"),
    "DeviceRemoved": ("{where} was removed", "plug it in again and repeat"),
    "TokenNotRecognised": ("{where} is not recognised by its module", "plug it in again and repeat"),
    "SessionClosed": ("{where} closed the session (removed or reset)", "plug it in again and repeat"),
    "SessionHandleInvalid": ("{where} closed the session (removed or reset)", "plug it in again and repeat"),
    "DeviceError": ("{where} stopped answering", "plug it in again and repeat"),
    "TokenWriteProtected": ("{where} is write-protected", "use a token that may hold a new key"),
    "MechanismInvalid": ("{where} cannot do Ed25519 (CKM_EDDSA, PKCS#11 3.0)", "use one that can (SoftHSM2 2.6+)"),
    "DomainParamsInvalid": ("{where} cannot do Ed25519 (CKM_EDDSA, PKCS#11 3.0)", "use one that can (SoftHSM2 2.6+)"),
    "KeyTypeInconsistent": ("the key on {where} is not an Ed25519 key", "name an Ed25519 key (CKK_EC_EDWARDS)"),
}


@dataclass(frozen=True)
class TokenKey:
    """What ``bastion keys generate --pkcs11`` made: the public key and how the token names the pair."""

    public: Ed25519PublicKey
    label: str
    object_id: bytes


class TokenSigner:
    """A key on a token, as a ``Signer``: ``sign(data)`` asks the token; ``public_key()`` was read from it.

    The session stays open (logged in) until ``close()`` or garbage collection, so a command that signs several
    times asks for the PIN once."""

    def __init__(self, session: Any, private: Any, public: Ed25519PublicKey, where: str) -> None:
        self._private = private
        self._public = public
        self.where = where
        self._finalizer = weakref.finalize(self, _close_quietly, session)

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        pkcs11 = _pkcs11()
        with _token_errors(self.where):
            signature = bytes(self._private.sign(data, mechanism=pkcs11.Mechanism.EDDSA))
        try:  # a public object that is not this key's half would put a wrong key id on every signature
            self._public.verify(signature, data)
        except InvalidSignature:
            raise KeyFileError(
                f"the signature made by {self.where} does not verify with the public key stored beside it",
                "the token holds a mismatched key pair under that name; generate a new key",
            ) from None
        return signature

    def close(self) -> None:
        self._finalizer()


def open_token_signer(text: str) -> TokenSigner:
    """The key a ``pkcs11:`` URI names, logged in with its PIN, ready to sign."""
    uri = parse_pkcs11_uri(text)
    if uri.type not in (None, "private"):
        raise KeyFileError(f"{uri.shown} names a {uri.type} object; signing needs its private key", "drop type=")
    _need_a_name(uri)
    token = _find_token(uri)
    where = _describe(token)
    session = _open_session(token, uri, where, read_pin(uri, ask=True), rw=False)
    try:
        private = _one_object(session, uri, "PRIVATE_KEY", where)
        public = _public_beside(session, private, where)
    except BaseException:
        _close_quietly(session)
        raise
    log.info("signing with %s", where)
    return TokenSigner(session, private, public, where)


def token_public_key(text: str) -> Ed25519PublicKey:
    """The public half of the key a URI names (for trust stores); logs in only when a PIN is given without asking."""
    uri = parse_pkcs11_uri(text)
    _need_a_name(uri)
    token = _find_token(uri)
    where = _describe(token)
    session = _open_session(token, uri, where, read_pin(uri, ask=False), rw=False)
    try:  # the public object the URI names (visible without a PIN); else the one beside the private key
        if uri.type == "public" or (uri.type is None and _count(session, uri, "PUBLIC_KEY", where) == 1):
            return _ed25519_from(_one_object(session, uri, "PUBLIC_KEY", where), where)
        return _public_beside(session, _one_object(session, uri, "PRIVATE_KEY", where), where)
    finally:
        _close_quietly(session)


def generate_on_token(text: str) -> TokenKey:
    """Make an Ed25519 key pair on the token named by ``object=`` (and ``id=``, else a random one): the private half
    sensitive and not extractable, so it never exists outside the token.  Never replaces an object already there."""
    pkcs11 = _pkcs11()
    uri = parse_pkcs11_uri(text)
    if not uri.object or uri.type not in (None, "private"):
        raise KeyFileError(f"{uri.shown} must name the new key: object=LABEL", "e.g. pkcs11:token=t;object=model-team")
    token = _find_token(uri)
    where = _describe(token)
    object_id = uri.object_id or os.urandom(8)
    session = _open_session(token, uri, where, read_pin(uri, ask=True), rw=True)
    attr = pkcs11.Attribute
    try:
        with _token_errors(where):
            taken = [*session.get_objects({attr.LABEL: uri.object}), *session.get_objects({attr.ID: object_id})]
            if taken:
                raise KeyFileError(
                    f"{where} already holds an object with that label or id",
                    "choose another object= name; bastion never replaces a key",
                )
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC_EDWARDS, {attr.EC_PARAMS: ED25519_PARAMS}, local=True
            )
            public, _private = params.generate_keypair(
                store=True,
                label=uri.object,
                id=object_id,
                mechanism=pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={attr.TOKEN: True, attr.PRIVATE: False, attr.VERIFY: True},
                private_template={
                    attr.TOKEN: True,
                    attr.PRIVATE: True,
                    attr.SENSITIVE: True,
                    attr.EXTRACTABLE: False,
                    attr.SIGN: True,
                },
            )
            key = _ed25519_from(public, where)
    finally:
        _close_quietly(session)
    log.info("generated an Ed25519 key on %s", where)
    return TokenKey(key, uri.object, object_id)


# -- the token, its session, its objects ------------------------------------------------------------------------
def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise MissingExtraError("a key on a PKCS#11 token (a pkcs11: URI)", "hsm", "python-pkcs11") from None
    return pkcs11


def _module(uri: Pkcs11Uri) -> str:
    path = uri.module_path or os.environ.get(MODULE_ENV)
    if not path:
        raise KeyFileError(f"which PKCS#11 module drives the token of {uri.shown}?", MODULE_HINT)
    if not Path(path).is_file():
        raise KeyFileError(
            f"PKCS#11 module not found: {path}",
            f"install the token's module (softhsm2: apt install softhsm2), or {MODULE_HINT}",
        )
    return path


def _find_token(uri: Pkcs11Uri) -> Any:
    """The one token present that matches every token/slot/library attribute of the URI."""
    pkcs11 = _pkcs11()
    path = _module(uri)
    try:
        lib = pkcs11.lib(path)
    except pkcs11.PKCS11Error as exc:
        raise KeyFileError(f"cannot load the PKCS#11 module {path}: {exc}", MODULE_HINT) from None
    with _token_errors(f"module {path}"):
        initialized = pkcs11.TokenFlag.TOKEN_INITIALIZED  # a free slot's blank token holds no key
        tokens = [t for t in (s.get_token() for s in lib.get_slots(token_present=True)) if t.flags & initialized]
        matching = [t for t in tokens if _matches(uri, lib, t)]
        labels = ", ".join(repr(t.label) for t in tokens) or "none"
    if not matching:
        raise KeyFileError(
            f"no token present matches {uri.shown} (tokens present: {labels})", "plug it in, or fix token="
        )
    if len(matching) > 1:
        raise KeyFileError(f"{len(matching)} tokens match {uri.shown}", "add token=LABEL or serial= to the URI")
    return matching[0]


def _matches(uri: Pkcs11Uri, lib: Any, token: Any) -> bool:
    slot = token.slot
    serial = token.serial.decode("ascii", "replace") if isinstance(token.serial, bytes) else str(token.serial)
    version = "{}.{}".format(*lib.library_version)
    have = {
        "token": token.label,
        "manufacturer": token.manufacturer_id,
        "serial": serial,
        "model": token.model,
        "slot-id": str(slot.slot_id),
        "slot-description": slot.slot_description,
        "slot-manufacturer": slot.manufacturer_id,
        "library-manufacturer": lib.manufacturer_id,
        "library-description": lib.library_description,
        "library-version": version,
    }
    return all(have[name].strip() == value for name, value in uri.path.items() if name in have)


def _open_session(token: Any, uri: Pkcs11Uri, where: str, pin: str | None, rw: bool) -> Any:
    pkcs11 = _pkcs11()
    with _token_errors(where):
        try:
            return token.open(rw=rw, user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:  # this process is logged in already (a second signer on the same token)
            return token.open(rw=rw)


def _template(uri: Pkcs11Uri, kind: str) -> dict:
    pkcs11 = _pkcs11()
    template: dict = {pkcs11.Attribute.CLASS: getattr(pkcs11.ObjectClass, kind)}
    if uri.object is not None:
        template[pkcs11.Attribute.LABEL] = uri.object
    if uri.object_id is not None:
        template[pkcs11.Attribute.ID] = uri.object_id
    return template


def _count(session: Any, uri: Pkcs11Uri, kind: str, where: str) -> int:
    with _token_errors(where):
        return len(list(session.get_objects(_template(uri, kind))))


def _one_object(session: Any, uri: Pkcs11Uri, kind: str, where: str) -> Any:
    pkcs11 = _pkcs11()
    attr = pkcs11.Attribute
    with _token_errors(where):
        found = list(session.get_objects(_template(uri, kind)))
    what = "private key" if kind == "PRIVATE_KEY" else "public key"
    if not found:
        raise KeyFileError(
            f"no {what} {_name(uri)} on {where}",
            "list the token's keys: pkcs11-tool --list-objects, or make one: bastion keys generate --pkcs11 URI",
        )
    if len(found) > 1:
        raise KeyFileError(f"{len(found)} {what}s match {_name(uri)} on {where}", "add id= to the URI")
    with _token_errors(where):
        if found[0][attr.KEY_TYPE] != pkcs11.KeyType.EC_EDWARDS:
            raise KeyFileError(f"{what} {_name(uri)} on {where} is not an Ed25519 key", "bastion signs with Ed25519")
    return found[0]


def _public_beside(session: Any, private: Any, where: str) -> Ed25519PublicKey:
    """The public key object stored with ``private`` (same CKA_ID, else same label): its CKA_EC_POINT."""
    pkcs11 = _pkcs11()
    attr = pkcs11.Attribute
    with _token_errors(where):
        object_id, label = private[attr.ID], private[attr.LABEL]
        template: dict = {attr.CLASS: pkcs11.ObjectClass.PUBLIC_KEY}
        template.update({attr.ID: object_id} if object_id else {attr.LABEL: label})
        found = list(session.get_objects(template))
    if len(found) != 1:
        raise KeyFileError(
            f"{where}: {'no' if not found else len(found)} public key objects beside the private key",
            "bastion reads the public half from the token; store it with the same id",
        )
    return _ed25519_from(found[0], where)


def _ed25519_from(public: Any, where: str) -> Ed25519PublicKey:
    with _token_errors(where):
        point = bytes(public[_pkcs11().Attribute.EC_POINT])
    return ed25519_from_ec_point(point, where)


def ed25519_from_ec_point(point: bytes, where: str) -> Ed25519PublicKey:
    """CKA_EC_POINT of an Ed25519 key: the DER OCTET STRING of its 32 bytes (some tokens give the bare 32)."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise KeyFileError(f"the public key on {where} is not an Ed25519 key ({len(point)}-byte CKA_EC_POINT)")
    return Ed25519PublicKey.from_public_bytes(point)


# -- names, errors ---------------------------------------------------------------------------------------------
def _need_a_name(uri: Pkcs11Uri) -> None:
    if uri.object is None and uri.object_id is None:
        raise KeyFileError(f"{uri.shown} names no key", "add object=LABEL or id=%01 to the URI")


def _name(uri: Pkcs11Uri) -> str:
    parts = [f"'{uri.object}'"] if uri.object is not None else []
    if uri.object_id is not None:
        parts.append(f"id {uri.object_id.hex()}")
    return " ".join(parts)


def _describe(token: Any) -> str:
    label = (token.label or "").strip()
    return f"token '{label}'" if label else f"the token in slot {token.slot.slot_id}"


@contextmanager
def _token_errors(where: str) -> Iterator[None]:
    """Turn what python-pkcs11 raises into one ``KeyFileError`` line naming the token and what to do."""
    pkcs11 = _pkcs11()
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        for cls in type(exc).__mro__:
            if cls.__name__ in _REFUSALS:
                message, hint = _REFUSALS[cls.__name__]
                raise KeyFileError(message.format(where=where), hint) from None
        raise KeyFileError(
            f"{where} refused: {type(exc).__name__} {exc}".strip(), "check the token and repeat"
        ) from None


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception:  # a removed token's session is gone already; closing it again must not mask the real error
        log.debug("closing a PKCS#11 session failed", exc_info=True)
