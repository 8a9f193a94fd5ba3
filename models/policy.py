"""The signed trust policy: who may sign which models, with which roles, until when — and who may change that.

A coalition writes ``policy.yaml``; ``bastion policy sign`` turns it into canonical JSON and signs it, and each
further root key adds its signature to the same ``.bastion-policy`` file.  The policy names:

- ``root``: the keys (and the threshold of them) that sign the policy itself.  TUF-style: a new version must be
  signed by the threshold of the root *in force on the unit* and by the threshold of its own root, so a root is
  rotated by a policy the old root signs (``bastion.models.policy_store``);
- ``keys``: bundle-signing keys, each with a name, one role (``model-team``, ``release-authority``,
  ``nation:CAN``), a validity window and the model-name patterns (scopes) it may sign;
- ``revoked``: key ids whose signatures never count again — revocation travels as a signed update;
- ``rules``: for the first pattern matching a model's name, how many signatures of which roles it needs
  (all of a rule's requirements must be met: "2 of ``nation:*``", "1 ``model-team`` AND 1
  ``release-authority``").

The policy holds ``version`` (anti-rollback) and ``expires``: a unit refuses an older version than the one it
has, and any policy past its expiry.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion.errors import ConfigError, SignatureError
from bastion.models.keys import load_public_key, verify_signature
from bastion.models.safe_read import read_bounded
from bastion.models.signing import raw_key_id, raw_public

POLICY_FORMAT = "bastion-policy/1"
POLICY_SUFFIX = ".bastion-policy"
MAX_POLICY_BYTES = 1 << 20  # a policy of 256 keys and 128 rules is ~80 KB
MAX_POLICY_SIGNATURES = 32
ROLE_PATTERN = r"^(model-team|release-authority|nation:[A-Z][A-Z0-9]{1,9}|[a-z][a-z0-9-]{0,31})$"
Glob = Annotated[str, Field(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PublicKey(_Strict):
    name: str = Field(min_length=1, max_length=64)
    public: str = Field(description="raw Ed25519 public key, base64 (32 bytes)")

    @field_validator("public")
    @classmethod
    def _raw_key(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("public must be a base64 Ed25519 key (bastion policy init writes them)") from None
        if len(raw) != 32:
            raise ValueError(f"public is {len(raw)} bytes, an Ed25519 key is 32")
        return value

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.public)

    @property
    def key_id(self) -> str:
        return raw_key_id(self.raw)

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


class RootKey(_PublicKey):
    """A key that signs the policy itself (never a bundle, by its root role alone)."""


class Root(_Strict):
    threshold: int = Field(ge=1, le=MAX_POLICY_SIGNATURES)
    keys: list[RootKey] = Field(min_length=1, max_length=MAX_POLICY_SIGNATURES)

    @model_validator(mode="after")
    def _reachable(self) -> "Root":
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("root: the same key is listed twice")
        if self.threshold > len(ids):
            raise ValueError(f"root: threshold {self.threshold} but only {len(ids)} root keys")
        return self

    def fingerprint(self) -> str:
        """sha256 of the canonical root: what an operator confirms out of band before a unit's first policy."""
        return hashlib.sha256(canonical(self.model_dump(mode="json"))).hexdigest()


class PolicyKey(_PublicKey):
    """A bundle-signing key: its role, when its signatures count, and which model names it may sign."""

    role: str = Field(pattern=ROLE_PATTERN)
    scopes: list[Glob] = Field(["*"], min_length=1, max_length=64)
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None

    def window_problem(self, now: dt.datetime) -> str | None:
        if self.not_before and now < self.not_before:
            return f"not valid before {self.not_before.isoformat()}"
        if self.not_after and now > self.not_after:
            return f"expired {self.not_after.isoformat()}"
        return None

    def may_sign(self, model_name: str) -> bool:
        return any(fnmatch.fnmatchcase(model_name, pattern) for pattern in self.scopes)


class Requirement(_Strict):
    role: Glob = Field(description="role or role pattern, e.g. nation:* or model-team")
    count: int = Field(1, ge=1, le=MAX_POLICY_SIGNATURES)


class Rule(_Strict):
    match: Glob = Field(description="model-name pattern, e.g. coalition-*")
    require: list[Requirement] = Field(min_length=1, max_length=8)

    def describe(self) -> str:
        return " AND ".join(f"{r.count} {r.role}" for r in self.require)


