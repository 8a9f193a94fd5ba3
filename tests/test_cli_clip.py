"""``bastion node clip SEQ --out FILE`` (#18 item 6) against a real node on the vendored person clip (the node of
tests/test_clips.py): the video written whole and checked, --json metadata, and every way of not getting a clip
one line and exit 1, with no file left behind."""

import hashlib
import json

import cv2
import pytest

from bastion.cli import main
from bastion.edge.client import Client, NodeRequestError
from bastion.edge.node import Node
from conftest import run_cli
from test_clips import clip_node_config, clip_ready, kinds_stored, wait_for


def one_line_error(capsys, argv, *fragments):
    """The CLI in this process (a subprocess costs ~2 s of imports on a busy box; one below runs it for real)."""
    code = main(argv)
    got = capsys.readouterr()
    assert code == 1, (code, got.out, got.err)
    assert "Traceback" not in got.err and got.err.strip().startswith("error:"), got.err
    said = " ".join(got.err.split())
    for fragment in fragments:
        assert fragment in said, said


@pytest.mark.slow
def test_node_clip_writes_the_checked_video_and_says_why_when_there_is_none(tmp_path, capsys):
    node = Node(clip_node_config(tmp_path))
    node.start()
    client = Client(node.server.control_endpoint, timeout_s=10)
    control = ("--control", node.server.control_endpoint)
    try:
        seq = wait_for("a clip", lambda: clip_ready(node, client, ["line.cross"]))["line.cross"]
        wanted = client.clip(seq)

        target = tmp_path / "out" / "exit.avi"  # a folder that is not there yet is made
        shown = run_cli("node", "clip", str(seq), "--out", str(target), *control)
        assert shown.returncode == 0, shown.stderr
        assert hashlib.sha256(target.read_bytes()).hexdigest() == wanted.meta.sha256
        cap = cv2.VideoCapture(str(target))
        ok, image = cap.read()
        cap.release()
        assert ok and image.shape[:2] == (wanted.meta.height, wanted.meta.width)
        said = " ".join(shown.stdout.split())
        assert f"clip of event {seq} (line.cross, source cam1): {wanted.meta.frames} frames" in said, said
        assert str(target) in said.replace(" ", "") or "exit.avi" in said, said

        made = f"{tmp_path / 'made'}/"  # a trailing / is a folder, made if missing (it once wrote a file 'made')
        code = main(["node", "clip", str(seq), "--out", made, "--json", "--storage", str(tmp_path / "data")])
        meta = json.loads(capsys.readouterr().out)
        assert code == 0 and meta["seq"] == seq and meta["kind"] == "line.cross"
        assert meta["sha256"] == wanted.meta.sha256 and meta["size"] == len(wanted.data)
        assert meta["file"] == str(tmp_path / "made" / f"clip-{seq}.avi") and (tmp_path / "made").is_dir()
        assert client.clip(seq, out=tmp_path).meta == wanted.meta and (tmp_path / f"clip-{seq}.avi").is_file()

        news = kinds_stored(client)["object.new"]
        missing = tmp_path / "none.avi"
        clip = ["node", "clip", "--out", str(missing), *control]
        one_line_error(capsys, [*clip, str(news)], f"event {news} has no clip (clips are kept for object.end")
        one_line_error(capsys, [*clip, str(2**62)], f"no event {2**62} on this node")
        for no_seq in (str(10**30), "0"):  # refused before anything is sent (the node would refuse them too)
            one_line_error(capsys, [*clip, no_seq], f"seq={no_seq} is not an event seq")
        with pytest.raises(NodeRequestError, match=f"offset {2**63 - 1} is past the end of the clip of event {seq}"):
            client.request("clip", seq=seq, offset=2**63 - 1)
        with pytest.raises(NodeRequestError, match="clip: offset: Input should be less than or equal to"):
            client.request("clip", seq=seq, offset=2**64)
        with pytest.raises(NodeRequestError, match="clip: offset: Input should be greater than or equal to 0"):
            client.request("clip", seq=seq, offset=-1)
        (tmp_path / "a-file").write_text("not a folder")
        bad_out = ["node", "clip", str(seq), "--out", str(tmp_path / "a-file" / "x.avi"), *control]
        one_line_error(capsys, bad_out, f"cannot write the clip of event {seq}")
        assert not missing.exists() and not list(tmp_path.glob("**/.*.tmp"))  # nothing half-written
    finally:
        client.close()
        node.close()
    gone = ["node", "clip", "1", "--timeout", "0.5", *control]
    one_line_error(capsys, gone, "no answer from", "in 0.5 s (1 tries of 0.5 s)", "is the node running")


def test_node_clip_help_has_an_example():
    shown = run_cli("node", "clip", "--help")
    assert shown.returncode == 0 and "Example: bastion node clip" in shown.stdout, shown.stdout
    for option in ("--out", "--control", "--storage", "--server-key", "--client-key", "--json"):
        assert option in shown.stdout
