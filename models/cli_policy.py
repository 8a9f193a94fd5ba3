"""CLI commands for the signed trust policy: ``bastion policy init|sign|show|apply``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.table import Table

from bastion.console import out, print_json
from bastion.models.cli_options import JSON_OPTION, PASSPHRASE_OPTION

policy_app = typer.Typer(
    help="The signed coalition trust policy: roles, scopes, expiry, k-of-n rules, root rotation.",
    no_args_is_help=True,
)


@policy_app.command("init")
def policy_init(
    out_path: Path = typer.Option(..., "--out", help="The policy.yaml to write (never overwritten)."),
    root: list[Path] = typer.Option(..., "--root", help="A root key's .pub (repeat for each root key holder)."),
    threshold: int = typer.Option(1, "--threshold", help="How many root keys must sign each policy version."),
    key: list[str] = typer.Option(
        [],
        "--key",
        help="A bundle-signing key and its role: PATH.pub=ROLE (model-team, release-authority, nation:CAN); repeat.",
    ),
    version: int = typer.Option(1, "--version", help="Policy version (raise it for every update)."),
    days: int = typer.Option(365, "--days", help="Days until the policy expires."),
) -> None:
    """Write a starting policy.yaml: root keys, signing keys with roles, one catch-all rule to edit.

    Example: bastion policy init --out policy.yaml --root ca-root.pub --root gb-root.pub --threshold 2
    --key team.pub=model-team --key ca.pub=nation:CAN --key gb.pub=nation:GBR
    """
    import base64

    import yaml

    from bastion.errors import ConfigError
    from bastion.models.atomic import atomic_write_bytes
    from bastion.models.keys import load_public_key
    from bastion.models.policy import Policy, utcnow
    from bastion.models.signing import raw_public

    if out_path.exists():
        raise ConfigError(f"{out_path} already exists", "choose another name; bastion never overwrites a policy")

    def entry(path: Path) -> dict:
        return {"name": path.stem, "public": base64.b64encode(raw_public(load_public_key(path))).decode()}

    keys = []
    for spec in key:
        path, sep, role = spec.partition("=")
        if not sep:
            raise ConfigError(f"--key {spec!r}: expected PATH.pub=ROLE", "e.g. --key team.pub=model-team")
        keys.append({**entry(Path(path)), "role": role, "scopes": ["*"]})
    data = {
        "version": version,
        "expires": (utcnow() + dt.timedelta(days=days)).replace(microsecond=0).isoformat(),
        "root": {"threshold": threshold, "keys": [entry(p) for p in root]},
        "keys": keys,
        "revoked": [],
        "rules": [{"match": "*", "require": [{"role": "*", "count": 1}]}],
    }
    Policy.model_validate(data)  # what init writes must be a valid policy
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(out_path, text.encode())
    out.print(f"wrote {out_path}: edit its rules and scopes, then: bastion policy sign {out_path} --key ROOT.key")


@policy_app.command("sign")
def policy_sign(
    source: Path = typer.Argument(..., help="policy.yaml (first signature) or a .bastion-policy (one more)."),
    key: str = typer.Option(
        ..., "--key", help="A root key (.key, or a pkcs11: URI of one on a token) of this policy or the one in force."
    ),
    passphrase: bool = PASSPHRASE_OPTION,
    out_path: Path = typer.Option(
        None, "--out", help="Where to write (default: SOURCE as .bastion-policy; a .bastion-policy is updated)."
    ),
) -> None:
    """Sign a policy with one root key; each root key holder runs this on the same .bastion-policy file.

    Example: bastion policy sign policy.yaml --key ca-root.key && bastion policy sign policy.bastion-policy
    --key 'pkcs11:token=gb-root;object=root?module-path=/usr/lib/softhsm/libsofthsm2.so'
    """
    from bastion.errors import ConfigError
    from bastion.models.atomic import atomic_write_bytes
    from bastion.models.policy import POLICY_SUFFIX, SignedPolicy, policy_from_yaml, read_signed
    from bastion.models.signer import load_signer

    target = out_path or source.with_suffix(POLICY_SUFFIX)
    if source.suffix == POLICY_SUFFIX:
        signed = read_signed(source)
    else:
        if target.exists():  # signing the YAML again would drop every signature the file already holds
            raise ConfigError(
                f"{target} already exists", f"add your signature to it: bastion policy sign {target} --key KEY"
            )
        signed = SignedPolicy(policy=policy_from_yaml(source))
    signed = signed.sign(load_signer(key, passphrase))
    atomic_write_bytes(target, signed.to_bytes())
    out.print(f"signed policy v{signed.policy.version} ({len(signed.signatures)} signature(s)) → {target}")


@policy_app.command("show")
def policy_show(
    source: Path = typer.Argument(None, help="A .bastion-policy file (default: the policy in force here)."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a policy: version, expiry, root fingerprint and signatures, keys with roles and scopes, rules.

    Example: bastion policy show --json
    """
    from bastion.models.policy import read_signed
    from bastion.models.policy_store import PolicyStore

    signed = read_signed(source) if source else PolicyStore().current()
    if signed is None:
        if json_out:
            print_json({"policy": None})
            return
        out.print("no trust policy applied: any key in the trust store may sign any bundle (bastion keys list)")
        return
    summary = describe(signed)
    if json_out:
        print_json(summary)
        return
    out.print(
        f"policy v{summary['version']} (sha256 {summary['sha256'][:16]}…), expires {summary['expires']}"
        + (" — EXPIRED" if summary["expired"] else "")
    )
    out.print(
        f"root: {summary['root']['threshold']} of {len(summary['root']['keys'])} keys, fingerprint "
        f"{summary['root']['fingerprint']}; signed by {summary['root']['signed_by']} of them"
    )
    table = Table(show_edge=False)
    for col in ("key id", "name", "role", "scopes", "valid"):
        table.add_column(col)
    for k in summary["keys"]:
        valid = f"{k['not_before'] or '-'} → {k['not_after'] or '-'}"
        table.add_row(k["key_id"], k["name"], k["role"], ", ".join(k["scopes"]), valid)
    out.print(table)
    for rule in summary["rules"]:
        out.print(f"rule {rule['match']!r}: {rule['needs']}")
    if summary["revoked"]:
        out.print(f"revoked: {', '.join(summary['revoked'])}")


