"""The trust policy in force on this unit: ``BASTION_HOME/trust/policy.bastion-policy``.

Applying a policy (``bastion policy apply FILE``, e.g. from a USB stick) checks, in order: its own root's
threshold of signatures; its expiry; that its version is newer than the one in force (anti-rollback); and the
threshold of the *old* root's signatures, so whoever holds one stolen root key cannot replace the coalition's
root.  A unit's first policy has no old root: the operator confirms the new root's fingerprint (from
``bastion policy show FILE``) with ``--first-root``, the way a TUF client ships its first root.

Each apply is written atomically and recorded in ``trust/audit.jsonl``.  The journal is what the file is held
against at every bundle load: a deleted policy file, or an older (validly signed) one copied back over the current
one, is refused rather than silently falling back — the same rule as the revocation list.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os

from bastion.errors import BastionError, ConfigError, SignatureError
from bastion.models.atomic import LockTimeout, atomic_write_bytes, file_lock
from bastion.models.journal_fold import fold_journal
from bastion.models.policy import MAX_POLICY_BYTES, POLICY_SUFFIX, SignedPolicy, parse_signed
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded
from bastion.models.trust import MAX_JOURNAL_BYTES, TrustStore

POLICY_FILE = "policy" + POLICY_SUFFIX
LOCK_WAIT_S = 10.0  # how long a reader waits out an apply holding the store's lock before refusing
MIN_FINGERPRINT = 16  # hex digits of the root fingerprint an operator must confirm
log = logging.getLogger(__name__)


class PolicyStore:
    def __init__(self, trust: TrustStore | None = None) -> None:
        self.trust = trust or TrustStore()
        self.path = self.trust.root / POLICY_FILE

    def _journal_last(self) -> dict:
        """The journal's record of the highest policy version applied here ({} when never): version, sha256, root.

        It is what a unit whose policy file was lost or replaced can still be held to, so that putting the current
        policy back (or a newer one from the same root) is possible without ever letting an older one in."""
        try:
            return fold_journal(self.trust.audit_path, MAX_JOURNAL_BYTES, last_policy_applied)
        except FileNotFoundError:
            return {}
        except (TooLarge, NotRegular) as exc:
            raise ConfigError(f"trust store journal {self.trust.audit_path} is damaged ({exc})") from None
        except OSError as exc:  # unreadable to this user: the policy in force cannot be held to it, so none is
            raise SignatureError(
                f"cannot read the trust store journal {self.trust.audit_path}: {exc.strerror or exc}",
                "run as the unit's user (the one that owns BASTION_HOME), or fix the file's permissions",
            ) from None

    def journal_version(self) -> int:
        """The highest policy version the journal says was applied here (0: never)."""
        return int(self._journal_last().get("version", 0))

    def current(self, locked: bool = False) -> SignedPolicy | None:
        """The policy on file, checked against its own root and the journal (not its expiry), or None.

        The file must be the very policy the journal records as applied last (its sha256): a validly signed policy
        copied into ``trust/`` by hand — an older one, or a newer one from a root this unit never confirmed — was
        never through ``apply``'s checks and is refused. A refusal is read again once under the store's shared lock
        (``locked``: the caller holds the lock already): an apply writes the file, then its journal line, under
        that lock, and a reader between the two waits it out (at most ``LOCK_WAIT_S``) rather than refuse every
        bundle."""
        try:
            return self._read_current()
        except SignatureError:
            if locked or not self.trust.lock_path.exists():  # no lock file: no apply ever ran here
                raise
        try:
            with file_lock(self.trust.lock_path, shared=True, timeout_s=LOCK_WAIT_S):
                return self._read_current()
        except LockTimeout:
            raise SignatureError(
                f"the trust policy on file and {self.trust.audit_path} disagree and a policy apply has held the "
                f"trust store's lock for over {LOCK_WAIT_S:.0f} s; refusing every bundle",
                "let the apply finish, or stop it and apply the policy again: bastion policy apply FILE",
            ) from None
        except OSError as exc:  # the lock cannot be taken (unreadable, not a file): read once more without it
            log.warning("cannot take the trust store's lock: %s", exc)
            return self._read_current()

    def _read_current(self) -> SignedPolicy | None:
        last = self._journal_last()
        recorded = int(last.get("version", 0))
        try:
            data = read_bounded(self.path, MAX_POLICY_BYTES)
        except FileNotFoundError:
            if recorded:
                raise SignatureError(
                    f"the trust policy {self.path} is missing (v{recorded} was applied, per {self.trust.audit_path}); "
                    "refusing every bundle",
                    "apply the current policy again: bastion policy apply FILE.bastion-policy",
                ) from None
            return None
        except OSError as exc:
            raise SignatureError(f"cannot read the trust policy {self.path}: {exc}") from None
        try:
            signed = parse_signed(data, str(self.path))
            signed.check_threshold(signed.policy.root, "its own")
        except BastionError as exc:  # edited or damaged on this unit: every bundle is refused, never guessed
            raise SignatureError(
                f"the trust policy on this unit is damaged or was edited ({exc.message}); refusing every bundle",
                "apply the current policy again: bastion policy apply FILE.bastion-policy",
            ) from None
        if signed.policy.version < recorded:
            raise SignatureError(
                f"the trust policy on file is v{signed.policy.version} but v{recorded} was applied here "
                "(an old copy put back, or an apply that did not finish); refusing every bundle",
                "apply the current policy again: bastion policy apply FILE.bastion-policy",
            )
        if signed.policy.sha256() != last.get("sha256"):
            applied = f"v{recorded} (sha256 {last['sha256'][:16]}…)" if recorded else "no policy"
            raise SignatureError(
                f"the trust policy on file (v{signed.policy.version}, sha256 {signed.policy.sha256()[:16]}…) is not "
                f"the one applied here: {self.trust.audit_path} records {applied} (put there by hand, or an "
                "apply that did not finish); refusing every bundle",
                "apply the policy this unit should run: bastion policy apply FILE.bastion-policy",
            )
        return signed

    def in_force(self) -> SignedPolicy | None:
        """The policy bundle verification must follow (None: none applied, the trust store rules), or refuse."""
        signed = self.current()
        if signed is not None and signed.policy.expired():
            raise SignatureError(
                f"the trust policy v{signed.policy.version} expired {signed.policy.expires.isoformat()}; "
                "refusing every bundle",
                "apply a newer policy from the coalition: bastion policy apply FILE.bastion-policy",
            )
        return signed

    def apply(self, new: SignedPolicy, first_root: str | None = None) -> SignedPolicy | None:
        """Install ``new`` after every check; returns the policy it replaced (None for a first policy)."""
        policy = new.policy
        new.check_threshold(policy.root, "its own")
        if policy.expired():
            raise SignatureError(
                f"policy v{policy.version} expired {policy.expires.isoformat()}", "ask for a current policy"
            )
        self.trust.revoked()  # a store that has lost its revocation list refuses changes too
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.trust.lock_path))
            except OSError as exc:
                raise SignatureError(
                    f"cannot lock the trust store ({exc.filename or self.trust.lock_path}: {exc.strerror or exc})",
                    "it must be a regular file this user can write; fix or remove it",
                ) from None
            return self._apply_locked(new, first_root)
        raise AssertionError("unreachable")  # the with block returns or raises

    def _apply_locked(self, new: SignedPolicy, first_root: str | None) -> SignedPolicy | None:
        """``apply``'s checks and install, with the store's lock held."""
        policy, restored = new.policy, False
        try:
            old = self.current(locked=True)
        except SignatureError:  # the file in force is lost, damaged, old or dropped in: hold it to the journal
            recorded = self._journal_last()
            old, restored = None, bool(recorded)
            if recorded:
                self._check_restore(new, recorded)
            # else no policy was ever applied here: the new root is confirmed as a first one, below
        if old is not None:
            if policy.version <= old.policy.version:
                raise SignatureError(
                    f"policy v{policy.version} is not newer than v{old.policy.version} in force here "
                    "(a replayed old policy?)",
                    "apply a newer version; a unit never goes back",
                )
            new.check_threshold(old.policy.root, f"v{old.policy.version}'s (the old)")
        elif not restored:
            self._check_first_root(new, first_root)
        # The file, then its journal line, both under the lock; a reader between the two waits on the lock
        # (current). A journal line that cannot be written (full disk) puts the old file back by rename — kept
        # as a hard link, which needs no free space — so a failed apply changes nothing. A crash between the
        # two leaves a file the journal does not name: refused until applied again (the restore path).
        try:
            self._install(new, restored)
        except OSError as exc:
            raise SignatureError(
                f"cannot apply policy v{policy.version}: {exc.filename or self.trust.root}: {exc.strerror or exc}; "
                "the policy in force is unchanged",
                "free disk space or fix permissions, then apply the same file again",
            ) from None
        log.info("trust policy applied", extra={"version": policy.version, "sha256": policy.sha256()})
        return old

    def _install(self, new: SignedPolicy, restored: bool) -> None:
        """Write ``new`` over the policy file and record it in the journal, or leave both as they were."""
        policy = new.policy
        previous = self.path.with_name(f".{self.path.name}.previous")
        previous.unlink(missing_ok=True)
        had = self.path.exists()
        if had:
            os.link(self.path, previous)
        try:
            atomic_write_bytes(self.path, new.to_bytes())
            try:
                self.trust.record(
                    "policy_applied",
                    strict=True,
                    version=str(policy.version),
                    sha256=policy.sha256(),
                    root=policy.root.fingerprint(),
                    expires=policy.expires.isoformat(),
                    **({"restored": "true"} if restored else {}),
                )
                if self._journal_last().get("sha256") != policy.sha256():  # read back: the journal must name it
                    raise OSError(
                        errno.EIO, "the journal does not read back the line just written", str(self.trust.audit_path)
                    )
            except OSError:
                if had:
                    os.replace(previous, self.path)
                else:
                    self.path.unlink(missing_ok=True)
                raise
        finally:
            previous.unlink(missing_ok=True)

    def _check_restore(self, new: SignedPolicy, recorded: dict) -> None:
        """Allow, over a lost or replaced policy file, only the version the journal records or a newer one that
        the same root signed: the old root's threshold cannot be checked without the old policy's keys."""
        policy, version = new.policy, int(recorded["version"])
        if policy.version < version:
            raise SignatureError(
                f"policy v{policy.version} is older than v{version} applied here (a replayed old policy?)",
                f"apply v{version} again (sha256 {recorded['sha256'][:16]}…) or a newer one; a unit never goes back",
            )
        if policy.version == version and policy.sha256() != recorded["sha256"]:
            raise SignatureError(
                f"policy v{version} has sha256 {policy.sha256()[:16]}…, but the v{version} applied here had "
                f"{recorded['sha256'][:16]}… (another policy under the same version)",
                f"apply the v{version} this unit had (sha256 {recorded['sha256'][:16]}…) or a newer one",
            )
        if policy.version > version and policy.root.fingerprint() != recorded["root"]:
            raise SignatureError(
                f"policy v{policy.version} has another root than v{version} applied here, and the old root's "
                f"signatures cannot be checked while v{version}'s file is lost",
                f"apply v{version} again first (sha256 {recorded['sha256'][:16]}…), then v{policy.version}",
            )

    def _check_first_root(self, new: SignedPolicy, first_root: str | None) -> None:
        fingerprint = new.policy.root.fingerprint()
        if not first_root:
            raise ConfigError(
                f"this unit has no trust policy yet: confirm the new root (fingerprint {fingerprint[:16]}…) "
                "against the one your coalition published",
                f"then: bastion policy apply FILE --first-root {fingerprint[:16]}",
            )
        wanted = first_root.strip().lower()
        if len(wanted) < MIN_FINGERPRINT or not fingerprint.startswith(wanted):
            raise SignatureError(
                f"the policy's root fingerprint is {fingerprint[:16]}…, not {first_root!r} "
                f"(give at least {MIN_FINGERPRINT} hex digits)",
                "do not apply a policy whose root you cannot confirm",
            )


def last_policy_applied(lines: list[str]) -> dict:
    """Fold the journal's ``policy_applied`` records into the highest version applied: version, sha256, root."""
    last: dict = {}
    for line in lines:
        if '"policy_applied"' not in line:  # a cheap filter before parsing; the event itself is checked below
            continue
        try:
            record = json.loads(line)
            if record.get("event") != "policy_applied":
                continue
            version = int(record.get("version", 0))
        except (json.JSONDecodeError, RecursionError, ValueError, TypeError, AttributeError):
            continue
        if version >= last.get("version", 1):
            last = {"version": version, "sha256": str(record.get("sha256", "")), "root": str(record.get("root", ""))}
    return last
