"""CLI commands for signing keys and the trust store: ``bastion keys``."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from bastion.console import out, print_json, warn
from bastion.models.cli_options import JSON_OPTION
from bastion.models.keys import read_passphrase

keys_app = typer.Typer(help="Signing keys and the trust store.", no_args_is_help=True)


# -- keys ---------------------------------------------------------------------------------------------
@keys_app.command("generate")
def keys_generate(
    out_stem: Path = typer.Option(..., "--out", help="Path without suffix: writes OUT.key (0600) and OUT.pub."),
    passphrase: bool = typer.Option(
        False, "--passphrase", help="Encrypt the private key (prompted, or BASTION_KEY_PASSPHRASE)."
    ),
    trust: bool = typer.Option(
        True,
        "--trust/--no-trust",
        help="Trust the new key on this machine too, so the "
        "maker can verify, pack and run what it signs (recorded in trust/audit.jsonl).",
    ),
    pkcs11: str = typer.Option(
        None,
        "--pkcs11",
        help="Generate the key ON this PKCS#11 token instead (pkcs11:token=T;object=NEW-LABEL…): the private key "
        "never leaves it; only OUT.pub is written.",
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Generate an Ed25519 signing key pair (and trust it here: you made it).

    Example: bastion keys generate --out ~/keys/model-team --passphrase

    On a token: BASTION_PKCS11_PIN=… bastion keys generate --out model-team --pkcs11
    'pkcs11:token=bastion;object=model-team?module-path=/usr/lib/softhsm/libsofthsm2.so'
    """
    import logging

    from bastion.models.keys import generate_keypair
    from bastion.models.trust import TrustStore

    if pkcs11 is not None:
        _generate_on_token(out_stem, pkcs11, passphrase, trust, json_out)
        return
    pair = generate_keypair(out_stem, read_passphrase(passphrase, confirm=True))
    if trust:
        TrustStore().trust(pair.public_path)
        logging.getLogger(__name__).info("trusted the key just generated here: %s", pair.key_id)
    if json_out:
        print_json(
            {
                "key_id": pair.key_id,
                "private": str(pair.private_path),
                "public": str(pair.public_path),
                "trusted_here": trust,
            }
        )
        return
    out.print(f"key {pair.key_id}: private {pair.private_path} (mode 0600), public {pair.public_path}")
    if trust:
        out.print("trusted on this machine (bastion keys revoke to undo)")
    out.print(f"units that should run your bundles: bastion keys trust {pair.public_path}")


def _generate_on_token(out_stem: Path, uri: str, passphrase: bool, trust: bool, json_out: bool) -> None:
    """`keys generate --pkcs11`: the pair is made on the token; only its public half is written (OUT.pub)."""
    from bastion.errors import KeyFileError
    from bastion.models.atomic import atomic_write_bytes
    from bastion.models.keys import PUBLIC_SUFFIX, key_id, public_pem
    from bastion.models.pkcs11_key import generate_on_token
    from bastion.models.pkcs11_uri import redact
    from bastion.models.signer import scheme_of
    from bastion.models.trust import TrustStore

    if scheme_of(uri) != "pkcs11":
        raise KeyFileError(f"--pkcs11 takes a pkcs11: URI, not {redact(uri)!r}", "e.g. pkcs11:token=T;object=LABEL")
    if passphrase:
        raise KeyFileError("--passphrase is for key files; a key on a token is protected by the token's PIN")
    public_path = out_stem.with_name(out_stem.name + PUBLIC_SUFFIX)
    if public_path.exists():
        raise KeyFileError(f"{public_path} already exists", "choose another name; bastion never overwrites a key")
    made = generate_on_token(uri)
    atomic_write_bytes(public_path, public_pem(made.public))
    kid = key_id(made.public)
    if trust:
        TrustStore().trust(public_path)
    if json_out:
        print_json(
            {
                "key_id": kid,
                "token_label": made.label,
                "token_id": made.object_id.hex(),
                "public": str(public_path),
                "trusted_here": trust,
            }
        )
        return
    out.print(
        f"key {kid} generated on the token (object {made.label!r}, id {made.object_id.hex()}); public {public_path}"
    )
    if trust:
        out.print("trusted on this machine (bastion keys revoke to undo)")
    out.print(
        f"sign with: --sign '{redact(uri)}'; units that should run your bundles: bastion keys trust {public_path}"
    )


