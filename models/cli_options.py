"""Options that several key, bundle, policy and seal commands share, defined once so their flags and help agree."""

from __future__ import annotations

import typer

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON.")
PASSPHRASE_OPTION = typer.Option(False, "--passphrase", help="Prompt for the key's passphrase.")
KEY_HELP = (
    "Private key file (.key), or a key on a PKCS#11 token: 'pkcs11:token=T;object=K' "
    "(module: ?module-path= or BASTION_PKCS11_MODULE; PIN: ?pin-source=file:/path or BASTION_PKCS11_PIN)."
)
