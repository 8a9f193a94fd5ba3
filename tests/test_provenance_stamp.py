"""The one provenance stamp: the command as typed (shell-quoted, pasteable) and the UTC time."""

import re
import shlex
import sys

from bastion.models.provenance import stamp


def test_stamp_records_the_command_as_typed_and_utc_time(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/bastion", "distill", "detect", "--images", "my frames/"])
    got = stamp()
    assert set(got) == {"command", "created"}
    assert got["command"] == "bastion distill detect --images 'my frames/'"
    assert shlex.split(got["command"])[-1] == "my frames/"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["created"])
