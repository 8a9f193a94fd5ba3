"""The trust store: which public keys may sign the bundles this unit runs.

Two sources of keys: the built-in anchors shipped in ``models/anchors/`` (the
project zoo key) and keys the operator trusted, under
``BASTION_HOME/trust/keys``.  A revocation list (``trust/revoked.json``) beats
both, so a nation drops our anchor with ``bastion keys revoke <id>``.

The revocation list is created, empty, with the store itself; from then on a
*missing* list is not "nothing revoked" — deleting one file must not quietly
lift every revocation — so the store refuses to vouch for any key until the
list is restored from backup or deliberately started again with
``bastion keys reset-revocations --yes``.  Changes are appended to
``trust/audit.jsonl``, and that journal is checked against the list: a list
that lacks a key the journal says is revoked (an old backup put back, a line
deleted by hand) is refused the same way.  Lifting one revocation on purpose is
``bastion keys unrevoke ID --yes``, which the journal records.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.errors import ConfigError, KeyFileError, SignatureError
from bastion.models.atomic import append_record, atomic_write_bytes, file_lock
from bastion.models.home import bastion_home
from bastion.models.journal_fold import fold_journal
from bastion.models.keys import PUBLIC_SUFFIX, key_id, load_public_key, public_pem
from bastion.models.safe_read import NotRegular, TooLarge, read_bounded

ANCHORS_DIR = Path(__file__).resolve().parent / "anchors"
# Both files are read whole on every bundle load: bounded first (a list of ~20,000 revoked keys; ~200,000 changes).
MAX_REVOKED_BYTES = 4 * 2**20
MAX_JOURNAL_BYTES = 64 * 2**20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    source: str  # "built-in" or "local"
    path: Path
    revoked: bool = False


class TrustStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else bastion_home() / "trust"
        self.keys_dir = self.root / "keys"
        self.revoked_path = self.root / "revoked.json"
        self.lock_path = self.root / ".lock"
        self.audit_path = self.root / "audit.jsonl"

    # -- the revocation list -----------------------------------------------------------------------
    def _read_revoked(self) -> dict[str, dict] | None:
        """The list, or None when the file is missing; a damaged list is an error, never a guess."""
        try:
            data = json.loads(read_bounded(self.revoked_path, MAX_REVOKED_BYTES))
        except FileNotFoundError:
            return None
        # too large, not a regular file, nested too deep: damage, never a guess
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
            data = None
        revoked = data.get("revoked") if isinstance(data, dict) else None
        if not isinstance(revoked, dict):
            raise ConfigError(
                f"revocation list {self.revoked_path} is damaged",
                "restore it from backup; refusing to guess which keys are revoked",
            )
        return revoked

    def _is_new(self) -> bool:
        """Nothing of this store exists yet (at most the lock file of a first use running right now)."""
        return not self.root.is_dir() or all(p.name == ".lock" for p in self.root.iterdir())

    def _missing(self) -> SignatureError:
        return SignatureError(
            f"the revocation list {self.revoked_path} is missing; refusing to trust any key until it is back",
            "restore it from backup, or start an empty one with: bastion keys reset-revocations "
            "--yes (then revoke again what was revoked)",
        )

    def _ensure_list(self) -> None:
        """Create the empty list with a new store; refuse when an existing store has lost it.

        The verdict "missing" is only given under the store's lock: a first use running right now in
        another process has its temp file in ``trust/`` before the rename, and seen unlocked that half
        made store looks exactly like one that lost its list.
        """
        if os.path.lexists(self.revoked_path):  # a folder or FIFO there is damage, not "missing"
            return
        try:
            with file_lock(self.lock_path):
                if os.path.lexists(self.revoked_path):
                    return
                if not self._is_new():
                    log.error("revocation list missing: refusing every bundle", extra={"path": str(self.revoked_path)})
                    raise self._missing()
                self._write_revoked({})
                self._record("created")
        except OSError as exc:
            if not self._is_new():  # cannot lock a store that exists: refuse rather than guess
                log.error("revocation list missing: refusing every bundle", extra={"path": str(self.revoked_path)})
                raise self._missing() from exc
            # a read-only home that never had a store: nothing was ever revoked in it
            log.warning(
                "cannot create the trust store; using the built-in anchors only",
                extra={"path": str(self.root), "error": str(exc)},
            )

    def _write_revoked(self, revoked: dict[str, dict]) -> None:
        atomic_write_bytes(self.revoked_path, json.dumps({"revoked": revoked}, indent=2).encode())

    def record(self, event: str, strict: bool = False, **fields: str) -> None:
        """Append a change to ``trust/audit.jsonl`` (the policy store records its applies here too). ``strict``: a
        record that cannot be written raises (OSError) instead of being logged — for a change the journal must
        hold before it is made. The journal never grows past what its readers accept (``MAX_JOURNAL_BYTES``)."""
        if strict:
            append_record(self.audit_path, {"when": _now(), "event": event, **fields}, MAX_JOURNAL_BYTES)
        else:
            self._record(event, **fields)

    def _record(self, event: str, **fields: str) -> None:
        try:
            append_record(self.audit_path, {"when": _now(), "event": event, **fields}, MAX_JOURNAL_BYTES)
        except OSError as exc:
            log.error("cannot record a trust store change", extra={"event": event, "error": str(exc)})

    def _journal_revoked(self) -> dict[str, str]:
        """Key ids the journal says are revoked now (not since un-revoked or reset), with when."""
        try:
            return fold_journal(self.audit_path, MAX_JOURNAL_BYTES, revoked_by_journal)
        except FileNotFoundError:  # a store from before the journal: nothing to hold the list against
            return {}
        except (TooLarge, NotRegular) as exc:
            raise ConfigError(
                f"trust store journal {self.audit_path} is damaged ({exc})",
                "restore it from backup; refusing to guess which keys were revoked",
            ) from None
        except OSError as exc:
            log.warning("cannot read the trust store journal", extra={"path": str(self.audit_path), "error": str(exc)})
            return {}

    def _check_journal(self, revoked: dict[str, dict]) -> dict[str, dict]:
        lacking = {k: when for k, when in self._journal_revoked().items() if k not in revoked}
        if lacking:
            keys = ", ".join(f"{k} (revoked {when})" for k, when in sorted(lacking.items()))
            log.error("revocation list lacks revoked keys", extra={"keys": sorted(lacking)})
            raise SignatureError(
                f"the revocation list {self.revoked_path} lacks {keys}, per {self.audit_path}; "
                "refusing to trust any key",
                "it was put back from an older backup or edited: restore the current one or revoke "
                "them again (bastion keys revoke ID); to lift one on purpose: bastion keys unrevoke "
                "ID --yes",
            )
        return revoked

    # -- reading -----------------------------------------------------------------------------------
    def revoked(self) -> dict[str, dict]:
        self._ensure_list()
        revoked = self._read_revoked()
        if revoked is None and not self._is_new():
            raise self._missing()
        return self._check_journal(revoked or {})

    def keys(self) -> dict[str, TrustedKey]:
        return self._keys(self.revoked())

    def _keys(self, revoked: dict[str, dict]) -> dict[str, TrustedKey]:
        found: dict[str, TrustedKey] = {}
        for source, directory in (("built-in", ANCHORS_DIR), ("local", self.keys_dir)):
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
                public = load_public_key(path)
                kid = key_id(public)
                found[kid] = TrustedKey(kid, public, source, path, kid in revoked)
        return found

    def lookup(self, kid: str) -> TrustedKey | None:
        return self.keys().get(kid)

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked()

    # -- writing -----------------------------------------------------------------------------------
    def _revoked_locked(self) -> dict[str, dict]:
        """The list, read by a writer already holding the lock (which must not take it again)."""
        revoked = self._read_revoked()
        if revoked is None:
            raise self._missing()
        return revoked

    def trust(self, public_key_file: Path) -> str:
        public = load_public_key(public_key_file)
        kid = key_id(public)
        self._ensure_list()
        with file_lock(self.lock_path):
            if kid in self._check_journal(self._revoked_locked()):
                raise KeyFileError(
                    f"key {kid} was revoked on this unit", f"if that was a mistake: bastion keys unrevoke {kid} --yes"
                )
            atomic_write_bytes(self.keys_dir / f"{kid}{PUBLIC_SUFFIX}", public_pem(public))
            self._record("trusted", key_id=kid, source=str(public_key_file))
        return kid

    def resolve_id(self, prefix: str) -> str:
        matches = [k for k in self._keys({}) if k.startswith(prefix)]  # works while the list is being mended
        if len(matches) != 1:
            raise ConfigError(
                f"{'no' if not matches else 'more than one'} trusted key matches {prefix!r}", "see: bastion keys list"
            )
        return matches[0]

    def revoke(self, prefix: str, reason: str = "") -> str:
        """Revoke a key; also the way to mend a list that lacks keys its journal says are revoked."""
        kid = self.resolve_id(prefix)
        self._ensure_list()
        with file_lock(self.lock_path):
            revoked = self._revoked_locked()
            revoked[kid] = {"when": _now(), "reason": reason}
            self._write_revoked(revoked)
            self._record("revoked", key_id=kid, reason=reason)
        return kid

    def unrevoke(self, prefix: str) -> str:
        """Lift one revocation on purpose (recorded): the only way back that the journal check accepts."""
        with file_lock(self.lock_path):
            revoked = self._revoked_locked()
            matches = [k for k in revoked if k.startswith(prefix)]
            if len(matches) != 1:
                raise ConfigError(
                    f"{'no' if not matches else 'more than one'} revoked key matches {prefix!r}",
                    "see: bastion keys list",
                )
            del revoked[matches[0]]
            self._write_revoked(revoked)
            self._record("unrevoked", key_id=matches[0])
        log.warning("revocation lifted", extra={"key_id": matches[0]})
        return matches[0]

    def reset_revocations(self) -> None:
        """Start a new, empty revocation list after the old one was lost — the operator's deliberate choice
        (recorded), never something bastion does by itself. Refused while a list exists."""
        with file_lock(self.lock_path):
            current = self._read_revoked()
            if current is not None:
                raise ConfigError(
                    f"the revocation list {self.revoked_path} exists ({len(current)} revoked)",
                    "nothing to reset; to un-revoke a key, edit the list by hand",
                )
            self._write_revoked({})
            self._record("revocations_reset")
        log.warning("revocation list started again, empty", extra={"path": str(self.revoked_path)})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def revoked_by_journal(lines: list[str]) -> dict[str, str]:
    """Fold the journal's revoke/unrevoke/reset records into the key ids revoked now, with when."""
    state: dict[str, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        event = record.get("event") if isinstance(record, dict) else None
        if event == "revoked":
            state[str(record.get("key_id"))] = str(record.get("when", "?"))
        elif event == "unrevoked":
            state.pop(str(record.get("key_id")), None)
        elif event == "revocations_reset":
            state.clear()
    return state
