"""``bastion bundle seal``: a bundle only the named units can run (``bastion.models.seal``)."""

from __future__ import annotations

from pathlib import Path

import typer

from bastion.console import out, print_json
from bastion.models.cli_options import JSON_OPTION, KEY_HELP


def bundle_seal(
    bundle: str = typer.Argument(..., help="The clear bundle: directory, .bastion file, registry or zoo name."),
    to: list[Path] = typer.Option(..., "--to", help="A unit's unit.pub (bastion keys unit-export); repeat per unit."),
    out_dir: Path = typer.Option(..., "--out", help="New directory for the sealed bundle (never overwritten)."),
    sign: str = typer.Option(None, "--sign", help="Sign the sealed bundle with this key. " + KEY_HELP),
    passphrase: bool = typer.Option(False, "--passphrase", help="Prompt for the signing key's passphrase."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Seal a clear bundle that is not signed."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Encrypt a bundle's model files so that only the named units can load them; sign the sealed bundle.

    Signatures cover the sealed bundle: partners verify and countersign it without decrypting. Each unit decrypts
    into memory only. The clear bundle is verified first and left as it is.

    Example: bastion bundle seal vehicles-1.0/ --to alpha.pub --to bravo.pub --out vehicles-1.0-sealed --sign team.key
    """
    from bastion.models.bundle import Bundle, seal_bundle, staged_bundle
    from bastion.models.signer import load_signer
    from bastion.models.seal import seal_into
    from bastion.models.unit_key import load_unit_public, unit_key_id

    key = load_signer(sign, passphrase) if sign else None
    units = [(path.stem[:64] or None, load_unit_public(path)) for path in to]
    source = Bundle.open(bundle, allow_unsigned=allow_unsigned)
    with staged_bundle(out_dir) as staging:
        manifest = seal_into(source, units, staging)
        seal_bundle(staging, manifest, out_dir, sign_key=key)
    ids = [unit_key_id(u) for _, u in units]
    if json_out:
        print_json(
            {
                "out": str(out_dir),
                "sha256": manifest.sha256(),
                "recipients": ids,
                "sealed_files": manifest.sealed.files if manifest.sealed else [],
                "signed": key is not None,
            }
        )
        return
    out.print(f"sealed {manifest.name}:{manifest.version} to {len(ids)} unit(s) ({', '.join(ids)}) in {out_dir}")
    if key is None:
        out.print(f"not signed yet: bastion bundle sign {out_dir} --key KEY")
