"""Ed25519 keys: generate, store, load, identify.

Private keys are PKCS#8 PEM files (encrypted when a passphrase is given) that
must not be readable by group or others — a key anyone on the box can read is
refused, like OpenSSH does.  Public keys are SubjectPublicKeyInfo PEM files.
A key's id is the first 16 hex digits of the sha256 of its 32 raw bytes.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.errors import KeyFileError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded
from bastion.models.signer import Signer, load_signer, scheme_of

MAX_KEY_FILE_BYTES = 64 * 1024  # an Ed25519 PEM key is ~120 bytes

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
SIGNATURE_BYTES = 64


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(stem: Path, passphrase: bytes | None = None) -> KeyPair:
    """Write ``STEM.key`` (mode 0600) and ``STEM.pub``; never overwrite existing files."""
    stem = Path(stem)
    private_path = stem.with_name(stem.name + PRIVATE_SUFFIX)
    public_path = stem.with_name(stem.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists", "choose another name; bastion never overwrites a key")
    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    atomic_write_bytes(private_path, pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem(key.public_key()))
    return KeyPair(private_path, public_path, key_id(key.public_key()))


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey | Signer:
    """Read a private key; refuse it if group/others can read it or the passphrase is wrong.

    A ``pkcs11:`` URI instead of a path gives a key on a token (models/signer.py), so every command that takes a
    ``--sign`` key file signs with a token key too; ``passphrase`` does not apply to it (its PIN does)."""
    if scheme_of(path) is not None:
        return load_signer(str(path))
    path = Path(path)
    data = read_key_file(path, "private key", "give the .key file bastion keys generate wrote")
    _refuse_a_public_file(path, data)  # before the mode check: chmod 600 on a .pub would fix nothing
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o})",
            f"run: chmod 600 {path}",
        )
    if not passphrase and is_encrypted_pem(data):
        passphrase = _ask_for_passphrase(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise KeyFileError(f"private key {path} is not encrypted, but a passphrase was given") from None
        raise KeyFileError(f"private key {path} is encrypted", "set BASTION_KEY_PASSPHRASE") from None
    except ValueError:
        if passphrase:
            raise KeyFileError(f"wrong passphrase for private key {path}") from None
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key", "generate one with: bastion keys generate")
    return key


def _refuse_a_public_file(path: Path, data: bytes) -> None:
    """A ``.pub`` or a CurveZMQ certificate given where a signing key belongs: say which file to give instead."""
    head = data[:400]
    if b"-----BEGIN PUBLIC KEY-----" in head and b"PRIVATE KEY-----" not in data:
        raise KeyFileError(
            f"{path} is a public key: it verifies, it cannot sign",
            f"sign with its private half ({path.with_suffix('.key').name}, from bastion keys generate) "
            "or a pkcs11: URI",
        )
    if b"public-key" in head and b"curve" in head:
        raise KeyFileError(
            f"{path} is a CurveZMQ certificate (bastion node keygen), not a signing key",
            "sign with a key from bastion keys generate (NAME.key) or a pkcs11: URI",
        )


def is_encrypted_pem(data: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data[:200]


def _ask_for_passphrase(path: Path) -> bytes:
    """Prompt on the terminal (hidden); with no terminal, say the one way left: BASTION_KEY_PASSPHRASE.

    Why here and not in each command: every command that signs (bundle create/sign, distill, quantize) reads its
    key through this function, and `keys generate --passphrase` then `bundle create --sign` must just work.
    """
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise KeyFileError(
            f"private key {path} is encrypted and there is no terminal to ask for its passphrase",
            "set BASTION_KEY_PASSPHRASE",
        )
    try:
        value = getpass.getpass(f"passphrase for {path}: ")
    except (EOFError, KeyboardInterrupt):
        value = ""
    if not value:
        raise KeyFileError(
            f"private key {path} is encrypted and no passphrase was given",
            "type it at the prompt or set BASTION_KEY_PASSPHRASE",
        )
    return value.encode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file: a regular file of at most ``MAX_KEY_FILE_BYTES`` (``/dev/zero`` or a FIFO given as
    ``--key`` would otherwise be read forever)."""
    return parse_public_key(read_key_file(path, "public key", "give the .pub file"), str(path))


def read_key_file(path: Path, what: str, hint: str) -> bytes:
    """The bytes of a key file, read bounded: a regular file of at most ``MAX_KEY_FILE_BYTES`` (``/dev/zero`` or a
    FIFO given as a key would otherwise be read forever); every refusal is one ``KeyFileError`` naming ``what``."""
    try:
        return read_bounded(path, MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise KeyFileError(f"{what} not found: {path}") from None
    except (TooLarge, NotRegular):
        raise KeyFileError(
            f"{path} is not a {what} file (a PEM key is under {MAX_KEY_FILE_BYTES} bytes)", hint
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def parse_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{where} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where} is not an Ed25519 public key")
    return key


def verify_signature(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
        return True
    except InvalidSignature:
        return False


def passphrase_from_env() -> bytes | None:
    value = os.environ.get("BASTION_KEY_PASSPHRASE")
    return value.encode() if value else None


def read_passphrase(ask: bool, confirm: bool = False) -> bytes | None:
    """From ``BASTION_KEY_PASSPHRASE``, else a hidden prompt when ``ask`` (the CLI's --passphrase)."""
    env = passphrase_from_env()
    if env or not ask:
        return env
    if not (sys.stdin.isatty() and sys.stderr.isatty()):  # getpass would read stdin, echoing, and abort on EOF
        raise KeyFileError("--passphrase needs a terminal to ask on", "set BASTION_KEY_PASSPHRASE")
    try:
        first = getpass.getpass("passphrase: ")
        if confirm and getpass.getpass("again: ") != first:
            raise KeyFileError("the two passphrases differ")
    except (EOFError, KeyboardInterrupt):
        raise KeyFileError("no passphrase given") from None
    return first.encode() or None
