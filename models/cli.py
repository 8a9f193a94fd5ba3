"""CLI commands for what a model is: ``bastion keys``, ``bastion bundle``, ``bastion models``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from bastion.console import out, print_json
from bastion.models.keys import read_passphrase

keys_app = typer.Typer(help="Signing keys and the trust store.", no_args_is_help=True)
bundle_app = typer.Typer(help="Create, sign, verify, inspect and pack model bundles.", no_args_is_help=True)
models_app = typer.Typer(help="The local model registry under BASTION_HOME.", no_args_is_help=True)

ALLOW_UNSIGNED_HELP = "DEVELOPMENT ONLY: run a bundle that is unsigned or fails verification (warned every time)."


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
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Generate an Ed25519 signing key pair (and trust it here: you made it).

    Example: bastion keys generate --out ~/keys/model-team --passphrase
    """
    import logging

    from bastion.models.keys import generate_keypair
    from bastion.models.trust import TrustStore

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


# -- bundle -------------------------------------------------------------------------------------------
@bundle_app.command("sign")
def bundle_sign(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    key: Path = typer.Option(..., "--key", help="Private key file (.key)."),
    passphrase: bool = typer.Option(False, "--passphrase", help="Prompt for the key's passphrase."),
) -> None:
    """Sign a bundle directory (its payload is checked first).

    Example: bastion bundle sign runs/distill/person-vehicle/bundle --key ~/keys/model-team.key
    """
    from bastion.models.bundle import resolve_bundle_dir, verify_files
    from bastion.models.keys import load_private_key
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.signing import sign_manifest

    root = resolve_bundle_dir(bundle)
    manifest = read_manifest(root / MANIFEST_NAME)
    verify_files(root, manifest)
    record = sign_manifest(root, manifest, load_private_key(key, read_passphrase(passphrase)))
    out.print(f"signed {manifest.name}:{manifest.version} ({manifest.sha256()[:16]}) with key {record.key_id}")


