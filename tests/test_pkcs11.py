"""Issue #19 item 4: signing keys on a PKCS#11 token (SoftHSM2 here), named by RFC 7512 ``pkcs11:`` URIs.

The token tests run against a real SoftHSM2 token initialised in a temp dir (Debian's ``softhsm2``, which the
Makefile installs) through python-pkcs11 (the ``[hsm]`` extra), and skip, saying which, when either is missing.
The URI parser and the refusals that need no token run everywhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.errors import KeyFileError, MissingExtraError, SignatureError
from bastion.models import Bundle
from bastion.models.keys import KeyPair, generate_keypair, key_id, load_private_key, load_public_key, public_pem
from bastion.models.manifest import MANIFEST_NAME, read_manifest
from bastion.models.pkcs11_key import ed25519_from_ec_point, generate_on_token
from bastion.models.pkcs11_uri import parse_pkcs11_uri, redact
from bastion.models.policy import read_signed
from bastion.models.signer import load_public, load_signer, scheme_of
from bastion.models.signing import countersign
from bastion.models.trust import TrustStore
from coalition_kit import make_bundle, one_line, policy, write_signed
from conftest import run_cli

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "pin-7f3q"
LABEL = "bastion-test"


# -- the URI parser: no token needed ----------------------------------------------------------------------------
def test_a_pkcs11_uri_is_parsed_with_percent_decoding_and_its_pin_never_shown():
    uri = parse_pkcs11_uri(
        "pkcs11:token=Coalition%20CA;object=model-team;id=%01%a0;slot-id=3;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=s3cr%65t"
    )
    assert (uri.token, uri.object, uri.object_id, uri.slot_id, uri.type) == (
        "Coalition CA",
        "model-team",
        b"\x01\xa0",
        3,
        "private",
    )
    assert uri.module_path == MODULE and uri.pin_value == "s3cret"
    assert "s3cr" not in uri.shown and "s3cr" not in repr(uri) and "pin-value=***" in uri.shown
    assert parse_pkcs11_uri("PKCS11:object=k").object == "k" and parse_pkcs11_uri("pkcs11:").path == {}
    assert parse_pkcs11_uri("pkcs11:object=k;x-vendor=1").object == "k"  # vendor attributes are allowed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("pkcs11:token=t;token=u", "'token' appears twice"),
        ("pkcs11:objekt=k", "unknown path attribute 'objekt'"),
        ("pkcs11:object=k?pin=1", "unknown query attribute 'pin'"),
        ("pkcs11:object=my key", "must percent-encode"),
        ("pkcs11:object=k%2", "must percent-encode"),
        ("pkcs11:object=%ff", "not UTF-8"),
        ("pkcs11:object=gbr%00models", "control character"),
        ("pkcs11:token=%1b%5b2J", "control character"),
        ("pkcs11:object=k?pin-source=file:/p%0a", "control character"),
        ("pkcs11:slot-id=one", "slot-id must be a decimal number"),
        ("pkcs11:type=secret", "type must be one of"),
        ("pkcs11:object", "not a name=value path attribute"),
        ("pkcs11:object=k?pin-value=1&pin-source=file:/p", "both pin-value and pin-source"),
        ("pkcs11:object=k?module-name=softhsm2", "module-name is not supported"),
        ("pkcs11:object=" + "a" * 5000, "longer than 4096"),
    ],
)
def test_a_malformed_uri_is_one_refusal_naming_what_is_wrong(text, why):
    with pytest.raises(KeyFileError, match=why) as refused:
        parse_pkcs11_uri(text if "?" in text else text + "?pin-value=TOPSECRET")
    assert "TOPSECRET" not in str(refused.value)


def test_a_key_reference_is_a_file_unless_its_scheme_is_registered(tmp_path):
    assert scheme_of("pkcs11:object=k") == "pkcs11" and scheme_of("PKCS11:object=k") == "pkcs11"
    assert scheme_of(tmp_path / "team.key") is None and scheme_of("c:team.key") is None
    pair = generate_keypair(tmp_path / "odd:name")  # a file whose name holds a colon is still a file
    assert isinstance(load_signer(pair.private_path), Ed25519PrivateKey)
    for reference in (pair.private_path, pair.public_path):  # keys export: the public half of a file key, too
        assert key_id(load_public(reference)) == pair.key_id
    assert (
        redact("pkcs11:object=k?pin-value=abc&module-path=/m.so") == "pkcs11:object=k?pin-value=***&module-path=/m.so"
    )


def test_without_python_pkcs11_a_uri_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # import pkcs11 → ImportError, as without the extra
    with pytest.raises(MissingExtraError, match=r"pip install 'bastion\[hsm\]'"):
        load_signer(f"pkcs11:token=t;object=k?module-path={MODULE}")


def test_a_cka_ec_point_gives_the_same_key_as_the_raw_bytes():
    raw = bytes(range(32))
    assert ed25519_from_ec_point(b"\x04\x20" + raw, "t") is not None
    assert key_id(ed25519_from_ec_point(b"\x04\x20" + raw, "t")) == key_id(ed25519_from_ec_point(raw, "t"))
    with pytest.raises(KeyFileError, match="not an Ed25519 key \\(65-byte CKA_EC_POINT\\)"):
        ed25519_from_ec_point(b"\x04" * 65, "t")


# -- a real SoftHSM2 token -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token(tmp_path_factory):
    """A SoftHSM2 token in a temp dir, initialised once per test process (SOFTHSM2_CONF points at it while this
    module's tests run). Once per process, not per module: the SoftHSM2 library loaded in this process reads its
    config once, so a second token made after xdist ran another module's tests in between would be invisible to
    it while the CLI's subprocesses saw it. Each test uses its own object labels."""
    pytest.importorskip("pkcs11", reason="python-pkcs11 (the [hsm] extra) is not installed")
    if shutil.which("softhsm2-util") is None or not Path(MODULE).is_file():
        pytest.skip("SoftHSM2 is not installed (Debian: apt install softhsm2; make installs it)")
    root = tmp_path_factory.getbasetemp() / "softhsm"
    conf = root / "softhsm2.conf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.delenv("BASTION_PKCS11_PIN", raising=False)
        mp.delenv("BASTION_PKCS11_MODULE", raising=False)
        if not conf.is_file():
            (root / "tokens").mkdir(parents=True)
            conf.write_text(
                f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
            )
            subprocess.run(
                ["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", "87654321"],
                check=True,
                capture_output=True,
            )
        yield conf


def uri(obj: str, query: str = "") -> str:
    return f"pkcs11:token={LABEL};object={obj}?module-path={MODULE}" + (f"&{query}" if query else "")


def cli_token_key(tmp_path: Path, obj: str) -> KeyPair:
    """`bastion keys generate --pkcs11`: the key made on the token, its public half written and returned."""
    made = run_cli(
        "keys", "generate", "--out", str(tmp_path / obj), "--pkcs11", uri(obj), "--no-trust", "--json",
        env={"BASTION_PKCS11_PIN": PIN},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    public = Path(info["public"])
    assert info["key_id"] == key_id(load_public_key(public)) and not (tmp_path / f"{obj}.key").exists()
    return KeyPair(Path("on-the-token"), public, info["key_id"])


def token_key(tmp_path: Path, obj: str) -> KeyPair:
    """The same in this process (a CLI start per key would make these tests slow)."""
    made = generate_on_token(uri(obj, f"pin-value={PIN}"))
    public = tmp_path / f"{obj}.pub"
    public.write_bytes(public_pem(made.public))
    return KeyPair(Path("on-the-token"), public, key_id(made.public))


def test_a_token_key_signs_a_bundle_that_verifies_with_its_exported_public_key(tmp_path, token):
    team = cli_token_key(tmp_path, "team")
    exported = run_cli("keys", "export", uri("team"), "--out", str(tmp_path / "exported.pub"))  # no PIN needed
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exported.pub").read_bytes() == team.public_path.read_bytes()
    root = make_bundle(tmp_path, "token-signed", None)
    signed = run_cli("bundle", "sign", str(root), "--key", uri("team"), env={"BASTION_PKCS11_PIN": PIN})
    assert signed.returncode == 0 and f"with key {team.key_id}" in signed.stdout, signed.stderr
    with pytest.raises(SignatureError, match="does not trust"):
        Bundle.open(root)
    TrustStore().trust(tmp_path / "exported.pub")
    assert Bundle.open(root).verification.key_id == team.key_id


def test_a_file_key_and_a_token_key_countersign_one_bundle_and_both_verify(tmp_path, token):
    release = token_key(tmp_path, "release")
    (pin_file := tmp_path / "pin").write_text(PIN + "\n")
    maker = generate_keypair(tmp_path / "keys" / "maker")
    root = make_bundle(tmp_path, "coalition-vehicles", maker)
    counter = run_cli(
        "bundle", "countersign", str(root), "--sign", uri("release", f"pin-source=file:{pin_file}"), "--json"
    )
    assert counter.returncode == 0, counter.stderr
    assert json.loads(counter.stdout) == {
        "name": "coalition-vehicles",
        "version": "1.0",
        "key_id": release.key_id,
        "signatures": 2,
    }
    TrustStore().trust(release.public_path)  # only the token key trusted: its countersignature alone carries it
    assert Bundle.open(root).verification.signers == (release.key_id,)
    TrustStore().trust(maker.public_path)
    assert set(Bundle.open(root).verification.signers) == {maker.key_id, release.key_id}
    signer = load_signer(uri("release", f"pin-source={pin_file}"))
    try:
        with pytest.raises(SignatureError, match=f"already signed by key {release.key_id}"):
            countersign(root, read_manifest(root / MANIFEST_NAME), signer, {})
    finally:
        signer.close()


def test_commands_that_read_a_key_file_path_take_a_token_uri_too(tmp_path, token):
    """bundle create, bundle seal and distill hand their --sign Path to load_private_key: a URI through Path (which
    folds file:/// to file:/) still names the token key."""
    legacy = token_key(tmp_path, "legacy")
    (pin_file := tmp_path / "pin").write_text(PIN)
    signer = load_private_key(Path(uri("legacy", f"pin-source=file://{pin_file}")))
    try:
        signature = signer.sign(b"canonical manifest bytes")
    finally:
        signer.close()
    load_public_key(legacy.public_path).verify(signature, b"canonical manifest bytes")  # raises if not


def test_a_wrong_pin_is_one_line_and_exit_1_and_never_shows_the_pin(tmp_path, token):
    token_key(tmp_path, "guarded")
    root = make_bundle(tmp_path, "refused", None)
    line = one_line(run_cli("bundle", "sign", str(root), "--key", uri("guarded", "pin-value=wrong-pin-zz")))
    assert line == "error: wrong PIN for token 'bastion-test' — check BASTION_PKCS11_PIN or the URI's pin-source " \
        "(the token locks after a few)"  # fmt: skip
    assert not (root / "signature").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (uri("absent", f"pin-value={PIN}"), "no private key 'absent' on token 'bastion-test'"),
        (f"pkcs11:id=%ff%fe?module-path={MODULE}&pin-value={PIN}", "no private key id fffe on token 'bastion-test'"),
        (f"pkcs11:token=elsewhere;object=k?module-path={MODULE}&pin-value={PIN}", "no token present matches"),
        (f"pkcs11:object=k?module-path=/nonexistent/p11.so&pin-value={PIN}", "PKCS#11 module not found"),
        (f"pkcs11:object=k?module-path=/etc/hostname&pin-value={PIN}", "cannot load the PKCS#11 module"),
        ("pkcs11:token=t;object=k", "which PKCS#11 module drives the token"),
        (uri("k"), "needs its user PIN and there is no terminal"),
        (uri("k", "pin-source=%7Ccat%20/etc/pin"), "is not a file"),
        (uri("k", "pin-source=file:/nonexistent/pin"), "PIN file not found"),
        (f"pkcs11:token={LABEL}?module-path={MODULE}&pin-value={PIN}", "names no key"),
        (uri("k;type=public", f"pin-value={PIN}"), "names a public object; signing needs its private key"),
    ],
)
def test_what_a_token_refuses_is_one_line_naming_what_to_do(reference, expected, token, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # never a terminal to ask a PIN on, even under pytest -s
    with pytest.raises(KeyFileError, match=re.escape(expected)) as refused:
        load_signer(reference)
    assert "\n" not in str(refused.value) and PIN not in str(refused.value)


def test_a_token_key_is_never_generated_over_an_object_or_with_a_passphrase(tmp_path, token):
    token_key(tmp_path, "kept")
    with pytest.raises(KeyFileError, match="already holds an object with that label or id"):
        generate_on_token(uri("kept", f"pin-value={PIN}"))
    with pytest.raises(KeyFileError, match="--passphrase is for key files"):
        load_signer(uri("kept", f"pin-value={PIN}"), passphrase=True)
    with pytest.raises(KeyFileError, match="must name the new key: object=LABEL"):
        generate_on_token(f"pkcs11:token={LABEL};id=%09?module-path={MODULE}&pin-value={PIN}")


def test_the_private_key_cannot_be_read_off_the_token(tmp_path, token):
    import pkcs11

    token_key(tmp_path, "vault")
    session = pkcs11.lib(MODULE).get_token(token_label=LABEL).open(user_pin=PIN)
    try:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="vault")
        assert private[pkcs11.Attribute.EXTRACTABLE] is False and private[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]  # the token refuses to give out the secret scalar
    finally:
        session.close()


