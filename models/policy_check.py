"""A bundle's signatures held against the trust policy in force: which count, and is the model's rule met.

A signature counts when its key is in the policy, not revoked (by the policy or on this unit), inside its
validity window, and its scopes cover the model's name.  A signature that does not sign this manifest refuses
the whole bundle (something was tampered with); one that merely does not count is named in the refusal, so the
one line says which rule is unmet, by how many signatures, and why the others did not count.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bastion.errors import SignatureError
from bastion.models.manifest import Manifest
from bastion.models.policy import Policy, PolicyKey, SignedPolicy, utcnow
from bastion.models.signing import SignatureRecord, Verification, check_record
from bastion.models.trust import TrustStore


@dataclass(frozen=True)
class Counted:
    """The outcome per signature: the policy key (if any) and why it does not count (empty when it does)."""

    record: SignatureRecord
    key: PolicyKey | None
    problem: str


def count_signatures(policy: Policy, records: list[SignatureRecord], manifest: Manifest, trust: TrustStore):
    name, now = f"{manifest.name}:{manifest.version}", utcnow()
    locally_revoked = trust.revoked()
    outcomes = []
    for record in records:
        key = policy.key(record.key_id)
        check_record(record, key.public_key() if key else None, manifest, name)
        if key is None:
            problem = "not in the policy"
        elif record.key_id in policy.revoked or record.key_id in locally_revoked:
            problem = "revoked"
        elif window := key.window_problem(now):
            problem = window
        elif not key.may_sign(manifest.name):
            problem = f"outside its scope ({', '.join(key.scopes)})"
        else:
            problem = ""
        outcomes.append(Counted(record, key, problem))
    return outcomes


def verify_with_policy(
    signed: SignedPolicy, records: list[SignatureRecord], manifest: Manifest, trust: TrustStore
) -> Verification:
    policy = signed.policy
    name = f"{manifest.name}:{manifest.version}"
    rule = policy.rule_for(manifest.name)
    if rule is None:
        raise SignatureError(
            f"bundle {name}: trust policy v{policy.version} has no rule for model name {manifest.name!r}",
            "only models the coalition's policy names may run here",
        )
    outcomes = count_signatures(policy, records, manifest, trust)
    counted = [o.key for o in outcomes if not o.problem and o.key is not None]
    for requirement in rule.require:
        have = sum(1 for k in counted if fnmatch.fnmatchcase(k.role, requirement.role))
        if have < requirement.count:
            skipped = "; ".join(
                f"{o.key.name if o.key else o.record.key_id} {o.problem}" for o in outcomes if o.problem
            )
            raise SignatureError(
                f"bundle {name}: trust policy v{policy.version} rule {rule.match!r} unmet: needs {requirement.count} "
                f"signature(s) by {requirement.role} keys, has {have} ({requirement.count - have} short)"
                + (f"; not counted: {skipped}" if skipped else ""),
                f"the rule is {rule.describe()}: have the missing signers countersign (bastion bundle countersign)",
            )
    first = counted[0]
    return Verification(
        True,
        first.key_id,
        f"policy v{policy.version}",
        signers=tuple(f"{k.name} ({k.role})" for k in counted),
        policy=f"trust policy v{policy.version}, rule {rule.match!r} ({rule.describe()})",
    )


def describe_signers(records: list[SignatureRecord], policy: Policy | None) -> list[dict]:
    """Signers for ``bundle inspect``: key id, and name and role when the policy names the key."""
    rows = []
    for record in records:
        key = policy.key(record.key_id) if policy else None
        rows.append({"key_id": record.key_id, "name": key.name if key else None, "role": key.role if key else None})
    return rows
