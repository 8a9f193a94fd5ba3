"""The node's ZeroMQ face: ``events`` PUB and ``control`` ROUTER, CurveZMQ when configured.

Control requests are answered on one thread; a malformed request gets an error
reply and never disturbs anything else.  Work that takes long (``ask``'s
generation, ``reload``'s unpack and verify) is validated there and then runs in
a lane of its own (edge/control_lanes.py), so ``status`` and ``replay`` are
answered while it runs.  Every cost a client can cause is
bounded before it is paid (docs/protocol.md "Limits"): a request is received
frame by frame and refused by total size and frame count without being kept,
each client spends tokens from its own bucket, refusals are audited coalesced,
and a client's bad input is answered in one line and never logged as a
traceback.  Publishing goes through one lock because a ZeroMQ socket is not
thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from bastion.edge.audit import AuditLog
from bastion.edge.config import NodeConfig
from bastion.edge.control_lanes import Deferred, Job, Lane, Outbox
from bastion.edge.control_receive import NO_USER_ID, Incoming, receive_bounded
from bastion.edge.curve import key_id, load_secret
from bastion.edge.curve_allow import AllowList, client_roles
from bastion.edge.limits import BUSY_BURST_S, BUSY_SHARE, RateLimiter, RefusalCoalescer, clip
from bastion.edge.protocol import (
    HEARTBEAT_TOPIC,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_FRAMES,
    DetectionEvent,
    Heartbeat,
    ProtocolError,
    parse_request,
    json_or_none,
    readable_id,
    reply,
)
from bastion.edge.roles import NO_CURVE_ROLE, Role

log = logging.getLogger(__name__)

Handler = Callable[..., "dict | Deferred"]  # handler(request, client_label, role) -> reply fields, or work for a lane
PEEK_ID_BYTES = 4096  # a rate-limited request this small is parsed for its id; a larger one is not
STREAM_STALL_S = 10.0  # an ask stream whose reader takes no piece for this long is ended
MAX_SUBSCRIPTION_BYTES = 1024  # a source name is at most 200 characters (config): every topic fits
ANSWER_STALL_S = 0.5  # a served answer waits this long for room in its client's queue (charged to its budget)
RELOAD_QUEUE = 1  # reloads that may wait behind the one running
QUEUED_EVERY_S = 1.0  # a streamed answer waiting in its lane says so this often (the SDK's own wait is 5 s)
BUSY = {  # a request its lane has no room for gets this answer at once
    "lm": "busy: the node's language model is answering and {depth} more ask(s) wait (lm_queue: {depth}); "
    "ask again when yours can be queued",
    "reload": "busy: a reload is running and {depth} more wait; send it again once they have answered",
}


@dataclass
class _Answer:
    data: bytes
    served: bool = False  # an answer to a request that was served (waits for room), not a refusal (dropped)


class NodeServer:
    def __init__(
        self,
        config: NodeConfig,
        handler: Handler,
        audit: AuditLog,
        last_seq: Callable[[], int],
        roles: dict[bytes, Role] | None = None,  # the allow list's keys and roles; read from the config if None
    ) -> None:
        self.config = config
        self._roles = roles
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
        self.oversized = 0
        self.rate_limited = 0
        self.refusals = RefusalCoalescer(audit.append)
        self.limiter = RateLimiter(config.control_rate_per_s, config.control_burst)
        self.busy = RateLimiter(BUSY_SHARE, BUSY_BURST_S)  # seconds of the control thread per client
        self._allow: AllowList | None = None
        self._failure_sites: set[tuple[str, str, int]] = set()
        try:
            self.events = self.ctx.socket(zmq.PUB)
            self.events.sndhwm = 100_000
            self.events.linger = 0
            # a subscription is a message too: libzmq keeps ~50 bytes per byte of each distinct one, so one longer
            # than 1 KiB (no topic is; the handshake's commands, which count too, are smaller) drops the subscriber,
            # and few wait unapplied per connection
            self.events.maxmsgsize = MAX_SUBSCRIPTION_BYTES
            self.events.rcvhwm = 16
            self.control = self.ctx.socket(zmq.ROUTER)
            self.control.linger = 0
            # libzmq drops a peer sending a bigger *frame*; it still assembles a whole multi-part message before
            # the node sees any of it (its high-water mark counts messages), so keep few queued per peer
            self.control.maxmsgsize = 4 * MAX_REQUEST_BYTES
            self.control.rcvhwm = 8
            # answers a client does not read (a replay can be MBs) wait in at most 8 messages per connection;
            # mandatory routing makes a full queue an error (zmq.Again) instead of a silent drop, so a stream waits
            self.control.sndhwm = 8
            self.control.router_mandatory = 1
            if config.curve_enabled:
                self._secure()
            self.events.bind(config.endpoints.events)
            self.control.bind(config.endpoints.control)
        except zmq.ZMQError as exc:
            self.close()
            from bastion.errors import ConfigError

            raise ConfigError(
                f"cannot bind node endpoints ({exc})", "is another node running, or is the address wrong?"
            ) from None
        self.events_endpoint = self.events.last_endpoint.decode()
        self.control_endpoint = self.control.last_endpoint.decode()
        self.outbox = Outbox(self.ctx, self._stop)
        self.lanes = {
            "lm": self._lane("node-lm", config.lm_queue),
            "reload": self._lane("node-reload", RELOAD_QUEUE),
        }
        self._threads = [
            threading.Thread(target=self._serve_control, name="node-control", daemon=True),
            threading.Thread(target=self._heartbeat, name="node-heartbeat", daemon=True),
            *self.lanes.values(),
        ]

    def lane_status(self) -> dict[str, dict[str, int | bool]]:
        """What each lane is doing, for ``status``: running one job or not, how many wait, its depth, jobs done."""
        return {
            name: {
                "running": lane.running is not None,
                "waiting": len(lane.waiting()),
                "depth": lane.depth,
                "done": lane.done,
            }
            for name, lane in self.lanes.items()
        }

    def _lane(self, name: str, depth: int) -> Lane:
        def send(job: Job, fields: dict, stall_s: float) -> bool:
            return self.outbox.send(job.identity, reply(job.request_id, **fields), stall_s)

        return Lane(name, depth, send, self.busy.spend, self._log_failure, self._stop)

    def _secure(self) -> None:
        public, secret = load_secret(self.config.security.server_secret_key)
        self.server_public = public
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("bastion.edge.zap"))
        self.auth.start()
        roles = self._roles if self._roles is not None else client_roles(self.config.security.allowed_clients)
        self._allow = AllowList(roles, self.audit, self.refusals)
        self.auth.configure_curve_callback("*", credentials_provider=self._allow)
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
            beat = Heartbeat(
                node=self.config.id, ts=time.time(), last_seq=self.last_seq(), audit_count=count, audit_head=head
            )
            with self._pub_lock:
                try:
                    self.events.send_multipart([HEARTBEAT_TOPIC, beat.model_dump_json().encode()])
                except zmq.ZMQError:
                    return

    def refused_clients(self) -> int:
        """CurveZMQ handshakes refused since start (each counted, even when its audit record is coalesced)."""
        return self._allow.refused if self._allow is not None else 0

    def _serve_control(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.outbox.wake_socket, zmq.POLLIN)
        told = time.monotonic()
        while not self._stop.is_set():
            self.refusals.flush()
            if time.monotonic() - told >= QUEUED_EVERY_S:
                told = time.monotonic()
                self._tell_waiting()
            try:
                ready = dict(poller.poll(5 if self.outbox.busy else 100))
                if self.outbox.wake_socket in ready or self.outbox.busy:
                    self.outbox.deliver(self.control)  # what the lanes have to say goes out first
                if self.control not in ready:
                    continue
                message = receive_bounded(self.control, self.config.curve_enabled)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # socket closed during shutdown
            self.requests += 1
            answer = self._answer(message)
            if answer is None:
                continue
            if answer.served:  # a served answer waits a moment for a slow reader, on that reader's time
                started = time.monotonic()
                self._send_waiting(message.identity, answer.data, ANSWER_STALL_S)
                self.busy.spend(message.client, time.monotonic() - started)
            else:  # a refusal is dropped when the client has 8 answers unread
                self._send(message.identity, answer.data)

    def _tell_waiting(self) -> None:
        """Each streamed answer still waiting in its lane hears ``{"done": false, "queued": n}`` (no text: a reader
        skips it), so its client knows the node is there and keeps waiting; dropped if it is not reading."""
        for lane in self.lanes.values():
            for ahead, job in enumerate(lane.waiting(), start=1):
                if job.deferred.streams:
                    self._send(job.identity, reply(job.request_id, done=False, queued=ahead))

    def _label(self, client: bytes) -> str:
        """The client as the audit log names it: its key id with CurveZMQ, else its connection."""
        if not self.config.curve_enabled:
            return f"conn-{client.hex()[:16]}"
        return key_id(client) if client != NO_USER_ID else "no-user-id"

    def _role(self, client: bytes) -> Role | None:
        """The client's role (edge/roles.py): from the allow list by its ZAP User-Id; every client without CurveZMQ."""
        if not self.config.curve_enabled:
            return NO_CURVE_ROLE
        return self._allow.role(client) if self._allow is not None else None

    def _answer(self, message: Incoming) -> _Answer | None:
        wait = self.limiter.allow(message.client) or self.busy.in_debt(message.client)
        if wait:
            self.rate_limited += 1
            label = self._label(message.client)
            if self.refusals.refuse("client_rate_limited", label):
                log.warning("control client %s is rate limited (repeats are counted in the audit log)", label)
            peek = message.payload if message.payload is not None and len(message.payload) <= PEEK_ID_BYTES else None
            return _Answer(
                reply(
                    _peek_id(peek),
                    ok=False,
                    error=f"rate limited: more than {self.limiter.rate:g} "
                    f"requests a second or {BUSY_SHARE:.0%} of the node's control time; retry after "
                    f"{wait:.2f} s",
                    rate_limited=True,
                    retry_after_s=max(0.001, round(wait, 3)),
                )
            )
        if message.payload is None:
            self.oversized += 1
            self.bad_requests += 1
            return _Answer(
                reply(
                    None,
                    ok=False,
                    error=f"request refused: {message.frames - 1} frames, {message.size} "
                    f"bytes (at most {MAX_REQUEST_FRAMES - 1} frames and {MAX_REQUEST_BYTES} bytes)",
                )
            )
        try:
            request = parse_request(message.payload)
        except ProtocolError as exc:
            self.bad_requests += 1
            return _Answer(reply(exc.request_id, ok=False, error=str(exc)))
        started = time.monotonic()
        try:
            result = self.handler(request, self._label(message.client), self._role(message.client))
            if isinstance(result, Deferred):  # answered from its lane, off this thread
                lane = self.lanes[result.lane]
                ahead = lane.submit(Job(result, message.identity, request.id, message.client))
                if ahead is None:
                    result.replies.close()  # type: ignore[attr-defined]
                    busy = BUSY[result.lane].format(depth=lane.depth)
                    return _Answer(reply(request.id, ok=False, error=busy, busy=True))
                if ahead and result.streams:  # a stream that must wait says so at once, then every second
                    return _Answer(reply(request.id, done=False, queued=ahead), served=True)
                return None
            return _Answer(reply(request.id, **result), served=True)
        except Exception as exc:  # a handler bug must not take the node down
            self.bad_requests += 1
            self._log_failure("control handler failed", exc)
            return _Answer(reply(request.id, ok=False, error=f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.busy.spend(message.client, time.monotonic() - started)

    def _send(self, identity: bytes, answer: bytes) -> None:
        try:
            self.control.send_multipart([identity, answer], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer went away, or has 8 answers it has not read: this one is dropped

    def _send_waiting(self, identity: bytes, answer: bytes, stall_s: float) -> bool:
        """Send one message, waiting (up to ``stall_s``) while the reader's queue is full."""
        deadline = time.monotonic() + stall_s
        while True:
            try:
                self.control.send_multipart([identity, answer], zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() > deadline or self._stop.is_set():
                    return False
                time.sleep(0.005)
            except zmq.ZMQError:
                return False  # EHOSTUNREACH: the client went away

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """A traceback the first time a failure happens at a place in the code, one short line after that.

        A failure a client can trigger at will must not fill the disk with
        tracebacks, yet the first one is what a developer needs to fix it.
        """
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        site = (type(exc).__name__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        if site not in self._failure_sites and len(self._failure_sites) < 256:
            self._failure_sites.add(site)
            log.error("%s: %s: %s", what, type(exc).__name__, clip(exc), exc_info=exc)
        else:
            log.error("%s: %s: %s (traceback logged before)", what, type(exc).__name__, clip(exc))

    def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_threads", []):
            if t.is_alive():
                t.join(timeout=2)
        if self.auth is not None:
            self.auth.stop()
        self.refusals.flush(force=True)  # the counts of refusals still inside their window
        if getattr(self, "outbox", None) is not None:
            self.outbox.close()
        for name in ("events", "control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()


def _peek_id(payload: bytes | None) -> object:
    """The id of a (small) request that will not be served, so the client can match the refusal."""
    if payload is None:
        return None
    return readable_id(json_or_none(payload))
