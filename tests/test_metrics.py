"""The Prometheus endpoint: scraped over real HTTP on 127.0.0.1; loopback-only unless the config says otherwise."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.edge.config import load_config
from bastion.edge.latency import LatencyHistogram
from bastion.edge.metrics import MetricsError, start_metrics
from bastion.errors import ConfigError

SOURCES = [{"name": "cam1", "uri": "clip.mp4"}]


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def one(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize("address", ["0.0.0.0:9108", "192.0.2.7:9108", "[::]:9108", "node.example:9108"])
def test_metrics_beyond_loopback_are_refused_at_config_load_in_one_line(address):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"sources": SOURCES, "metrics": address})
    assert "beyond loopback" in str(err.value) and "metrics_allow_remote" in str(err.value)
    assert "\n" not in str(err.value)
    allowed = load_config(None, {"sources": SOURCES, "metrics": address, "metrics_allow_remote": True})
    assert allowed.metrics == address


@pytest.mark.parametrize("address", ["127.0.0.1:9108", "localhost:9108", "[::1]:9108"])
def test_loopback_metrics_need_no_flag(address):
    assert load_config(None, {"sources": SOURCES, "metrics": address}).metrics == address


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"metrics": "9108"}, "HOST:PORT"),
        ({"metrics": "127.0.0.1:99999"}, "HOST:PORT"),
        ({"sinks": [{"type": "kafka"}]}, "'kafka'"),
        ({"sinks": [{"type": "mqtt"}, {"type": "mqtt"}]}, "unique"),
        ({"sinks": [{"type": "mqtt", "url": "nats://x"}]}, "url"),
        ({"sinks": [{"type": "nats", "url": "http://x"}]}, "url"),
        ({"sinks": [{"type": "mqtt", "tls": {"cert": "c.pem"}}]}, "tls.key"),
        ({"sinks": [{"type": "mqtt", "batch": 0}]}, "batch"),
    ],
)
def test_bad_sink_and_metrics_settings_are_one_line_at_config_load(extra, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"sources": SOURCES, **extra})
    assert says in str(err.value) and "\n" not in str(err.value)


def node_like_status(latency: LatencyHistogram) -> dict:
    return {
        "node": "n1",
        "state": "running",
        "bastion": "0.1.0",
        "uptime_s": 12.5,
        "model": {"name": "yolov5n", "version": "1", "sha256": "ab" * 32, "signer": "bastion-dev"},
        "sources": {
            "cam1": {
                "read": 40,
                "dropped": 3,
                "inferred": 37,
                "errors": 0,
                "reconnects": 2,
                "state": "running",
                "fps": 29.5,
                "queue": 1,
            }
        },
        "last_seq": 37,
        "published": 37,
        "storage_error": None,
        "threads": {"node-infer": {"alive": True, "error": None}},
        "audit": {"pending": 0},
        "sinks": {
            "hq": {
                "type": "mqtt",
                "state": "retrying",
                "backlog": 12,
                "lag_s": 4.5,
                "cursor": 25,
                "forwarded": 25,
                "skipped": 0,
                "reconnects": 1,
            }
        },
        "inference": {"latency": latency.as_dict()},
    }


def test_the_endpoint_serves_the_status_numbers_over_http(tmp_path):
    latency = LatencyHistogram()
    for seconds in (0.004, 0.02, 0.02, 0.3):
        latency.observe(seconds)
    status = node_like_status(latency)
    (tmp_path / "events.db").write_bytes(b"x" * 4096)
    server = start_metrics("127.0.0.1:0", lambda: status, tmp_path)
    try:
        samples = scrape(server.address)
        assert one(samples, "bastion_source_fps", source="cam1") == 29.5
        assert one(samples, "bastion_source_frames_dropped_total", source="cam1") == 3
        assert one(samples, "bastion_source_reconnects_total", source="cam1") == 2
        assert one(samples, "bastion_source_queue_depth", source="cam1") == 1
        assert one(samples, "bastion_events_total", kind="det") == 37
        assert one(samples, "bastion_sink_backlog_events", sink="hq", type="mqtt") == 12
        assert one(samples, "bastion_sink_lag_seconds", sink="hq", type="mqtt") == 4.5
        assert one(samples, "bastion_sink_connected", sink="hq", type="mqtt") == 0
        assert one(samples, "bastion_store_bytes") == 4096
        assert one(samples, "bastion_inference_latency_seconds_bucket", le="0.005") == 1
        assert one(samples, "bastion_inference_latency_seconds_bucket", le="0.025") == 3
        assert one(samples, "bastion_inference_latency_seconds_bucket", le="+Inf") == 4
        assert one(samples, "bastion_inference_latency_seconds_count") == 4
        info = [k for k in samples if k[0] == "bastion_node_info"]
        assert dict(info[0][1])["sha256"] == "ab" * 32 and dict(info[0][1])["signer"] == "bastion-dev"
        status["sources"]["cam1"]["read"] = 99  # read at each scrape: no copy of its own to go stale
        assert one(scrape(server.address), "bastion_source_frames_read_total", source="cam1") == 99
    finally:
        server.close()
    assert not server.alive


def test_a_status_that_raises_is_bastion_up_0_not_a_dead_endpoint(tmp_path):
    def broken() -> dict:
        raise RuntimeError("store closed")

    server = start_metrics("127.0.0.1:0", broken, None)
    try:
        assert one(scrape(server.address), "bastion_up") == 0
    finally:
        server.close()


def test_a_taken_port_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_metrics(f"127.0.0.1:{port}", dict, None)


def test_the_bridges_doc_example_is_a_valid_node_config(tmp_path):
    import re

    import yaml
    from conftest import REPO

    text = (REPO / "docs" / "bridges.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    config = load_config(None, yaml.safe_load(block))
    assert [s.type for s in config.sinks] == ["mqtt", "nats"] and config.metrics == "127.0.0.1:9108"
    assert config.sinks[1].tls.cert is not None and config.sinks[0].password_file is not None


def test_a_real_node_serves_its_own_numbers(tmp_path):
    from bastion.edge.node import Node
    from node_kit import one_camera_node_config

    config = one_camera_node_config(tmp_path, metrics="127.0.0.1:0")
    node = Node(config)
    node.start()
    try:
        address = node.status_dict()["metrics"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = scrape(address)
            if one(samples, "bastion_source_frames_inferred_total", source="cam1") >= 5:
                break
            time.sleep(0.2)
        status = node.status_dict()
        assert one(samples, "bastion_source_frames_inferred_total", source="cam1") >= 5
        assert one(samples, "bastion_inference_latency_seconds_count") >= 1
        assert one(samples, "bastion_thread_alive", thread="node-infer") == 1
        assert one(samples, "bastion_thread_alive", thread="node-metrics") == 1
        assert one(samples, "bastion_store_bytes") > 0
        info = dict(next(k for k in samples if k[0] == "bastion_node_info")[1])
        assert info["sha256"] == status["model"]["sha256"] == node.detector.bundle_sha256 and info["node"] == "n1"
    finally:
        node.close()
    with pytest.raises(OSError):  # closed with the node
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)


def test_sink_secret_and_certificate_paths_are_read_next_to_node_yaml(tmp_path):
    import yaml

    path = tmp_path / "conf" / "node.yaml"
    path.parent.mkdir()
    sink = {"type": "mqtt", "password_file": "mqtt-password", "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "c.key"}}
    path.write_text(yaml.safe_dump({"sources": SOURCES, "sinks": [sink, {"type": "nats", "password_file": "/abs/pw"}]}))
    config = load_config(path)
    mqtt, nats = config.sinks
    assert mqtt.password_file == path.parent / "mqtt-password" and mqtt.tls.key == path.parent / "c.key"
    assert mqtt.tls.ca == path.parent / "ca.pem" and str(nats.password_file) == "/abs/pw"
