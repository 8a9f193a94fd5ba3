"""Options that several key, bundle, policy, seal and distill commands share, defined once so their flags and help agree."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from bastion.models.manifest import Markings

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON.")
PASSPHRASE_OPTION = typer.Option(False, "--passphrase", help="Prompt for the key's passphrase.")
KEY_HELP = (
    "Private key file (.key), or a key on a PKCS#11 token: 'pkcs11:token=T;object=K' "
    "(module: ?module-path= or BASTION_PKCS11_MODULE; PIN: ?pin-source=file:/path or BASTION_PKCS11_PIN)."
)
RELEASABLE_TO_HELP = (
    "Nation it may run on (ISO 3166 alpha-3 such as CAN, or a group code such as NATO); repeat for each. "
    "None: every unit."
)
MARKING_HELP = "Free text in your marking system (caveats)."
CLASSIFICATION_HELP = "Classification label signed into the bundle's markings, e.g. SECRET (docs/security.md)."


def markings_from(classification: str | None, releasable_to: list[str], marking: str | None) -> "Markings | None":
    """The signed markings these options ask for (``bundle mark``, ``distill detect|lm``); None when none were
    given. A bad one is a ManifestError in one line, before any work."""
    from bastion.errors import ManifestError

    if classification is None:
        if releasable_to or marking:
            raise ManifestError(
                "--releasable-to and --marking go with a classification", "add --classification, e.g. SECRET"
            )
        return None
    from pydantic import ValidationError

    from bastion.models.manifest import Markings
    from bastion.models.textfiles import first_error

    try:
        return Markings(
            classification=classification, releasable_to=[c.strip().upper() for c in releasable_to], marking=marking
        )
    except ValidationError as exc:
        raise ManifestError(
            f"bad markings: {first_error(exc, 'markings').replace('Value error, ', '')}",
            "a classification of up to 64 printable characters (e.g. SECRET), codes like CAN, GBR or NATO, a marking "
            "of up to 256 printable characters",
        ) from None
