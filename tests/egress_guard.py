"""Zero-egress guard for CLI subprocesses: any non-loopback connect or lookup aborts with exit 97.

Imported by ``conftest.run_cli`` before ``bastion.cli`` so the whole command runs under it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

EXIT_CODE = 97


def is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host)
    if host in ("localhost", "", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, host: object) -> None:
    sys.stderr.write(f"ZERO-EGRESS VIOLATION: {what} to {host!r}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def install() -> None:
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not is_local(address[0]):
                _refuse("connect", address[0])
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not is_local(host):
            _refuse("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = lambda self, a: (connect(self, a), 0)[1]  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
