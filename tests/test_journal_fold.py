"""The trust journal is folded once per change to it: a re-check that finds it unchanged does not re-parse it,
and every kind of change (append, replacement) or fault (missing, FIFO, too large) is seen at the next check."""

from __future__ import annotations

import os

import pytest

from bastion.models.journal_fold import fold_journal
from bastion.models.safe_read import NotRegular, TooLarge
from bastion.models.trust import revoked_by_journal


class CountingFold:
    def __init__(self) -> None:
        self.calls = 0
        self.__qualname__ = f"CountingFold{id(self)}"  # one cache entry per instance

    def __call__(self, lines: list[str]) -> dict:
        self.calls += 1
        return {"lines": list(lines)}


def test_an_unchanged_journal_is_folded_once_and_each_change_is_folded_again(tmp_path):
    journal = tmp_path / "audit.jsonl"
    journal.write_text('{"event": "trusted"}\n')
    fold = CountingFold()
    first = fold_journal(journal, 1024, fold)
    first["lines"].append("the caller's copy")  # a caller mutating its result never reaches the cache
    assert fold_journal(journal, 1024, fold) == {"lines": ['{"event": "trusted"}']}
    assert fold.calls == 1

    with journal.open("a") as fh:
        fh.write('{"event": "revoked"}\n')
    assert fold_journal(journal, 1024, fold)["lines"][-1] == '{"event": "revoked"}'
    assert fold.calls == 2

    replacement = tmp_path / "other.jsonl"
    replacement.write_text(journal.read_text().replace("revoked", "reset__"))  # same size, new inode
    os.replace(replacement, journal)
    assert fold_journal(journal, 1024, fold)["lines"][-1] == '{"event": "reset__"}'
    assert fold.calls == 3


def test_faults_are_raised_at_every_check_never_remembered(tmp_path):
    journal = tmp_path / "audit.jsonl"
    journal.write_text("x\n")
    fold = CountingFold()
    fold_journal(journal, 1024, fold)
    journal.unlink()
    with pytest.raises(FileNotFoundError):
        fold_journal(journal, 1024, fold)
    os.mkfifo(journal)
    with pytest.raises(NotRegular):
        fold_journal(journal, 1024, fold)
    journal.unlink()
    journal.write_bytes(b"y" * 2000)
    with pytest.raises(TooLarge):
        fold_journal(journal, 1024, fold)
    assert fold.calls == 1


def test_the_revocation_fold_follows_revoke_unrevoke_and_reset():
    lines = [
        '{"event": "revoked", "key_id": "a", "when": "t1"}',
        '{"event": "revoked", "key_id": "b", "when": "t2"}',
        "not json",
        '{"event": "unrevoked", "key_id": "a"}',
        '{"event": "revocations_reset"}',
        '{"event": "revoked", "key_id": "c", "when": "t3"}',
    ]
    assert revoked_by_journal(lines) == {"c": "t3"}
    assert revoked_by_journal(lines[:2]) == {"a": "t1", "b": "t2"}
