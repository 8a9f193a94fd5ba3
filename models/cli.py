"""CLI commands for model bundles: ``bastion bundle`` (keys: cli_keys.py, registry: cli_models.py,
trust policy: cli_policy.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from bastion.console import out, print_json
from bastion.models.cli_options import (
    JSON_OPTION,
    KEY_HELP,
    MARKING_HELP,
    PASSPHRASE_OPTION,
    RELEASABLE_TO_HELP,
    markings_from,
)

bundle_app = typer.Typer(
    help="Create, sign, countersign, mark, verify, inspect and pack model bundles.", no_args_is_help=True
)

ALLOW_UNSIGNED_HELP = "DEVELOPMENT ONLY: run a bundle that is unsigned or fails verification (warned every time)."


# -- bundle -------------------------------------------------------------------------------------------
@bundle_app.command("sign")
def bundle_sign(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    key: str = typer.Option(..., "--key", help=KEY_HELP),
    passphrase: bool = PASSPHRASE_OPTION,
    drop_countersignatures: bool = typer.Option(
        False,
        "--drop-countersignatures",
        help="Remove the countersignatures that sign an earlier manifest (refused without it, naming how many).",
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Sign a bundle directory (its payload is checked first) with a key file or a key on a PKCS#11 token.

    On a countersigned bundle: your key's signature is replaced and the others kept; a new key is refused (use
    bundle countersign); countersignatures over an earlier manifest need --drop-countersignatures.

    Example: bastion bundle sign runs/distill/person-vehicle/bundle --key ~/keys/model-team.key
    """
    from bastion.models.bundle import resolve_bundle_dir, verify_files
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.resign import sign_keeping_countersignatures
    from bastion.models.signer import load_signer

    root = resolve_bundle_dir(bundle)
    manifest = read_manifest(root / MANIFEST_NAME)
    verify_files(root, manifest)
    signer = load_signer(key, passphrase)
    done = sign_keeping_countersignatures(root, manifest, signer, _known_keys(), drop_countersignatures)
    if json_out:
        print_json({"name": manifest.name, "version": manifest.version, "key_id": done.record.key_id,
                    "signatures": done.signatures, "dropped": done.dropped})  # fmt: skip
        return
    dropped = f"; dropped {done.dropped} signature(s) over an earlier manifest" if done.dropped else ""
    out.print(
        f"signed {manifest.name}:{manifest.version} ({manifest.sha256()[:16]}) with key {done.record.key_id} "
        f"({done.signatures} signature(s){dropped})"
    )


@bundle_app.command("verify")
def bundle_verify(
    bundle: str = typer.Argument(..., help="Bundle directory, .bastion file, registry or zoo name."),
    json_out: bool = JSON_OPTION,
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
                "signers": list(b.verification.signers),
                "policy": b.verification.policy or None,
            }
        )
        return
    out.print(f"{b.manifest.name}:{b.manifest.version} {b.sha256[:16]}: {b.verification.summary}")


