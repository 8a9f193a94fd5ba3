"""The snapshot vault reads only what it could have written: a key file or a snapshot swapped for a FIFO, a huge
file or /dev/zero is refused with one line, never buffered whole (a client's `snapshot` op reaches load())."""

import os

import numpy as np
import pytest

from bastion.edge import snapshots
from bastion.edge.snapshots import SnapshotVault, generate_key_file, load_key
from bastion.errors import BastionError, KeyFileError


@pytest.fixture
def vault(tmp_path):
    key = load_key(generate_key_file(tmp_path / "snap.key"))
    return SnapshotVault(tmp_path / "snapshots", key, "node-a")


def test_round_trip_and_refusals(vault, monkeypatch):
    image = np.full((48, 64, 3), 120, np.uint8)
    vault.save(7, image)
    assert vault.load(7)[:2] == b"\xff\xd8"  # a JPEG
    with pytest.raises(BastionError, match="no snapshot for event 8"):
        vault.load(8)
    monkeypatch.setattr(snapshots, "MAX_SNAPSHOT_BYTES", 1024)
    vault.path(9).write_bytes(os.urandom(2048))
    with pytest.raises(BastionError, match="cannot be read"):
        vault.load(9)
    os.mkfifo(vault.path(10))  # would block open() forever without O_NONBLOCK + fstat
    with pytest.raises(BastionError, match="cannot be read"):
        vault.load(10)


@pytest.mark.parametrize("kind", ["fifo", "huge", "devzero"])
def test_key_file_that_is_not_a_small_file_is_refused(tmp_path, kind):
    path = tmp_path / "snap.key"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        path.write_text("00" * 32 + "\n" + " " * 100_000)
    else:
        path = "/dev/zero"
    with pytest.raises(KeyFileError, match="256-bit hex key"):
        load_key(path)
