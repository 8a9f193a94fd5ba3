"""Evidence clips are sealed in pieces (#18 review of item 6): the ``clip`` op serves a chunk by decrypting that
one piece (and the clip's small header), never the whole clip, and the pieces cannot be swapped with another
clip's, reordered, dropped or cut — each is refused in one line. Real files, the real AES-GCM (wrapped only to
count what it decrypts), the real op over a real node's control socket."""

import hashlib
import os
from types import SimpleNamespace

import pytest

from bastion.edge import snapshots
from bastion.edge.client import NodeRequestError
from bastion.edge.clip_client import fetch_clip
from bastion.edge.clip_meta import CLIP_CHUNK_BYTES, ClipMeta
from bastion.edge.clip_op import clip_answer
from bastion.edge.clip_store import ClipVault
from bastion.edge.snapshots import STREAM_HEADER, TAG_BYTES, SealedFiles, generate_key_file, load_key
from bastion.errors import BastionError


class CountingAESGCM:
    """The real AESGCM, counting the plaintext bytes of each decryption (what the review measured: work done)."""

    decrypted: list[int] = []

    def __init__(self, key):
        self._real = snapshots_real_aesgcm(key)

    def encrypt(self, nonce, data, aad):
        return self._real.encrypt(nonce, data, aad)

    def decrypt(self, nonce, data, aad):
        plain = self._real.decrypt(nonce, data, aad)
        CountingAESGCM.decrypted.append(len(plain))
        return plain


snapshots_real_aesgcm = snapshots.AESGCM


@pytest.fixture
def counting(monkeypatch):
    CountingAESGCM.decrypted = []
    monkeypatch.setattr(snapshots, "AESGCM", CountingAESGCM)
    return CountingAESGCM.decrypted


def meta_of(seq, video):
    return ClipMeta(
        seq=seq, kind="object.end", source="cam1", codec="mjpeg", container="avi", frames=3, width=8, height=8,
        fps=10.0, start_ts=1.0, end_ts=1.2, event_ts=1.1, size=len(video), sha256=hashlib.sha256(video).hexdigest(),
    )  # fmt: skip


def clip_of(size):
    return os.urandom(size)


@pytest.fixture
def vault(tmp_path):
    return ClipVault(tmp_path / "clips", load_key(generate_key_file(tmp_path / "k")), "n1")


def pieces(path):
    """(header, sealed head piece, [sealed data pieces]) of a clip file, cut where the format says."""
    blob = path.read_bytes()
    _, _, head_bytes, piece_bytes = STREAM_HEADER.unpack(blob[: STREAM_HEADER.size])
    at = STREAM_HEADER.size + head_bytes + TAG_BYTES
    step = piece_bytes + TAG_BYTES
    return (
        blob[: STREAM_HEADER.size],
        blob[STREAM_HEADER.size : at],
        [blob[i : i + step] for i in range(at, len(blob), step)],
    )


def refused_everywhere(vault, seq, says):
    """Loading the clip and serving each of its chunks: every way of reading it is the same one-line refusal."""
    for read in [lambda: vault.load(seq)] + [lambda at=at: vault.read_at(seq, at) for at in (0, 4 * 2**20, 8 * 2**20)]:
        with pytest.raises(BastionError, match=says) as caught:
            read()
        assert "\n" not in str(caught.value)


def test_a_clip_is_sealed_in_pieces_and_each_read_decrypts_one(vault, counting):
    video = clip_of(2 * CLIP_CHUNK_BYTES + 12345)
    path = vault.save(meta_of(7, video), video)
    header, head, data = pieces(path)
    assert header[0] == 2 and [len(p) - TAG_BYTES for p in data] == [CLIP_CHUNK_BYTES, CLIP_CHUNK_BYTES, 12345]
    assert video[:4096] not in path.read_bytes()  # sealed
    counting.clear()
    meta, chunk = vault.read_at(7, CLIP_CHUNK_BYTES)  # the second piece: the header and it, nothing else
    assert chunk == video[CLIP_CHUNK_BYTES : 2 * CLIP_CHUNK_BYTES] and meta.size == len(video)
    assert counting == [len(head) - TAG_BYTES, CLIP_CHUNK_BYTES]
    counting.clear()
    assert vault.read_at(7, 2 * CLIP_CHUNK_BYTES + 100)[1] == video[2 * CLIP_CHUNK_BYTES + 100 :]
    assert counting == [len(head) - TAG_BYTES, 12345]
    assert vault.load(7) == (meta, video)


def test_a_piece_from_another_clip_of_the_same_or_another_event_does_not_decrypt(vault):
    video = clip_of(2 * CLIP_CHUNK_BYTES + 10)
    first = vault.save(meta_of(7, video), video)
    header, head, data = pieces(first)
    vault.save(meta_of(8, video), video)  # the same video for another event
    other_event = pieces(vault.path(8))[2]
    first.rename(vault.dir / "keep")
    vault.save(meta_of(7, video), video)  # the same video again for event 7 (a store begun again, say)
    same_event = pieces(vault.path(7))[2]
    for other in (other_event, same_event):
        vault.path(7).write_bytes(header + head + data[0] + other[1] + data[2])
        assert vault.read_at(7, 0)[1] == video[:CLIP_CHUNK_BYTES]  # its own pieces still read ...
        for read in (lambda: vault.load(7), lambda: vault.read_at(7, CLIP_CHUNK_BYTES)):
            with pytest.raises(BastionError, match=r"^clip 000000000007.clip.enc does not decrypt .* piece 2\)$"):
                read()  # ... the spliced one is refused


