"""The NATS JetStream sink (nats-py): one subject per kind and source, a stream created when missing, acked.

Subjects are ``<prefix>.<node>.<kind>.<source>`` with every ``.`` inside a name turned into ``_`` (a dot
separates subject tokens: ``object.new`` is the token ``object_new``), so ``<prefix>.<node>.object_new.*``
matches one kind. Each message carries ``Nats-Msg-Id: <node>:<seq>``: JetStream drops a re-send inside its
duplicate window by itself, and a consumer can still de-duplicate by ``seq`` beyond it. nats-py is asyncio;
the sink runs its own event loop on its own thread, and reconnects itself (nats-py's reconnects are off, so
the store's cursor is the only replay there is).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import nats
from nats.js.errors import NotFoundError

from bastion.edge.sink_base import Sink, SinkError, read_secret, register_sink


def token(name: str) -> str:
    return name.replace(".", "_").replace("*", "_").replace(">", "_").replace(" ", "_")


@register_sink("nats")
class NatsSink(Sink):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Any = None
        self._js: Any = None
        self._last_error: str | None = None

    def _run_async(self, coro, timeout: float):
        """Run ``coro`` on this sink's loop, given up after ``timeout`` or as soon as the sink is stopped."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._bounded(coro, timeout))

    async def _bounded(self, coro, timeout: float):
        task = asyncio.ensure_future(coro)
        deadline = asyncio.get_running_loop().time() + timeout
        while not task.done():
            if self._stop.is_set() or asyncio.get_running_loop().time() > deadline:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                if self._stop.is_set():
                    raise SinkError("the sink is stopping")
                raise SinkError(f"the NATS server {self.config.url} did not answer in {timeout} s")
            await asyncio.wait({task}, timeout=0.05)
        return task.result()

    def subject(self, kind: str, source: str) -> str:
        return f"{self.config.subject_prefix}.{token(self.node)}.{token(kind)}.{token(source)}"

    def connect(self) -> None:
        self._run_async(self._connect(), self.config.connect_timeout_s + 1)

    async def _connect(self) -> None:
        cfg = self.config
        options: dict[str, Any] = {
            "servers": [cfg.url],
            "name": f"bastion-{self.node}-{self.name}",
            "connect_timeout": cfg.connect_timeout_s,
            "allow_reconnect": False,
            "max_reconnect_attempts": 0,
            "error_cb": self._on_error,
        }
        if cfg.username is not None:
            options["user"] = cfg.username
            options["password"] = read_secret(cfg.password_file)
        if cfg.tls is not None:
            options["tls"] = _tls_context(cfg.tls)
        self._last_error = None
        try:
            self._nc = await nats.connect(**options)
        except (asyncio.TimeoutError, TimeoutError):
            raise SinkError(f"the NATS server {cfg.url} did not answer in {cfg.connect_timeout_s} s") from None
        except Exception as exc:  # nats-py raises its own errors, OSError or asyncio's, by failure
            reason = self._last_error or _reason(exc)
            if cfg.tls is not None and "authoriz" not in reason.lower():  # a hang-up, not a refusal it said
                reason += " (TLS: does it want a client certificate, or another CA?)"
            raise SinkError(f"cannot connect to the NATS server {cfg.url}: {reason}") from None
        self._js = self._nc.jetstream(timeout=cfg.ack_timeout_s)
        try:
            await self._js.stream_info(cfg.stream)
        except NotFoundError:
            await self._js.add_stream(name=cfg.stream, subjects=[f"{cfg.subject_prefix}.>"])

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = " ".join(str(exc).split()) or type(exc).__name__

    def publish(self, rows: list[tuple[int, str, str, str]]) -> int:
        windows = -(-len(rows) // self.config.max_in_flight)
        return self._run_async(self._publish(rows), self.config.ack_timeout_s * windows + 1)

    async def _publish(self, rows: list[tuple[int, str, str, str]]) -> int:
        acked = rows[0][0] - 1
        window = self.config.max_in_flight
        for start in range(0, len(rows), window):
            chunk = rows[start : start + window]
            sends = [
                self._js.publish(
                    self.subject(kind, source), payload.encode(), headers={"Nats-Msg-Id": f"{self.node}:{seq}"}
                )
                for seq, kind, source, payload in chunk
            ]
            results = await asyncio.gather(*sends, return_exceptions=True)
            for (seq, *_), result in zip(chunk, results):
                if isinstance(result, BaseException):
                    if acked < rows[0][0]:
                        raise SinkError(f"NATS JetStream did not acknowledge seq {seq}: {_reason(result)}")
                    return acked
                acked = seq
        return acked

    def disconnect(self, clean: bool) -> None:
        nc, self._nc, self._js = self._nc, None, None
        try:
            if nc is not None and self._loop is not None:
                try:
                    self._loop.run_until_complete(asyncio.wait_for(nc.drain() if clean else nc.close(), 3))
                except Exception:
                    self._loop.run_until_complete(asyncio.wait_for(nc.close(), 3))
        finally:  # a fresh loop for the next connection: nothing of a dead one lingers
            if self._loop is not None:
                self._loop.close()
            self._loop = None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_context(tls) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.cert is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise SinkError(f"cannot load the NATS TLS files: {exc}") from None
    return ctx