def test_a_public_object_that_is_not_the_private_keys_half_is_caught_before_it_signs(tmp_path, token):
    """An attacker with the SO or user PIN swaps the stored public key: every signature would carry the wrong key
    id.  The signer checks each signature against the public key it reports and refuses."""
    import pkcs11

    token_key(tmp_path, "swapped")
    attr = pkcs11.Attribute
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pkcs11.lib(MODULE).get_token(token_label=LABEL).open(rw=True, user_pin=PIN) as session:
        public = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, label="swapped")
        template = {a: public[a] for a in (attr.KEY_TYPE, attr.EC_PARAMS, attr.LABEL, attr.ID)}
        public.destroy()
        session.create_object(
            {
                **template,
                attr.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                attr.TOKEN: True,
                attr.EC_POINT: b"\x04\x20" + other,
            }
        )
    signer = load_signer(uri("swapped", f"pin-value={PIN}"))
    try:
        with pytest.raises(KeyFileError, match="does not verify with the public key stored beside it"):
            signer.sign(b"manifest bytes")
    finally:
        signer.close()


def test_a_policy_is_signed_by_a_root_key_on_a_token(tmp_path, token):
    root_key = token_key(tmp_path, "root")
    draft = policy(1, [root_key], [], [{"match": "*", "require": [{"role": "model-team", "count": 1}]}])
    from bastion.models.policy import SignedPolicy

    path = write_signed(tmp_path / "p.bastion-policy", SignedPolicy(policy=draft))
    signed = run_cli("policy", "sign", str(path), "--key", uri("root"), env={"BASTION_PKCS11_PIN": PIN})
    assert signed.returncode == 0, signed.stderr
    result = read_signed(path)
    assert result.signed_by(draft.root) == {root_key.key_id}
    result.check_threshold(draft.root, "its")


def test_signing_and_verifying_with_file_keys_never_loads_python_pkcs11(tmp_path):
    pair = generate_keypair(tmp_path / "team")
    root = make_bundle(tmp_path, "light", pair)
    probe = (
        "import sys; from pathlib import Path; from bastion.models import Bundle; "
        "from bastion.models.signer import load_signer; from bastion.models.trust import TrustStore; "
        f"load_signer(Path({str(pair.private_path)!r})); TrustStore().trust(Path({str(pair.public_path)!r})); "
        f"Bundle.open({str(root)!r}); print('pkcs11' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip() == "False"
