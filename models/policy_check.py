"""A bundle's signatures held against the trust policy in force: which count, and is the model's rule met.

A signature counts when its key is in the policy, not revoked (by the policy or on this unit), inside its
validity window, and its scopes cover the model's name.  A signature that does not sign this manifest refuses
the whole bundle (something was tampered with); one that merely does not count is named in the refusal, so the
one line says which rule is unmet, by how many signers, and why the others did not count.

Rules count parties, not keys: a rule is "k distinct holders of these roles", so handing a partner a second key
never gives it a second vote.  A nation's keys (role ``nation:CAN``) are one party, the nation; any other key's
party is its holder, named by the key's ``name`` (and a holder named like one nation's key is that nation's).  And one
party fills one seat: "1 model-team AND 1 release-authority" needs two parties even when one holder has keys
under both roles, "1 nation:CAN AND 2 nation:*" needs Canada and two other nations.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bastion.errors import SignatureError
from bastion.models.manifest import Manifest
from bastion.models.policy import Policy, PolicyKey, Requirement, Rule, SignedPolicy, utcnow
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


def holder_of(key: PolicyKey) -> str:
    """The party a key speaks for: ``nation:CAN`` for a nation's key, else the key's name (its holder)."""
    return key.role if key.role.startswith("nation:") else key.name


@dataclass
class _Party:
    """One signing party: the counted keys it signed with, and the roles those keys hold."""

    label: str
    keys: list[PolicyKey]

    def fills(self, requirement: Requirement) -> bool:
        return any(fnmatch.fnmatchcase(k.role, requirement.role) for k in self.keys)


def parties(keys: list[PolicyKey]) -> list[_Party]:
    """Counted keys grouped by who holds them (so a holder's second key, or a nation's second key under another
    name, never counts as a second signer): a nation's keys are the nation; other keys sharing a name are one
    holder, and one holder with the name of one nation's key is that nation's.  Two nations are never merged:
    their keys do not link by name (two nations may both call a key ``release``), nor through a name both use."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    nations_named: dict[str, set[str]] = {}
    for key in keys:
        if key.role.startswith("nation:"):
            nations_named.setdefault(key.name, set()).add(key.role)
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key.role.startswith("nation:"):
            tags = [key.role]
        else:
            nations = nations_named.get(key.name, set())
            tags = [f"name:{key.name}", *(nations if len(nations) == 1 else ())]
        for tag in tags:
            if tag in seen:
                parent[find(i)] = find(seen[tag])
            else:
                seen[tag] = i
    groups: dict[int, list[PolicyKey]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(find(i), []).append(key)
    out = []
    for members in groups.values():
        labels = sorted({holder_of(k) for k in members})
        out.append(_Party(" = ".join(labels), members))
    return out


def assign(rule: Rule, signers: list[_Party]) -> list[list[int]]:
    """Each requirement's seats filled by distinct parties, as many as can be (a maximum bipartite matching:
    one party fills one seat of one requirement, so "1 model-team AND 1 release-authority" needs two holders
    and "1 nation:CAN AND 2 nation:*" three nations).  Returns, per requirement, the indexes of its parties."""
    seats = [r for r, req in enumerate(rule.require) for _ in range(req.count)]
    seat_of: dict[int, int] = {}  # party index → seat index

    def place(seat: int, tried: set[int]) -> bool:
        for p, party in enumerate(signers):
            if p in tried or not party.fills(rule.require[seats[seat]]):
                continue
            tried.add(p)
            if p not in seat_of or place(seat_of[p], tried):
                seat_of[p] = seat
                return True
        return False

    for seat in range(len(seats)):
        place(seat, set())
    filled: list[list[int]] = [[] for _ in rule.require]
    for p, seat in seat_of.items():
        filled[seats[seat]].append(p)
    return filled


def verify_with_policy(
    signed: SignedPolicy, records: list[SignatureRecord], manifest: Manifest, trust: TrustStore
) -> Verification:
    """Hold the bundle's signatures to the rule for its name.  Rules count parties, not keys (``parties``,
    ``assign``): a nation signing with two keys is one nation, and one holder fills one requirement."""
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
    signers = parties(counted)
    filled = assign(rule, signers)
    for r, requirement in enumerate(rule.require):
        have = len(filled[r])
        if have < requirement.count:
            raise SignatureError(
                f"bundle {name}: trust policy v{policy.version} rule {rule.match!r} unmet: needs {requirement.count} "
                f"signature(s) by distinct {requirement.role} holders, has {have} "
                f"({requirement.count - have} short)" + _why_not(outcomes, signers, filled, rule, r),
                f"the rule is {rule.describe()}, each party counts once: have the missing signers countersign "
                "(bastion bundle countersign)",
            )
    first = counted[0]
    return Verification(
        True,
        first.key_id,
        f"policy v{policy.version}",
        signers=tuple(f"{k.name} ({k.role})" for k in counted),
        policy=f"trust policy v{policy.version}, rule {rule.match!r} ({rule.describe()})",
    )


def _why_not(outcomes: list[Counted], signers: list[_Party], filled: list[list[int]], rule: Rule, short: int) -> str:
    """Why the other signatures did not fill the short requirement: not counted at all, a party's extra keys,
    or a party already filling another requirement."""
    notes = []
    several = [f"{p.label} signed with {len(p.keys)} keys (one party)" for p in signers if len(p.keys) > 1]
    if several:
        notes.append("counted once: " + ", ".join(several))
    elsewhere = [
        f"{signers[p].label} fills {rule.require[r].role}"
        for r, members in enumerate(filled)
        if r != short
        for p in members
        if signers[p].fills(rule.require[short])
    ]
    if elsewhere:
        notes.append("already counted: " + ", ".join(elsewhere))
    skipped = [f"{o.key.name if o.key else o.record.key_id} {o.problem}" for o in outcomes if o.problem]
    if skipped:
        notes.append("not counted: " + "; ".join(skipped))
    return "".join(f"; {n}" for n in notes)


def describe_signers(records: list[SignatureRecord], policy: Policy | None) -> list[dict]:
    """Signers for ``bundle inspect``: key id, and name and role when the policy names the key."""
    rows = []
    for record in records:
        key = policy.key(record.key_id) if policy else None
        rows.append({"key_id": record.key_id, "name": key.name if key else None, "role": key.role if key else None})
    return rows