def describe(signed) -> dict:
    """The policy as ``show --json`` and ``doctor`` report it."""
    policy = signed.policy
    return {
        "version": policy.version,
        "sha256": policy.sha256(),
        "expires": policy.expires.isoformat(),
        "expired": policy.expired(),
        "root": {
            "threshold": policy.root.threshold,
            "fingerprint": policy.root.fingerprint(),
            "keys": [{"key_id": k.key_id, "name": k.name} for k in policy.root.keys],
            "signed_by": len(signed.signed_by(policy.root)),
        },
        "keys": [
            {
                "key_id": k.key_id,
                "name": k.name,
                "role": k.role,
                "scopes": k.scopes,
                "not_before": k.not_before.isoformat() if k.not_before else None,
                "not_after": k.not_after.isoformat() if k.not_after else None,
            }
            for k in policy.keys
        ],
        "revoked": policy.revoked,
        "rules": [{"match": r.match, "needs": r.describe()} for r in policy.rules],
        "signatures": sorted(signed.signatures),
    }


@policy_app.command("apply")
def policy_apply(
    source: Path = typer.Argument(..., help="The .bastion-policy file (e.g. from a USB stick)."),
    first_root: str = typer.Option(
        None, "--first-root", help="This unit's first policy only: the root fingerprint you confirmed out of band."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Put a signed policy in force on this unit (newer version, signed by the old root's threshold; recorded).

    Revocations, new keys, new rules and root rotations all arrive this way, as a new signed version.

    Example: bastion policy apply /media/usb/coalition-v4.bastion-policy
    """
    from bastion.models.policy import read_signed
    from bastion.models.policy_store import PolicyStore

    signed = read_signed(source)
    store = PolicyStore()
    recorded = store.journal_version()
    old = store.apply(signed, first_root=first_root)
    if old:
        before = f"v{old.policy.version}"
    else:  # a first policy, or one put back over a lost or replaced file (journal says v{recorded})
        before = f"v{recorded}, whose file was lost or replaced: restored" if recorded else "none"
    if json_out:
        replaced = old.policy.version if old else (recorded or None)
        print_json({"applied": signed.policy.version, "replaced": replaced, "restored": bool(recorded and not old)})
        return
    out.print(f"trust policy v{signed.policy.version} in force (was {before}); recorded in {store.trust.audit_path}")
