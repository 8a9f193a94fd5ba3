"""The node's ZeroMQ face: ``events`` PUB and ``control`` ROUTER, CurveZMQ when configured.

Control requests are answered on one thread; a malformed request gets an error
reply and never disturbs anything else.  Publishing goes through one lock
because a ZeroMQ socket is not thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from bastion.edge.audit import AuditLog
from bastion.edge.config import NodeConfig
from bastion.edge.curve import allowed_client_keys, key_id, load_secret
from bastion.edge.protocol import HEARTBEAT_TOPIC, MAX_REQUEST_BYTES, DetectionEvent, Heartbeat, ProtocolError, \
    parse_request, reply

log = logging.getLogger(__name__)

Handler = Callable[[object], dict]


class _AllowList:
    """zmq.auth credentials provider: allowed client keys, every decision audited."""

    def __init__(self, keys: set[bytes], audit: AuditLog) -> None:
        self.keys = keys
        self.audit = audit
        self._seen: set[tuple[bytes, bool]] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if (key, allowed) not in self._seen:  # one record per key and outcome, not per reconnect
            self._seen.add((key, allowed))
            self.audit.append("client_accepted" if allowed else "client_refused", key_id=key_id(key))
            if not allowed:
                log.warning("refused CurveZMQ client", extra={"key_id": key_id(key)})
        return allowed


class NodeServer:
    def __init__(self, config: NodeConfig, handler: Handler, audit: AuditLog, last_seq: Callable[[], int]) -> None:
        self.config = config
        self.handler = handler
        self.audit = audit
        self.last_seq = last_seq
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.server_public: bytes | None = None
        self._pub_lock = threading.Lock()
        self._stop = threading.Event()
        self.requests = 0
        self.bad_requests = 0
        try:
            self.events = self.ctx.socket(zmq.PUB)
            self.events.sndhwm = 100_000
            self.events.linger = 0
            self.control = self.ctx.socket(zmq.ROUTER)
            self.control.linger = 0
            self.control.maxmsgsize = 4 * MAX_REQUEST_BYTES  # libzmq drops peers sending bigger frames
            if config.curve_enabled:
                self._secure()
            self.events.bind(config.endpoints.events)
            self.control.bind(config.endpoints.control)
        except zmq.ZMQError as exc:
            self.close()
            from bastion.errors import ConfigError

            raise ConfigError(f"cannot bind node endpoints ({exc})",
                              "is another node running, or is the address wrong?") from None
        self.events_endpoint = self.events.last_endpoint.decode()
        self.control_endpoint = self.control.last_endpoint.decode()
        self._threads = [threading.Thread(target=self._serve_control, name="node-control", daemon=True),
                         threading.Thread(target=self._heartbeat, name="node-heartbeat", daemon=True)]

    def _secure(self) -> None:
        public, secret = load_secret(self.config.security.server_secret_key)
        self.server_public = public
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("bastion.edge.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(
            "*", credentials_provider=_AllowList(allowed_client_keys(self.config.security.allowed_clients), self.audit))
        for sock in (self.events, self.control):
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    def start(self) -> None:
        for t in self._threads:
            t.start()

    @property
    def threads(self) -> list[threading.Thread]:
        """The server's worker threads, for the node's supervisor (a death must not go unnoticed)."""
        return list(self._threads)

    def publish(self, event: DetectionEvent) -> None:
        with self._pub_lock:
            self.events.send_multipart([event.topic(), event.to_wire()])

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            count, head = self.audit.head()  # a subscriber keeps the audit head: a cut-off tail shows later
            beat = Heartbeat(node=self.config.id, ts=time.time(), last_seq=self.last_seq(), audit_count=count,
                             audit_head=head)
            with self._pub_lock:
                try:
                    self.events.send_multipart([HEARTBEAT_TOPIC, beat.model_dump_json().encode()])
                except zmq.ZMQError:
                    return

    def _serve_control(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # socket closed during shutdown
            identity, payload = frames[0], frames[-1]
            self.requests += 1
            try:
                request = parse_request(payload) if len(frames) >= 2 else None
                if request is None:
                    raise ProtocolError("empty request")
                result = self.handler(request)
                if "stream" in result:  # several replies with the same id, the last one done=true
                    self._stream(identity, request.id, result["stream"])
                    continue
                answer = reply(request.id, **result)
            except ProtocolError as exc:
                self.bad_requests += 1
                answer = reply(None, ok=False, error=str(exc))
            except Exception as exc:  # a handler bug must not take the node down
                self.bad_requests += 1
                log.exception("control handler failed")
                answer = reply(None, ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
            try:
                self.control.send_multipart([identity, answer], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer went away; nothing to do

    def _stream(self, identity: bytes, request_id: object, pieces) -> None:  # noqa: ANN001
        count = 0
        try:
            for piece in pieces:
                count += 1
                self.control.send_multipart([identity, reply(request_id, text=piece, done=False)], zmq.NOBLOCK)
            final = reply(request_id, done=True, tokens=count)
        except zmq.ZMQError:
            return  # the client went away mid-answer
        except Exception as exc:  # a generation failure ends this answer, not the node
            log.exception("generation failed")
            final = reply(request_id, ok=False, error=f"generation failed: {exc}")
        try:
            self.control.send_multipart([identity, final], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_threads", []):
            if t.is_alive():
                t.join(timeout=2)
        if self.auth is not None:
            self.auth.stop()
        for name in ("events", "control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()
