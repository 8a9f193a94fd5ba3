"""Real keys, real bundles and real signed policies for the coalition-trust tests (issue #19 items 1-3)."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
from pathlib import Path

from bastion.models import zoo_path
from bastion.models.keys import KeyPair, generate_keypair, load_private_key, load_public_key
from bastion.models.manifest import MANIFEST_NAME, read_manifest, write_manifest
from bastion.models.policy import Policy, SignedPolicy
from bastion.models.signing import countersign, raw_public, sign_manifest

UTC = dt.timezone.utc


def one_line(proc) -> str:
    """The single stderr line of a refused CLI command (exit 1, no traceback): what a soldier reads."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def keys(tmp_path: Path, *names: str) -> dict[str, KeyPair]:
    """Fresh Ed25519 key pairs on disk (not trusted anywhere)."""
    return {n: generate_keypair(tmp_path / "keys" / n) for n in names}


def b64(pair: KeyPair) -> str:
    return base64.b64encode(raw_public(load_public_key(pair.public_path))).decode()


def make_bundle(tmp_path: Path, name: str, signer: KeyPair | None, version: str = "1.0", dirname: str = "") -> Path:
    """The small vendored LM bundle copied under a new name/version and signed by ``signer``."""
    root = tmp_path / (dirname or f"{name}-{version}")
    shutil.copytree(zoo_path("stories260K"), root)
    for extra in ("signature", "countersignatures"):
        (root / extra).unlink(missing_ok=True)
    manifest = read_manifest(root / MANIFEST_NAME).model_copy(update={"name": name, "version": version})
    write_manifest(manifest, root / MANIFEST_NAME)
    if signer is not None:
        sign_manifest(root, manifest, load_private_key(signer.private_path))
    return root


def add_countersignature(root: Path, pair: KeyPair) -> None:
    manifest = read_manifest(root / MANIFEST_NAME)
    countersign(root, manifest, load_private_key(pair.private_path), {})


def policy(
    version: int,
    roots: list[KeyPair],
    signers: list[dict],
    rules: list[dict],
    threshold: int = 1,
    revoked: tuple[str, ...] = (),
    expires: dt.datetime | None = None,
) -> Policy:
    """``signers``: dicts with ``pair``, ``role`` and optional ``scopes``, ``not_before``, ``not_after``."""
    entries = []
    for s in signers:
        entry = {"name": s.get("name", s["pair"].public_path.stem), "public": b64(s["pair"]), "role": s["role"]}
        for field in ("scopes", "not_before", "not_after"):
            if field in s:
                entry[field] = s[field]
        entries.append(entry)
    return Policy.model_validate(
        {
            "version": version,
            "expires": (expires or dt.datetime.now(UTC) + dt.timedelta(days=30)).isoformat(),
            "root": {"threshold": threshold, "keys": [{"name": r.public_path.stem, "public": b64(r)} for r in roots]},
            "keys": entries,
            "revoked": list(revoked),
            "rules": rules,
        }
    )


def signed(p: Policy, *by: KeyPair) -> SignedPolicy:
    out = SignedPolicy(policy=p)
    for pair in by:
        out = out.sign(load_private_key(pair.private_path))
    return out


def write_signed(path: Path, s: SignedPolicy) -> Path:
    path.write_bytes(s.to_bytes())
    return path


NATIONS_RULE = {"match": "coalition-*", "require": [{"role": "nation:*", "count": 2}]}
TEAM_AND_RELEASE_RULE = {
    "match": "*",
    "require": [{"role": "model-team", "count": 1}, {"role": "release-authority", "count": 1}],
}