class Policy(_Strict):
    version: int = Field(ge=1)
    expires: AwareDatetime
    root: Root
    keys: list[PolicyKey] = Field([], max_length=256)
    revoked: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = Field([], max_length=4096)
    rules: list[Rule] = Field(min_length=1, max_length=128)

    @model_validator(mode="after")
    def _distinct_keys(self) -> "Policy":
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("keys: the same key is listed twice (one role per key)")
        return self

    def canonical_bytes(self) -> bytes:
        return canonical(self.model_dump(mode="json"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def key(self, kid: str) -> PolicyKey | None:
        return next((k for k in self.keys if k.key_id == kid), None)

    def rule_for(self, model_name: str) -> Rule | None:
        """The first rule whose pattern matches (order matters: put narrow patterns first)."""
        return next((r for r in self.rules if fnmatch.fnmatchcase(model_name, r.match)), None)

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or utcnow()) > self.expires


class SignedPolicy(_Strict):
    """A policy and the signatures over its canonical bytes (root keys of this or of the previous policy)."""

    policy: Policy
    signatures: dict[str, str] = Field({}, max_length=MAX_POLICY_SIGNATURES)  # key id → base64 signature

    def signed_by(self, root: Root) -> set[str]:
        """Ids of ``root``'s keys whose signature over this policy verifies."""
        message, good = self.policy.canonical_bytes(), set()
        for key in root.keys:
            sig = self.signatures.get(key.key_id)
            if sig is None:
                continue
            try:
                raw = base64.b64decode(sig, validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 64 and verify_signature(key.public_key(), raw, message):
                good.add(key.key_id)
        return good

    def check_threshold(self, root: Root, whose: str) -> None:
        """Root keys count by holder, as bundle signers do (models/policy_check.py): two root keys under one name
        are one holder, so a threshold of 2 is never met by one person holding two keys."""
        good = [k for k in root.keys if k.key_id in self.signed_by(root)]
        have = len({k.name for k in good})
        if have < root.threshold:
            twice = sorted({k.name for k in good if sum(g.name == k.name for g in good) > 1})
            raise SignatureError(
                f"policy v{self.policy.version} is signed by {have} of {whose} root keys, "
                f"needs {root.threshold} ({root.threshold - have} more)"
                + (f"; counted once per holder: {', '.join(twice)}" if twice else ""),
                "have more root key holders sign it: bastion policy sign FILE --key ROOT.key",
            )

    def sign(self, private: Ed25519PrivateKey) -> "SignedPolicy":
        kid = raw_key_id(raw_public(private.public_key()))
        if kid in self.signatures:
            raise SignatureError(f"policy v{self.policy.version} is already signed by key {kid}")
        if len(self.signatures) >= MAX_POLICY_SIGNATURES:
            raise SignatureError(f"policy already carries {MAX_POLICY_SIGNATURES} signatures")
        signature = base64.b64encode(private.sign(self.policy.canonical_bytes())).decode()
        return SignedPolicy(policy=self.policy, signatures={**self.signatures, kid: signature})

    def to_bytes(self) -> bytes:
        body = {"format": POLICY_FORMAT, "policy": self.policy.model_dump(mode="json"), "signatures": self.signatures}
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _first_error(exc: ValidationError, what: str) -> str:
    from bastion.models.textfiles import first_error

    return first_error(exc, what)


def parse_signed(data: bytes, where: str) -> SignedPolicy:
    """A ``.bastion-policy`` file's bytes → SignedPolicy, or one ConfigError line."""
    try:
        body = json.loads(data.decode("utf-8"))
        if not isinstance(body, dict) or body.get("format") != POLICY_FORMAT:
            raise ValueError("not a bastion policy")
        return SignedPolicy(policy=body["policy"], signatures=body.get("signatures") or {})
    except ValidationError as exc:
        raise ConfigError(
            f"{where}: {_first_error(exc, 'policy')}", "ask the policy's authors for a good copy"
        ) from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{where} is damaged or not a bastion policy", "copy it again from its authors") from None


def read_signed(path: Path) -> SignedPolicy:
    """Read a ``.bastion-policy`` file (bounded before it is buffered)."""
    try:
        data = read_bounded(path, MAX_POLICY_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"policy file not found: {path}") from None
    except OSError as exc:  # TooLarge, NotRegular
        raise ConfigError(f"cannot read policy {path}: {exc}", "a policy is a small regular file") from None
    return parse_signed(data, str(path))


def policy_from_yaml(path: Path) -> Policy:
    """``policy.yaml`` → Policy.  A ``public:`` may name a ``.pub`` file (relative to the YAML), dates may be
    plain YAML dates (midnight UTC) and datetimes without a zone are UTC."""
    import yaml

    try:
        data = yaml.safe_load(read_bounded(path, MAX_POLICY_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"policy file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a policy (a YAML mapping with version, expires, root, keys, rules)")
    data = _resolve(data, Path(path).parent)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc, 'policy')}", "see docs/security.md, trust policy") from None


def _resolve(value: Any, base: Path) -> Any:
    """YAML conveniences → the canonical JSON forms."""
    if isinstance(value, dict):
        out = {k: _resolve(v, base) for k, v in value.items()}
        pub = out.get("public")
        if isinstance(pub, str) and pub.endswith(".pub"):
            out["public"] = base64.b64encode(raw_public(load_public_key(base / pub))).decode()
        return out
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc).isoformat()
    return value