@keys_app.command("export")
def keys_export(
    key: str = typer.Argument(..., help="A private key file (.key) or a pkcs11: URI of a key on a token."),
    out_path: Path = typer.Option(..., "--out", help="Where to write the public key (.pub); never overwritten."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write the public half of a signing key (PEM), for trust stores and policies: bastion keys trust OUT.

    For a token key the public key is read from the token; its private key never leaves it.

    Example: bastion keys export 'pkcs11:token=bastion;object=model-team' --out model-team.pub
    """
    from bastion.errors import KeyFileError
    from bastion.models.atomic import atomic_write_bytes
    from bastion.models.keys import key_id, public_pem
    from bastion.models.signer import load_public

    if out_path.exists():
        raise KeyFileError(f"{out_path} already exists", "choose another name; bastion never overwrites a key")
    public = load_public(key)
    atomic_write_bytes(out_path, public_pem(public))
    if json_out:
        print_json({"key_id": key_id(public), "public": str(out_path)})
        return
    out.print(f"wrote {out_path} (key {key_id(public)})")


@keys_app.command("trust")
def keys_trust(public_key: Path = typer.Argument(..., help="A .pub file from `bastion keys generate`.")) -> None:
    """Trust bundles signed by this public key on this unit.

    Example: bastion keys trust model-team.pub
    """
    from bastion.models.trust import TrustStore

    out.print(f"trusted key {TrustStore().trust(public_key)}")


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="Key id (or a unique prefix), built-in anchors included."),
    reason: str = typer.Option("", help="Why, for the record."),
) -> None:
    """Stop trusting a key; bundles it signed are refused from now on.

    Example: bastion keys revoke ff0662541e0e050a --reason "replaced by national key"
    """
    from bastion.models.trust import TrustStore

    out.print(f"revoked key {TrustStore().revoke(key, reason)}")


@keys_app.command("unrevoke")
def keys_unrevoke(
    key: str = typer.Argument(..., help="A revoked key id (or a unique prefix)."),
    yes: bool = typer.Option(False, "--yes", help="Confirm: bundles this key signed are trusted again."),
) -> None:
    """Lift one revocation on purpose (recorded in trust/audit.jsonl).

    Editing revoked.json by hand does not do it: a list that lacks a key the journal says is revoked is refused.

    Example: bastion keys unrevoke 0b0bf72f --yes
    """
    from bastion.errors import ConfigError
    from bastion.models.trust import TrustStore

    if not yes:
        raise ConfigError("un-revoking trusts every bundle this key signed again", "repeat with --yes if that is meant")
    out.print(f"revocation of key {TrustStore().unrevoke(key)} lifted")


@keys_app.command("reset-revocations")
def keys_reset_revocations(
    yes: bool = typer.Option(False, "--yes", help="Confirm: every revocation the lost list held is gone."),
) -> None:
    """Start an empty revocation list after trust/revoked.json was lost (recorded in trust/audit.jsonl).

    Until then this unit refuses every bundle: a deleted list must not silently lift the revocations it held.
    Restore the list from backup if you can; otherwise reset it and revoke again what was revoked.

    Example: bastion keys reset-revocations --yes && bastion keys revoke ff0662541e0e050a
    """
    from bastion.errors import ConfigError
    from bastion.models.trust import TrustStore

    if not yes:
        raise ConfigError(
            "resetting the revocation list forgets every key it revoked",
            "restore trust/revoked.json from backup if you can; otherwise repeat with --yes",
        )
    store = TrustStore()
    store.reset_revocations()
    out.print(
        f"started an empty revocation list at {store.revoked_path}; revoke again the keys it held "
        "(bastion keys revoke ID)"
    )


@keys_app.command("list")
def keys_list(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the keys this unit trusts (and those it revoked).

    Example: bastion keys list --json
    """
    from bastion.models.trust import TrustStore

    store = TrustStore()
    rows = [
        {"key_id": k.key_id, "source": k.source, "revoked": k.revoked, "path": str(k.path)}
        for k in store.keys().values()
    ]
    if json_out:
        print_json({"keys": rows, "revoked": store.revoked()})
        return
    table = Table(show_edge=False)
    for col in ("key id", "source", "status", "file"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key_id"], r["source"], "[red]revoked[/]" if r["revoked"] else "trusted", r["path"])
    out.print(table)


# -- this unit's key (bundles sealed to it) -----------------------------------------------------------
@keys_app.command("unit-init")
def keys_unit_init(
    passphrase: bool = typer.Option(False, "--passphrase", help="Encrypt the unit key (prompted)."),
    passphrase_file: Path = typer.Option(None, "--passphrase-file", help="Encrypt it with the passphrase in FILE."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Create this unit's X25519 key (BASTION_HOME/unit/unit.key, mode 0600): what opens bundles sealed to it.

    Example: bastion keys unit-init --passphrase-file /run/keys/unit-pass && bastion keys unit-export --out unit.pub
    """
    from bastion.models.safe_read import read_bounded
    from bastion.models.unit_key import (
        PASSPHRASE_ENV,
        PASSPHRASE_FILE_ENV,
        home_key_path,
        init_unit_key,
        unit_passphrase,
    )

    if passphrase_file is not None:
        try:
            secret = read_bounded(passphrase_file, 1024).rstrip(b"\r\n") or None
        except OSError as exc:
            from bastion.errors import KeyFileError

            raise KeyFileError(f"cannot read the passphrase file {passphrase_file}: {exc}") from None
    elif passphrase:
        secret = read_passphrase(passphrase, confirm=True)
    elif os.environ.get(PASSPHRASE_FILE_ENV) or os.environ.get(PASSPHRASE_ENV):
        # the passphrase the unit will be opened with is already set: a key left in clear beside it would be the
        # opposite of what the soldier who set it meant (it used to be, silently)
        secret = unit_passphrase(home_key_path())
    else:
        secret = None
    unit = init_unit_key(secret)
    if secret is None:
        warn(
            "the unit key is not passphrase-protected: whoever reads this disk opens every bundle sealed to it — "
            "unless BASTION_HOME is on LUKS, delete unit/unit.key now (nothing is sealed to it yet) and run "
            "bastion keys unit-init --passphrase-file FILE (docs/security.md)"
        )
    if json_out:
        print_json({"key_id": unit.key_id, "path": str(unit.path), "encrypted": secret is not None})
        return
    out.print(f"unit key {unit.key_id}: {unit.path} (mode 0600{', passphrase-protected' if secret else ''})")
    out.print("give the model team its public half: bastion keys unit-export --out unit.pub")


@keys_app.command("unit-export")
def keys_unit_export(
    out_path: Path = typer.Option(Path("unit.pub"), "--out", help="Where to write the public key."),
) -> None:
    """Write this unit's public unit key, for the model team to seal bundles to (bastion bundle seal --to).

    Example: bastion keys unit-export --out /media/usb/alpha.pub
    """
    from bastion.errors import KeyFileError
    from bastion.models.atomic import atomic_write_bytes
    from bastion.models.unit_key import home_key_path, load_unit_key, load_unit_public, unit_public_pem

    public = home_key_path().with_suffix(".pub")
    if public.is_file():
        data = unit_public_pem(load_unit_public(public))
    else:  # a credential-only unit: derive it from the private key
        unit = load_unit_key()
        if unit is None:
            raise KeyFileError("this unit has no unit key", "make one: bastion keys unit-init")
        data = unit_public_pem(unit.private.public_key())
    atomic_write_bytes(out_path, data)
    out.print(f"wrote {out_path}")
