"""Where a signing key lives: one ``Signer`` protocol, implementations chosen by the reference's scheme.

Why a protocol rather than a key object: a key on a PKCS#11 token cannot be handed around as bytes, only asked to
sign.  Everything that signs (bundle sign/countersign, policy sign, bundle create, distill) needs just
``sign(data) -> bytes`` (an Ed25519 signature) and ``public_key()``; ``cryptography``'s ``Ed25519PrivateKey``
already has exactly that shape, so a file key *is* a Signer and the code that signed with file keys signs with a
token key unchanged.

A reference (``--key``/``--sign``) is a PEM file path, or a URI whose scheme is registered here (``pkcs11:``, RFC
7512).  A scheme's module is imported only when a reference uses it: the field path never loads python-pkcs11.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import KeyFileError


@runtime_checkable
class Signer(Protocol):
    """An Ed25519 private key, wherever it lives."""

    def sign(self, data: bytes) -> bytes: ...

    def public_key(self) -> Ed25519PublicKey: ...


def _pkcs11_signer(reference: str, passphrase: bool) -> Signer:
    if passphrase:
        raise KeyFileError(
            "--passphrase is for key files; a key on a token is unlocked by its PIN",
            "drop --passphrase; give the PIN in BASTION_PKCS11_PIN or the URI's pin-source",
        )
    from bastion.models.pkcs11_key import open_token_signer

    return open_token_signer(reference)


def _pkcs11_public(reference: str) -> Ed25519PublicKey:
    from bastion.models.pkcs11_key import token_public_key

    return token_public_key(reference)


# scheme → (open a signer, read the public key); a reference with no registered scheme is a key file
SCHEMES: dict[str, tuple[Callable[[str, bool], Signer], Callable[[str], Ed25519PublicKey]]] = {
    "pkcs11": (_pkcs11_signer, _pkcs11_public),
}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def scheme_of(reference: str | Path) -> str | None:
    """The registered scheme a key reference uses, or None for a key file (even one whose name holds a colon)."""
    match = _SCHEME.match(str(reference))
    scheme = match.group(1).lower() if match else None
    return scheme if scheme in SCHEMES else None


def load_signer(reference: str | Path, passphrase: bool = False) -> Signer:
    """The key ``reference`` names, ready to sign: a token key (PIN from the URI, env or a prompt) or a PEM file
    (passphrase from BASTION_KEY_PASSPHRASE, or asked when ``passphrase``)."""
    scheme = scheme_of(reference)
    if scheme is not None:
        return SCHEMES[scheme][0](str(reference), passphrase)
    from bastion.models.keys import load_private_key, read_passphrase

    return load_private_key(Path(reference), read_passphrase(passphrase))


def load_public(reference: str | Path) -> Ed25519PublicKey:
    """The public half of a key reference: read from the token for a URI; from the private key file (asking for
    its passphrase as a signing command would) or a ``.pub`` file otherwise."""
    scheme = scheme_of(reference)
    if scheme is not None:
        return SCHEMES[scheme][1](str(reference))
    from bastion.models.keys import (
        is_encrypted_pem,
        load_private_key,
        load_public_key,
        passphrase_from_env,
        read_key_file,
    )

    path = Path(reference)
    data = read_key_file(path, "key", "give a .key or .pub file, or a pkcs11: URI")
    if b"PRIVATE KEY-----" in data[:200] or is_encrypted_pem(data):
        return load_private_key(path, passphrase_from_env()).public_key()
    return load_public_key(path)
