"""Issue #19: a trust-policy rule counts parties, not keys — a nation signing with two keys is one nation, and one
holder fills one requirement (models/policy_check.py ``parties``/``assign``).  Real keys, real bundles, the real
CLI for the line a soldier reads."""

import pytest

from bastion.errors import SignatureError
from bastion.models import Bundle
from bastion.models.policy_check import assign, parties
from bastion.models.policy_store import PolicyStore
from coalition_kit import NATIONS_RULE, add_countersignature, keys, make_bundle, one_line, policy, signed
from conftest import run_cli


def apply(k, signers, rules):
    s = signed(policy(1, [k["root"]], signers, rules), k["root"])
    PolicyStore().apply(s, first_root=s.policy.root.fingerprint()[:16])
    return s.policy


@pytest.fixture
def k(tmp_path):
    return keys(tmp_path, "root", "root2", "can1", "can2", "gbr", "fra", "team", "release")


def test_one_nation_with_two_keys_cannot_release_a_coalition_model_two_nations_can(tmp_path, k):
    apply(
        k,
        [
            {"pair": k["can1"], "role": "nation:CAN", "name": "can-ottawa"},
            {"pair": k["can2"], "role": "nation:CAN", "name": "can-halifax"},
            {"pair": k["gbr"], "role": "nation:GBR"},
        ],
        [NATIONS_RULE],
    )
    root = make_bundle(tmp_path, "coalition-vehicles", k["can1"])
    add_countersignature(root, k["can2"])  # two valid, in-scope keys — but one nation
    line = one_line(run_cli("bundle", "verify", str(root)))
    assert (
        "rule 'coalition-*' unmet: needs 2 signature(s) by distinct nation:* holders, has 1 (1 short); "
        "counted once: nation:CAN signed with 2 keys (one party)" in line
    ), line
    add_countersignature(root, k["gbr"])
    verification = Bundle.open(root).verification
    assert verification.signed and "rule 'coalition-*'" in verification.policy


def test_one_holder_with_a_model_team_and_a_release_authority_key_is_one_party(tmp_path, k):
    people = [
        {"pair": k["team"], "role": "model-team", "name": "alice"},
        {"pair": k["release"], "role": "release-authority", "name": "alice"},
        {"pair": k["fra"], "role": "release-authority", "name": "bob"},
    ]
    apply(k, people, [{"match": "*", "require": [{"role": "model-team"}, {"role": "release-authority"}]}])
    root = make_bundle(tmp_path, "detector", k["team"])
    add_countersignature(root, k["release"])
    with pytest.raises(SignatureError) as refused:
        Bundle.open(root)
    message = str(refused.value)
    assert "needs 1 signature(s) by distinct release-authority holders, has 0 (1 short)" in message
    assert "counted once: alice signed with 2 keys (one party)" in message
    add_countersignature(root, k["fra"])
    assert Bundle.open(root).verification.signed


def test_one_key_fills_one_requirement_even_when_two_patterns_match_it(tmp_path, k):
    signers = [{"pair": k["can1"], "role": "nation:CAN"}, {"pair": k["gbr"], "role": "nation:GBR"}]
    # "Canada and two nations" is three nations: Canada's signature is not also one of the two
    apply(k, signers + [{"pair": k["fra"], "role": "nation:FRA"}], [
        {"match": "coalition-*", "require": [{"role": "nation:CAN"}, {"role": "nation:*", "count": 2}]}
    ])  # fmt: skip
    root = make_bundle(tmp_path, "coalition-vehicles", k["can1"])
    add_countersignature(root, k["gbr"])
    with pytest.raises(
        SignatureError, match=r"nation:\* holders, has 1 \(1 short\); already counted: nation:CAN fills"
    ):
        Bundle.open(root)
    add_countersignature(root, k["fra"])
    assert Bundle.open(root).verification.signed


def test_seats_are_matched_not_handed_out_greedily(tmp_path, k):
    """Requirements in the order "any nation, then Canada": a greedy count would seat Canada as "any nation" and
    find nobody for Canada; the matching seats Britain there instead."""
    p = policy(
        1,
        [k["root"]],
        [{"pair": k["can1"], "role": "nation:CAN"}, {"pair": k["gbr"], "role": "nation:GBR"}],
        [{"match": "*", "require": [{"role": "nation:*"}, {"role": "nation:CAN"}]}],
    )
    can, gbr = p.keys
    rule = p.rules[0]
    signers = parties([can, gbr])
    filled = assign(rule, signers)
    assert [[signers[i].label for i in seat] for seat in filled] == [["nation:GBR"], ["nation:CAN"]]
    assert sum(map(len, assign(rule, parties([can])))) == 1  # one party, one seat


def test_keys_linked_by_a_name_or_a_nation_are_one_party(tmp_path, k):
    p = policy(
        1,
        [k["root"]],
        [
            {"pair": k["can1"], "role": "nation:CAN", "name": "alice"},
            {"pair": k["team"], "role": "model-team", "name": "alice"},  # Canada's alice, under another role
            {"pair": k["can2"], "role": "nation:CAN", "name": "carol"},
            {"pair": k["gbr"], "role": "nation:GBR", "name": "bob"},
        ],
        [NATIONS_RULE],
    )
    groups = parties(list(p.keys))
    assert sorted(g.label for g in groups) == ["alice = nation:CAN", "nation:GBR"]
    assert sorted(len(g.keys) for g in groups) == [1, 3]


def test_two_nations_calling_their_keys_alike_stay_two_nations(tmp_path, k):
    """Names link a holder's keys, never two nations: Canada's and Britain's keys both named ``release`` are two
    parties, and a model-team key of that name, which could be either's, joins neither."""
    p = policy(
        1,
        [k["root"]],
        [
            {"pair": k["can1"], "role": "nation:CAN", "name": "release"},
            {"pair": k["gbr"], "role": "nation:GBR", "name": "release"},
            {"pair": k["team"], "role": "model-team", "name": "release"},
        ],
        [NATIONS_RULE],
    )
    assert sorted(g.label for g in parties(list(p.keys))) == ["nation:CAN", "nation:GBR", "release"]
    apply(k, [{"pair": k["can1"], "role": "nation:CAN", "name": "release"},
              {"pair": k["gbr"], "role": "nation:GBR", "name": "release"}], [NATIONS_RULE])  # fmt: skip
    root = make_bundle(tmp_path, "coalition-vehicles", k["can1"])
    add_countersignature(root, k["gbr"])
    assert Bundle.open(root).verification.signed


def test_a_root_threshold_counts_holders_too(tmp_path, k):
    """Two root keys under one name are one holder: their two signatures do not meet a threshold of 2."""
    from bastion.models.policy import Policy

    data = policy(1, [k["root"], k["root2"]], [], [NATIONS_RULE], threshold=2).model_dump(mode="json")
    for key in data["root"]["keys"]:
        key["name"] = "alice"
    s = signed(Policy.model_validate(data), k["root"], k["root2"])
    with pytest.raises(
        SignatureError, match=r"signed by 1 of its own root keys, needs 2 \(1 more\); counted once per holder: alice"
    ):
        PolicyStore().apply(s, first_root=s.policy.root.fingerprint()[:16])
    data["root"]["keys"][1]["name"] = "bob"
    s = signed(Policy.model_validate(data), k["root"], k["root2"])
    PolicyStore().apply(s, first_root=s.policy.root.fingerprint()[:16])
    assert PolicyStore().current().policy.version == 1