def test_pieces_reordered_or_the_last_dropped_are_refused_in_one_line(vault):
    video = clip_of(2 * CLIP_CHUNK_BYTES + 10)
    header, head, data = pieces(vault.save(meta_of(7, video), video))
    vault.path(7).write_bytes(header + head + data[1] + data[0] + data[2])  # reordered
    for at in (0, CLIP_CHUNK_BYTES):
        with pytest.raises(
            BastionError, match=r"^clip 000000000007.clip.enc does not decrypt \(wrong key, or modified"
        ):
            vault.read_at(7, at)
    vault.path(7).write_bytes(header + head + data[0] + data[1])  # the last piece dropped: cut short
    refused_everywhere(vault, 7, r"^clip 000000000007.clip.enc does not hold the \d+ bytes its header says")
    vault.path(7).write_bytes(header + head + data[0] + data[1] + data[2] + data[0])  # grown by a piece
    refused_everywhere(vault, 7, r"^clip 000000000007.clip.enc does not hold the \d+ bytes its header says")
    vault.path(7).write_bytes(header + head + data[0] + data[1] + data[2][:-1])  # cut inside the last piece
    assert vault.read_at(7, 0)[1] == video[:CLIP_CHUNK_BYTES]  # each piece stands alone: the intact ones read
    for read in (lambda: vault.load(7), lambda: vault.read_at(7, 2 * CLIP_CHUNK_BYTES)):
        with pytest.raises(BastionError, match=r"^clip 000000000007.clip.enc does not decrypt .* piece 3\)$"):
            read()


def test_the_last_piece_flag_catches_a_stream_cut_at_a_piece_boundary(tmp_path):
    """The layout comes from the file's size, which no tag covers: a stream cut after piece 2 of 3 reads as one of
    2 pieces, and its new last piece was sealed as "not the last" — STREAM's final flag refuses it."""
    files = ClipVault(tmp_path / "s", bytes(32), "n1", piece_bytes=4096)
    path = files.seal_stream(5, b"head", os.urandom(3 * 4096), 4096)
    path.write_bytes(path.read_bytes()[: -(4096 + TAG_BYTES)])
    with SealedFiles.open_stream(files, 5) as stream:
        assert stream.pieces == 2 and stream.piece(0) == b"head" and len(stream.piece(1)) == 4096
        with pytest.raises(BastionError, match="does not decrypt .* piece 2"):
            stream.piece(2)


def test_a_clip_in_the_old_single_blob_format_is_refused_in_one_line(vault):
    video = clip_of(1000)
    for first_byte in (b"\x00", b"\x02"):  # v1 began with a random nonce: its first byte may even read as 2
        nonce = first_byte + os.urandom(11)
        plain = b"BCLIP1" + (4).to_bytes(4, "big") + b"{}  " + video
        vault.path(9).write_bytes(nonce + vault.aead.encrypt(nonce, plain, vault._aad(9)))
        with pytest.raises(BastionError) as caught:
            vault.read_at(9, 0)
        assert str(caught.value).startswith("clip 000000000009.clip.enc ") and "\n" not in str(caught.value)
        if first_byte == b"\x00":
            assert "is not in a format this node reads (written before clips were sealed in pieces" in str(caught.value)


def served_by(vault, seq, asked):
    """A client whose requests the real ``clip`` op answers, from a node that has ``vault``'s clips."""
    recorder = SimpleNamespace(vault=vault, recording=lambda s: False, outcome=lambda s: None)
    node = SimpleNamespace(clips=recorder, store=SimpleNamespace(last_seq=lambda: seq, first_seq=lambda: 1))

    def request(op, **fields):
        asked.append(fields)
        answer = clip_answer(node, **fields)
        if answer.get("ok") is False:
            raise NodeRequestError(answer["error"])
        return answer

    return SimpleNamespace(request=request)


def test_client_clip_reassembles_a_clip_whose_every_answer_decrypts_one_piece(vault, counting):
    video = clip_of(2 * CLIP_CHUNK_BYTES + 777)
    vault.save(meta_of(3, video), video)
    asked: list = []
    counting.clear()
    clip = fetch_clip(served_by(vault, 3, asked), 3)
    assert clip.data == video and clip.meta.sha256 == hashlib.sha256(video).hexdigest()
    assert asked == [{"seq": 3, "offset": at} for at in (0, CLIP_CHUNK_BYTES, 2 * CLIP_CHUNK_BYTES)]
    header = counting[0]
    assert header < 4096 and counting == [header, CLIP_CHUNK_BYTES, header, CLIP_CHUNK_BYTES, header, 777]
    header_file, head, data = pieces(vault.path(3))
    vault.path(3).write_bytes(header_file + head + data[0] + data[2] + data[1])
    with pytest.raises(NodeRequestError, match="does not decrypt"):
        fetch_clip(served_by(vault, 3, []), 3)
