"""This unit's X25519 key: what opens bundles sealed to it (``bastion.models.seal``).

The private key lives in ``BASTION_HOME/unit/unit.key`` (PKCS#8 PEM, mode 0600, encrypted when a passphrase
is given), or — under systemd — in the credential ``bastion-unit.key`` of ``$CREDENTIALS_DIRECTORY``
(``LoadCredentialEncrypted=``), which then wins.  Its public half, ``unit.pub``, goes to the model team, who
seal bundles to it.  A passphrase is read from the credential ``bastion-unit-passphrase``, the file named by
``BASTION_UNIT_PASSPHRASE_FILE``, ``BASTION_UNIT_PASSPHRASE``, or a hidden prompt on a terminal.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bastion.errors import ConfigError, KeyFileError
from bastion.models.atomic import atomic_write_bytes
from bastion.models.home import bastion_home
from bastion.models.keys import is_encrypted_pem
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded

UNIT_KEY_NAME = "unit.key"
KEY_CREDENTIAL = "bastion-unit.key"
PASSPHRASE_CREDENTIAL = "bastion-unit-passphrase"
PASSPHRASE_FILE_ENV = "BASTION_UNIT_PASSPHRASE_FILE"
PASSPHRASE_ENV = "BASTION_UNIT_PASSPHRASE"
MAX_KEY_BYTES = 4096  # a PEM X25519 key is ~120 bytes, ~300 encrypted


def unit_key_id(public: X25519PublicKey) -> str:
    """16 hex digits of the sha256 of the raw public key (as signing keys' ids)."""
    return hashlib.sha256(raw_unit_public(public)).hexdigest()[:16]


def raw_unit_public(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def home_key_path() -> Path:
    return bastion_home() / "unit" / UNIT_KEY_NAME


def unit_key_path() -> Path | None:
    """The systemd credential when one is passed, else the key under BASTION_HOME; None when neither exists."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / KEY_CREDENTIAL).is_file():
        return Path(creds) / KEY_CREDENTIAL
    path = home_key_path()
    return path if path.is_file() else None


@dataclass(frozen=True)
class UnitKey:
    path: Path
    key_id: str
    private: X25519PrivateKey


def init_unit_key(passphrase: bytes | None) -> UnitKey:
    """Create this unit's key under BASTION_HOME (0600); refuse to replace one (bundles sealed to it would die)."""
    path = home_key_path()
    if path.exists():
        raise ConfigError(
            f"this unit already has a unit key ({path})",
            "bundles sealed to it need it; export its public half: bastion keys unit-export --out unit.pub",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    private = X25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    atomic_write_bytes(path, pem, mode=0o600)
    atomic_write_bytes(path.with_suffix(".pub"), unit_public_pem(private.public_key()))  # id without a passphrase
    return UnitKey(path, unit_key_id(private.public_key()), private)


def load_unit_key() -> UnitKey | None:
    """This unit's key, or None when it has none; a damaged, exposed or locked key is a KeyFileError."""
    path = unit_key_path()
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
        data = read_bounded(path, MAX_KEY_BYTES)
    except (TooLarge, NotRegular):
        raise KeyFileError(f"{path} is not a unit key file", "make one: bastion keys unit-init") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the unit key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the unit key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o})", f"chmod 600 {path}"
        )
    encrypted = is_encrypted_pem(data)
    passphrase = unit_passphrase(path) if encrypted else None
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"the unit key {path} does not open" + (" (wrong passphrase)" if encrypted else " (not a PEM key)"),
            f"give its passphrase in {PASSPHRASE_FILE_ENV} or the {PASSPHRASE_CREDENTIAL} credential",
        ) from None
    if not isinstance(private, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 unit key", "make one: bastion keys unit-init")
    return UnitKey(path, unit_key_id(private.public_key()), private)


def this_unit_id() -> str | None:
    """This unit's key id for display, never asking a passphrase: the public half kept beside the key under
    BASTION_HOME, or a systemd credential's own public key when it is not encrypted."""
    path = unit_key_path()
    if path is None:
        return None
    try:
        if path == home_key_path():
            return unit_key_id(load_unit_public(path.with_suffix(".pub")))
        if is_encrypted_pem(read_bounded(path, MAX_KEY_BYTES)):
            return "locked credential"
        unit = load_unit_key()
        return unit.key_id if unit else None
    except (KeyFileError, OSError):
        return "unreadable"


def unit_passphrase(path: Path) -> bytes:
    """The unit key's passphrase: systemd credential, a file, the environment, or a hidden prompt on a terminal."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    candidates = [Path(creds) / PASSPHRASE_CREDENTIAL] if creds else []
    if os.environ.get(PASSPHRASE_FILE_ENV):
        candidates.append(Path(os.environ[PASSPHRASE_FILE_ENV]))
    for file in candidates:
        if file.is_file():
            try:
                value = read_bounded(file, 1024).rstrip(b"\r\n")
            except OSError as exc:
                raise KeyFileError(f"cannot read the unit key passphrase file {file}: {exc}") from None
            if value:
                return value
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            value = getpass.getpass(f"passphrase for the unit key {path}: ").encode()
        except (EOFError, KeyboardInterrupt):
            value = b""
        if value:
            return value
    raise KeyFileError(
        f"the unit key {path} is encrypted and no passphrase was given",
        f"set {PASSPHRASE_FILE_ENV}=FILE or pass the {PASSPHRASE_CREDENTIAL} systemd credential",
    )


def unit_public_pem(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_unit_public(path: Path) -> X25519PublicKey:
    """A ``unit.pub`` from ``bastion keys unit-export``: bounded, and an X25519 key (not a signing key)."""
    path = Path(path)
    try:
        data = read_bounded(path, MAX_KEY_BYTES)
    except FileNotFoundError:
        raise KeyFileError(f"unit public key not found: {path}") from None
    except (OSError, TooLarge, NotRegular):
        raise KeyFileError(f"{path} is not a unit public key file", "ask the unit for its unit.pub") from None
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a PEM public key", "the unit writes it: bastion keys unit-export") from None
    if not isinstance(public, X25519PublicKey):
        raise KeyFileError(
            f"{path} is not a unit key (X25519); a signing key cannot receive sealed bundles",
            "the unit writes its unit.pub with: bastion keys unit-export --out unit.pub",
        )
    return public
