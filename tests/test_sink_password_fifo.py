"""A sink's ``password_file`` that is a FIFO (#18 review): ``open`` alone blocks until a writer comes, so the sink
thread would wait for ever, silently. It is refused in one line (models/safe_read.py: opened non-blocking, checked
to be a regular file before anything is read) and shown as the sink's error in status, the thread alive."""

import os
import threading

import pytest

from bastion.edge.sink_base import SinkError, read_secret
from bastion.edge.sinks import sinks_status, start_sinks, stop_sinks
from test_sinks import NodeStub, wait_for
from test_sinks import store as store  # a fixture: pytest finds it by name


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "mqtt-password"
    os.mkfifo(path)
    return path


def test_a_fifo_password_file_is_one_line_not_a_read_that_never_returns(fifo):
    done = {}

    def read():
        try:
            read_secret(fifo)
        except SinkError as exc:
            done["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)  # a thread: a regression hangs it, not the test run
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_secret blocked on the FIFO"
    assert done["error"] == f"the password file {fifo} is not a regular file (a FIFO, device or directory)"


def test_a_sink_whose_password_file_is_a_fifo_shows_it_in_status_and_keeps_running(fifo, store):
    pytest.importorskip("paho.mqtt")
    node = NodeStub({"type": "mqtt", "port": 1, "username": "node", "password_file": str(fifo)})
    sinks = start_sinks(node, store)
    try:
        status = wait_for(lambda: (s := sinks_status(sinks)["mqtt"])["error"] and s, what="the error state")
        assert "is not a regular file" in status["error"] and "\n" not in status["error"], status
        assert status["state"] == "retrying" and sinks[0].alive
    finally:
        stop_sinks(sinks)
