"""The MQTT sink (paho-mqtt): QoS 1 to ``<prefix>/<node>/<kind>/<source>``, and a retained node status.

Each connection is a fresh client with a clean session: what the broker had not acknowledged when the link
dropped is sent again from the store's cursor, so paho's own queue never has to survive anything. The
retained ``<prefix>/<node>/status`` says ``online`` after login and ``offline`` at a clean stop; the broker
publishes the same ``offline`` (the will) when the node vanishes without one.
"""

from __future__ import annotations

import json
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bastion.edge.sink_base import Sink, SinkError, read_secret, register_sink

ACK_CHECK_S = 0.1  # how often a wait for acknowledgements looks at the connection and at stop


@register_sink("mqtt")
class MqttSink(Sink):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._client: mqtt.Client | None = None
        self._connack = threading.Event()
        self._refused: str | None = None
        self._lost = threading.Event()

    @property
    def status_topic(self) -> str:
        return f"{self.config.topic_prefix}/{self.node}/status"

    def _status_payload(self, state: str) -> str:
        return json.dumps({"node": self.node, "state": state, "ts": time.time()})

    def connect(self) -> None:
        cfg = self.config
        client_id = cfg.client_id or f"bastion-{self.node}-{self.name}"[:23]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        client.max_inflight_messages_set(cfg.max_in_flight)
        client.max_queued_messages_set(cfg.batch + 1)  # bounded: one batch and the status message
        if cfg.username is not None:
            client.username_pw_set(cfg.username, read_secret(cfg.password_file))
        if cfg.tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                    certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                    keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise SinkError(f"cannot load the MQTT TLS files: {exc}") from None
        client.will_set(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.connect_timeout = cfg.connect_timeout_s
        self._connack.clear()
        self._lost.clear()
        self._refused = None
        self._client = client
        port = cfg.port or (8883 if cfg.tls is not None else 1883)
        try:
            client.connect(cfg.host, port, keepalive=cfg.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise SinkError(f"cannot reach the MQTT broker {cfg.host}:{port}: {exc}") from None
        client.loop_start()
        deadline = time.monotonic() + cfg.connect_timeout_s
        while not self._connack.wait(0.02) and not self._lost.is_set() and time.monotonic() < deadline:
            if self._stop.is_set():
                raise SinkError("the sink is stopping")
        if self._lost.is_set() and not self._connack.is_set():
            tls = " (TLS: does it want a client certificate, or another CA?)" if cfg.tls is not None else ""
            raise SinkError(f"the MQTT broker {cfg.host}:{port} closed the connection before the login{tls}")
        if not self._connack.is_set():
            raise SinkError(f"the MQTT broker {cfg.host}:{port} did not answer the login in {cfg.connect_timeout_s} s")
        if self._refused:
            raise SinkError(f"the MQTT broker {cfg.host}:{port} refused the login: {self._refused}")
        info = client.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)
        self._wait([info], cfg.ack_timeout_s)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._lost.set()

    def publish(self, rows: list[tuple[int, str, str, str]]) -> int:
        """The whole batch goes to paho at once: it keeps ``max_in_flight`` on the wire and queues the rest
        (bounded: ``max_queued_messages`` is one batch), so acknowledgements stream back without a pause per
        window. The result is the longest acknowledged prefix."""
        client = self._client
        assert client is not None
        infos = []
        for seq, kind, source, payload in rows:
            topic = f"{self.config.topic_prefix}/{self.node}/{kind}/{source}"
            infos.append((seq, client.publish(topic, payload, qos=1)))
        windows = -(-len(rows) // self.config.max_in_flight)
        done = self._wait([i for _, i in infos], self.config.ack_timeout_s * windows, partial=True)
        acked = rows[0][0] - 1
        for (seq, _), ok in zip(infos, done):
            if not ok:
                break
            acked = seq
        if acked < rows[0][0]:
            raise SinkError(self._why_not_acked())
        return acked

    def _why_not_acked(self) -> str:
        if self._lost.is_set():
            return "the MQTT broker dropped the connection"
        return f"the MQTT broker did not acknowledge in {self.config.ack_timeout_s} s"

    def _wait(self, infos: list, timeout: float, partial: bool = False) -> list[bool]:
        """Wait until each message is acknowledged, the connection drops, or ``timeout`` passes.

        Each wait ends at its PUBACK (paho notifies the message's own condition), not at a poll tick: the
        round — and so the cursor's commit — follows the broker. A dropped link or a stop is noticed within
        ``ACK_CHECK_S``."""
        deadline = time.monotonic() + timeout
        for info in infos:
            if not self._until_acked(info, deadline):
                break
        done = [_acked(i) for i in infos]
        if not partial and not all(done):
            raise SinkError(self._why_not_acked())
        return done

    def _until_acked(self, info: mqtt.MQTTMessageInfo, deadline: float) -> bool:
        while not _acked(info):
            left = deadline - time.monotonic()
            if self._lost.is_set() or self._stop.is_set() or left <= 0 or not _wait_ack(info, min(left, ACK_CHECK_S)):
                return False
        return True

    def disconnect(self, clean: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if clean and not self._lost.is_set():
                info = client.publish(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
                self._wait([info], min(2.0, self.config.ack_timeout_s), partial=True)
                client.disconnect()
        finally:
            client.loop_stop()
            sock = client.socket()
            if sock is not None:
                sock.close()


def _wait_ack(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    """Block until ``info`` is acknowledged or ``timeout`` passes; False when paho will never send it."""
    try:
        info.wait_for_publish(timeout)
    except (ValueError, RuntimeError):
        return False
    return True


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    """paho raises for a message it could not queue (no connection, queue full): not acknowledged, then."""
    try:
        return info.is_published()
    except (ValueError, RuntimeError):
        return False
