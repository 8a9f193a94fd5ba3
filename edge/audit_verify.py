"""Checking an audit log: the hash chain, the node's signed checkpoints, and a head known from elsewhere.

Three questions, three kinds of evidence:

* was a record edited, removed, reordered or inserted? — the chain (always checked);
* did anyone without the node key append to it, or rewrite it whole? — the checkpoints (``key`` given): every
  checkpoint must verify with that key, and every record must sit before one;
* was the tail cut off, checkpoints and all? — a head someone kept (``expect_count``/``expect_head`` from a
  heartbeat or ``status``) must still be in the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.edge.audit import CHECKPOINT, GENESIS, _digest, checkpoint_message, read_record_line


@dataclass
class AuditVerification:
    ok: bool
    records: int
    first_bad: int | None = None
    reason: str = ""
    head: str = GENESIS
    checkpoints: int = 0
    last_checkpoint: int | None = None
    unanchored: int = 0  # records after the last checkpoint
    keys: list[str] = field(default_factory=list)  # key ids that signed checkpoints


class _Broken(Exception):
    def __init__(self, index: int | None, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _check_checkpoint(record: dict, key: Ed25519PublicKey | None, result: AuditVerification) -> None:
    index, f = record["i"], record.get("fields") or {}
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(f["pub"]))
        signature = bytes.fromhex(f["sig"])
    except (KeyError, TypeError, ValueError):
        raise _Broken(index, f"record {index} is a checkpoint without a readable key and signature") from None
    if f.get("count") != index or f.get("head") != record.get("prev"):
        raise _Broken(index, f"record {index}: checkpoint does not describe the chain it sits in")
    if key is not None:
        given = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != given:
            raise _Broken(
                index,
                f"record {index}: checkpoint signed by another key ({f.get('key_id')}), not the "
                "node key given (the log was rewritten, or the node's key was replaced)",
            )
    try:
        pub.verify(signature, checkpoint_message(index, record["prev"]))
    except InvalidSignature:
        raise _Broken(index, f"record {index}: checkpoint signature does not verify (forged or altered)") from None
    if f.get("key_id") not in result.keys:
        result.keys.append(f.get("key_id"))
    result.checkpoints += 1
    result.last_checkpoint = index


def _scan(path: Path, key: Ed25519PublicKey | None, result: AuditVerification, expect_count: int | None) -> str | None:
    """Walk the chain; return the hash of record ``expect_count - 1`` when there is one."""
    prev, known = GENESIS, None
    with open(path, "rb") as fh:
        lineno = -1
        while True:
            line, overlong = read_record_line(fh)  # bounded: a 2 GB line is never held in memory
            if not line:
                break
            lineno += 1
            if overlong:
                raise _Broken(lineno, f"line {lineno + 1} is not an audit record (longer than any record)")
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                raise _Broken(
                    result.records,
                    f"line {lineno + 1} is a torn record (an unfinished write); the "
                    "node cuts it off, and records that, at its next start",
                )
            try:
                record = json.loads(line)
                claimed, index = record["hash"], record["i"]
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
                raise _Broken(lineno, f"line {lineno + 1} is not an audit record") from None
            if index != result.records:
                raise _Broken(
                    lineno,
                    f"record {lineno + 1} has index {index}, expected {result.records} (records removed or reordered)",
                )
            if record.get("prev") != prev:
                raise _Broken(
                    index,
                    f"record {index} does not chain to record {index - 1} (a record before it was changed or removed)",
                )
            if _digest(record) != claimed:
                raise _Broken(index, f"record {index} was modified (hash mismatch)")
            if record.get("kind") == CHECKPOINT:
                _check_checkpoint(record, key, result)
            prev, result.records, result.head = claimed, result.records + 1, claimed
            if expect_count is not None and result.records == expect_count:
                known = claimed
    return known


def verify_audit_log(
    path: Path, key: Ed25519PublicKey | None = None, expect_count: int | None = None, expect_head: str | None = None
) -> AuditVerification:
    """The verdict on ``path``; with ``key``, unanchored records fail; with a known head, a cut tail fails."""
    path = Path(path)
    if not path.is_file():
        return AuditVerification(False, 0, 0, f"audit log not found: {path}")
    result = AuditVerification(True, 0)
    try:
        known = _scan(path, key, result, expect_count)
    except _Broken as broken:
        result.ok, result.first_bad, result.reason = False, broken.index, broken.reason
        return result
    if result.last_checkpoint is not None:
        result.unanchored = result.records - result.last_checkpoint - 1
    if expect_count is not None:
        if result.records < expect_count:
            return _fail(
                result,
                result.records,
                f"truncated after record {result.records - 1}: the known head "
                f"(record {expect_count - 1}, {(expect_head or '?')[:16]}…) is "
                "missing",
            )
        if expect_head is not None and known != expect_head:
            return _fail(
                result,
                expect_count - 1,
                f"record {expect_count - 1} is not the known head {expect_head[:16]}… (the log was rewritten)",
            )
    if key is not None:
        if result.checkpoints == 0:
            return _fail(
                result,
                0,
                "no checkpoint signed by the node key: nothing anchors this log (rewritten, "
                "or written before checkpoints existed)",
            )
        if result.unanchored:
            first = result.last_checkpoint + 1
            return _fail(
                result,
                first,
                f"records {first}..{result.records - 1} after the last signed checkpoint "
                f"(#{result.last_checkpoint}) are not anchored: appended without the node "
                "key — or the node is running or stopped uncleanly; verify again after its "
                "next checkpoint",
            )
    return result


def _fail(result: AuditVerification, index: int, reason: str) -> AuditVerification:
    result.ok, result.first_bad, result.reason = False, index, reason
    return result