@bundle_app.command("inspect")
def bundle_inspect(
    bundle: str = typer.Argument(..., help="Bundle directory, .bastion file, registry or zoo name."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """Show what a bundle is: task, classes, files, provenance, licenses, metrics, signers, markings, verification.

    Example: bastion bundle inspect yolov5n
    """
    from bastion.models.bundle import Bundle
    from bastion.models.seal import describe

    report = Bundle.inspect(bundle)
    manifest, status, signer = report.manifest, report.status, report.signer_key_id
    sealed = describe(manifest)  # recipients only: nothing is decrypted to inspect
    markings = manifest.markings
    runs = _int8_runs(manifest)  # an INT8 bundle: which precision runs where, and why
    if json_out:
        print_json(
            {
                "manifest": manifest.model_dump(mode="json"),
                "sha256": manifest.sha256(),
                "path": str(report.root),
                "signer_key_id": signer,
                "signers": report.signers,
                "markings": markings.model_dump(mode="json") if markings else None,
                "verified": report.verified,
                "status": status,
                "runs": runs,
                "sealed": sealed,
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
        ("signers", _signer_lines(report.signers)),
        ("markings", markings.summary() if markings else "none (releasable to every unit)"),
        ("sealed", _sealed_line(manifest, sealed)),
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


def _sealed_line(manifest, sealed: dict | None) -> str:
    if sealed is None:
        return "no (model files in clear)"
    this = sealed["this_unit"]
    mine = "this unit is one" if sealed["this_unit_is_recipient"] else f"this unit ({this or 'no unit key'}) is not"
    return f"to units {manifest.sealed.labels()} ({mine})"


def _signer_lines(signers: list[dict]) -> str:
    """One line per signer: key id, and the name and role the trust policy in force gives it."""
    if not signers:
        return "none"
    return "\n".join(
        s["key_id"] + (f"  {s['name']} ({s['role']})" if s["name"] else "  (not in a trust policy)") for s in signers
    )


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


@bundle_app.command("countersign")
def bundle_countersign(
    bundle: Path = typer.Argument(..., help="Bundle directory (already signed)."),
    sign: str = typer.Option(..., "--sign", help=KEY_HELP),
    passphrase: bool = PASSPHRASE_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Add your signature beside the bundle's others, over the same manifest (payload and manifest untouched).

    Refused when the payload or any signature already there does not match the manifest, or when your key has
    already signed.  Which signatures are enough is the trust policy's rule (bastion policy show).

    Example: bastion bundle countersign coalition-vehicles-1.0/ --sign 'pkcs11:token=can;object=release'
    """
    from bastion.models.bundle import verify_files
    from bastion.models.manifest import MANIFEST_NAME, read_manifest
    from bastion.models.signer import load_signer
    from bastion.models.signing import countersign, read_signatures

    root = _writable_bundle_dir(bundle)
    manifest = read_manifest(root / MANIFEST_NAME)
    verify_files(root, manifest)
    record = countersign(root, manifest, load_signer(sign, passphrase), _known_keys())
    count = len(read_signatures(root, manifest.name))
    if json_out:
        print_json({"name": manifest.name, "version": manifest.version, "key_id": record.key_id, "signatures": count})
        return
    out.print(f"countersigned {manifest.name}:{manifest.version} with key {record.key_id} ({count} signatures)")


def _writable_bundle_dir(path: Path) -> Path:
    """A bundle directory the user named: never a registry entry, the package's zoo or the archive cache, whose
    contents are content-addressed or shipped (changing them in place would break what their names promise)."""
    from bastion.errors import ConfigError
    from bastion.models.manifest import MANIFEST_NAME

    root = path.parent if path.name == MANIFEST_NAME else path
    if not (root / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"{path} is not a bundle directory",
            "give the directory (for a .bastion file or a registry entry: copy it out first, then pack it again)",
        )
    return root


def _known_keys() -> dict:
    """Public keys this unit knows by id (trust store, and the policy in force if one can be read), to check the
    signatures a bundle already carries before adding one."""
    from bastion.errors import ModelLoadError
    from bastion.models.policy_store import PolicyStore
    from bastion.models.trust import TrustStore

    store = TrustStore()
    known = {k.key_id: k.public for k in store.keys().values()}
    try:
        current = PolicyStore(store).current()
    except ModelLoadError:
        current = None
    if current is not None:
        known.update({k.key_id: k.public_key() for k in current.policy.keys})
    return known


@bundle_app.command("mark")
def bundle_mark(
    bundle: Path = typer.Argument(..., help="Bundle directory (unsigned, or give --drop-signatures)."),
    classification: str = typer.Option(..., "--classification", help="Classification label, e.g. SECRET."),
    releasable_to: list[str] = typer.Option([], "--releasable-to", help=RELEASABLE_TO_HELP),
    marking: str = typer.Option(None, "--marking", help=MARKING_HELP),
    drop_signatures: bool = typer.Option(
        False,
        "--drop-signatures",
        help="The bundle is signed: remove its signatures (they would not cover the "
        "new markings); sign it again afterwards.",
    ),
) -> None:
    """Set the bundle's markings (classification, releasability) in its manifest, before it is signed.

    Markings are part of the signed manifest: a unit configured with its nation refuses a bundle not releasable
    to it (node config nation:, or BASTION_NATION).

    Example: bastion bundle mark coalition-vehicles-1.0/ --classification SECRET --releasable-to CAN --releasable-to GBR
    """
    from bastion.errors import ConfigError
    from bastion.models.bundle import verify_files
    from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
    from bastion.models.signing import COUNTERSIGNATURES_NAME, SIGNATURE_NAME

    root = _writable_bundle_dir(bundle)
    manifest = read_manifest(root / MANIFEST_NAME)
    verify_files(root, manifest)
    signed = [root / n for n in (SIGNATURE_NAME, COUNTERSIGNATURES_NAME) if (root / n).exists()]
    if signed and not drop_signatures:
        raise ConfigError(
            f"{manifest.name}:{manifest.version} is signed; new markings would void its signatures",
            "mark before signing, or pass --drop-signatures and sign again",
        )
    markings = markings_from(classification, releasable_to, marking)
    for path in signed:
        path.unlink()
    write_manifest(manifest.model_copy(update={"markings": markings}), root / MANIFEST_NAME)
    out.print(
        f"marked {manifest.name}:{manifest.version} {markings.summary()}" + ("; signatures removed" if signed else "")
    )


def _mount_seal() -> None:
    from bastion.models.cli_seal import bundle_seal

    bundle_app.command("seal")(bundle_seal)


_mount_seal()
