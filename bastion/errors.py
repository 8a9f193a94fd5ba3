"""Exceptions that carry a message a person in the field can act on.

Every error a user can cause (a wrong path, a corrupt model, a bad flag) is a
``BastionError``: the CLI prints its one-line message and exits 1, with no
traceback.  Anything else is a bug and exits 2.  Raise where the problem is
detected; say *what is wrong* and *what to do* in the message.
"""

from __future__ import annotations


class BastionError(Exception):
    """A problem the user can fix. ``str(err)`` is the whole message."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} — {hint}" if hint else message)


class InputNotFoundError(BastionError):
    """A path the user named does not exist or holds nothing usable."""


class ImageReadError(BastionError):
    """An image or video could not be decoded."""


class ModelLoadError(BastionError):
    """A model file is missing, truncated or not a model bastion can run."""


class ManifestError(ModelLoadError):
    """A bundle's manifest.json is missing, malformed or of an unknown schema."""


class SignatureError(ModelLoadError):
    """A bundle's signature is missing, malformed, untrusted, revoked or does not match."""


class KeyFileError(BastionError):
    """A key file is missing, unreadable, too open, or its passphrase is wrong."""


class RegistryError(BastionError):
    """The local model registry cannot complete an operation (it is left unchanged)."""


class ArchiveError(ModelLoadError):
    """A ``.bastion`` archive is malformed or tries to write outside its directory."""


class DecoderError(ModelLoadError):
    """The model's outputs match no registered output decoder."""


class ShapeError(BastionError):
    """An input tensor or image has a shape the model cannot take."""


class ConfigError(BastionError):
    """A command-line option or configuration value is invalid."""


class MissingExtraError(BastionError):
    """A feature needs an optional dependency group that is not installed."""

    def __init__(self, feature: str, extra: str, package: str, alternative: str = "") -> None:
        super().__init__(
            f"{feature} needs the '{package}' package, which is not installed",
            f"install it with: pip install 'bastion[{extra}]'" + (f" {alternative}" if alternative else ""),
        )