@bundle_app.command("verify")
def bundle_verify(
    bundle: str = typer.Argument(..., help="Bundle directory, .bastion file, registry or zoo name."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify payload hashes and the signature against this unit's trust store (exit 1 if refused).

    Example: bastion bundle verify yolov5n
    """
    from bastion.models.bundle import Bundle

    b = Bundle.open(bundle)
    if json_out:
        print_json(
            {
                "ok": True,
                "name": b.manifest.name,
                "version": b.manifest.version,
                "sha256": b.sha256,
                "key_id": b.verification.key_id,
                "key_source": b.verification.key_source,
            }
        )
        return
    out.print(f"{b.manifest.name}:{b.manifest.version} {b.sha256[:16]}: {b.verification.summary}")


@bundle_app.command("inspect")
def bundle_inspect(
    bundle: str = typer.Argument(..., help="Bundle directory, .bastion file, registry or zoo name."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """Show what a bundle is: task, classes, files, provenance, licenses, metrics, signer, verification.

    Example: bastion bundle inspect yolov5n
    """
    from bastion.models.bundle import Bundle

    report = Bundle.inspect(bundle)
    manifest, status, signer = report.manifest, report.status, report.signer_key_id
    runs = _int8_runs(manifest)  # an INT8 bundle: which precision runs where, and why
    if json_out:
        print_json(
            {
                "manifest": manifest.model_dump(mode="json"),
                "sha256": manifest.sha256(),
                "path": str(report.root),
                "signer_key_id": signer,
                "verified": report.verified,
                "status": status,
                "runs": runs,
            }
        )
        return
    size = sum(f.size for f in manifest.files)
    table = Table(show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("bundle", f"{manifest.name}:{manifest.version}  (sha256 {manifest.sha256()[:16]}…)"),
        ("verification", status),
        ("signer key", signer or "none"),
        ("task", manifest.task),
        ("precision", manifest.precision),
        ("decoder", manifest.decoder.type if manifest.decoder else "-"),
        (
            "input",
            (
                f"{manifest.input.name} {manifest.input.size[0]}x{manifest.input.size[1]} "
                f"{manifest.input.color} {manifest.input.layout} {manifest.input.resize}"
                + (" dynamic" if manifest.input.dynamic_hw else "")
            )
            if manifest.input
            else "-",
        ),
        (
            "classes",
            f"{len(manifest.classes)}: "
            + ", ".join(manifest.classes[:12])
            + (", …" if len(manifest.classes) > 12 else ""),
        ),
        (
            "files",
            "\n".join(f"{f.path}  {f.size:,} B  {f.role}  {f.sha256[:12]}…" for f in manifest.files)
            + f"\n(total {size / 1e6:.1f} MB)",
        ),
        ("source", manifest.provenance.source),
        ("teachers", ", ".join(t[:16] for t in manifest.provenance.teachers) or "-"),
        (
            "datasets",
            "\n".join(
                f"{d.name} ({d.license or 'license ?'})" + (f" sha256 {d.sha256[:12]}…" if d.sha256 else "")
                for d in manifest.provenance.datasets
            )
            or "-",
        ),
        ("command", manifest.provenance.command or "-"),
        ("made by", f"bastion {manifest.provenance.bastion_version or '?'} at {manifest.provenance.created or '?'}"),
        (
            "license",
            f"weights: {manifest.license.weights}; data: {manifest.license.data or '-'}"
            + (f"\n{manifest.license.notes}" if manifest.license.notes else ""),
        ),
        ("metrics", "\n".join(f"{e.metric} = {e.value:.3f} on {e.dataset}" for e in manifest.evaluation) or "-"),
        *([("int8 verdict", manifest.int8_verdict.summary())] if manifest.int8_verdict else []),
        *([("runs", runs)] if runs else []),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _int8_runs(manifest) -> str | None:
    """Which precision an INT8 bundle runs on which CPU class, and why (the unit decides at load:
    bastion.runtime.int8_check; `bastion doctor` shows this CPU's class)."""
    if manifest.precision != "int8":
        return None
    verdict, sibling = manifest.int8_verdict, manifest.fp32_sibling_file()
    where = f"INT8 on {', '.join(verdict.holds_on)} (the gate's verdict holds there)" if verdict else "INT8"
    elsewhere = "elsewhere" if verdict else "this bundle records no verdict, so on every CPU"
    strict = f"runs the FP32 sibling {sibling.path}" if sibling else "refuses it (no FP32 sibling in the bundle)"
    return f"{where}; {elsewhere} int8_policy warn runs INT8 with a warning, strict {strict}"


@bundle_app.command("pack")
def bundle_pack(
    bundle: str = typer.Argument(..., help="Bundle directory, registry or zoo name."),
    out_path: Path = typer.Option(Path("."), "--out", help="File or directory for NAME-VERSION.bastion."),
) -> None:
    """Pack a verified bundle into one NAME-VERSION.bastion file for carrying between units.

    Example: bastion bundle pack yolov5n --out /media/usb/
    """
    from bastion.models.archive import pack
    from bastion.models.bundle import Bundle

    b = Bundle.open(bundle)
    out.print(f"wrote {pack(b.root, out_path)}")


# -- models (registry) --------------------------------------------------------------------------------
@models_app.command("add")
def models_add(
    bundle: Path = typer.Argument(..., help="Bundle directory or .bastion file."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    allow_downgrade: bool = typer.Option(
        False,
        "--allow-downgrade",
        help="Add a version older than one already in the registry (recorded; the bare name still means the highest).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the entry as JSON."),
) -> None:
    """Verify a bundle and store it in the local registry (content-addressed).

    A bare NAME always resolves to its highest version; adding an older version than one already present
    is refused unless --allow-downgrade is given, and is then recorded in the registry's audit.jsonl.

    Example: bastion models add person-vehicle-1.0.bastion
    """
    import sys
    from functools import partial

    from bastion.models.bundle import Bundle
    from bastion.models.registry import Registry
    from bastion.models.version import is_older

    registry = Registry()
    entry = registry.add(bundle, partial(Bundle.open, allow_unsigned=allow_unsigned), allow_downgrade=allow_downgrade)
    newest = registry.resolve(entry.name)
    if newest is not None and is_older(entry.version, newest.version):
        sys.stderr.write(
            f"WARNING: {entry.name}:{entry.version} is older than {newest.name}:{newest.version}: "
            f"kept because of --allow-downgrade (recorded in {registry.audit_path}); "
            f"'{entry.name}' still resolves to {newest.version}.\n"
        )
    if json_out:
        print_json({"name": entry.name, "version": entry.version, "sha256": entry.sha256, "path": str(entry.path)})
        return
    out.print(f"added {entry.name}:{entry.version} ({entry.sha256[:16]}) → {entry.path}")


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List bundles in the registry and the vendored zoo.

    Example: bastion models list
    """
    from bastion.models.registry import Registry
    from bastion.models.zoo import zoo_names, zoo_path

    rows = [
        {
            "name": e.name,
            "version": e.version,
            "task": e.task,
            "sha256": e.sha256,
            "where": "registry",
            "path": str(e.path),
        }
        for e in Registry().entries()
    ]
    from bastion.models.manifest import MANIFEST_NAME, read_manifest

    for n in zoo_names():
        m = read_manifest(zoo_path(n) / MANIFEST_NAME)
        rows.append(
            {
                "name": n,
                "version": m.version,
                "task": m.task,
                "sha256": m.sha256(),
                "where": "zoo",
                "path": str(zoo_path(n)),
            }
        )
    if json_out:
        print_json({"models": rows})
        return
    table = Table(show_edge=False)
    for col in ("name", "version", "task", "sha256", "where"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["version"], r["task"], r["sha256"][:16], r["where"])
    out.print(table)


@models_app.command("remove")
def models_remove(ref: str = typer.Argument(..., help="NAME or NAME:VERSION.")) -> None:
    """Remove a bundle from the registry.

    Example: bastion models remove person-vehicle:1.0
    """
    from bastion.models.registry import Registry

    entry = Registry().remove(ref)
    out.print(f"removed {entry.name}:{entry.version} ({entry.sha256[:16]})")


@models_app.command("path")
def models_path(ref: str = typer.Argument(..., help="NAME or NAME:VERSION.")) -> None:
    """Print the directory of a bundle that `models list` shows: registry first, then the vendored zoo (for scripts).

    Example: bastion models path person-vehicle:1.0
    """
    from bastion.errors import RegistryError
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.registry import Registry, split_ref
    from bastion.models.zoo import zoo_path

    entry = Registry().resolve(ref)
    if entry is not None:
        print(entry.path)
        return
    name, version = split_ref(ref)
    zoo = zoo_path(name)
    if zoo is not None and (version is None or read_manifest(zoo / MANIFEST_NAME).version == version):
        print(zoo)
        return
    raise RegistryError(f"no bundle {ref!r} in the registry or the zoo", "see: bastion models list")
