"""Who may connect to a CurveZMQ node: the allow list ZAP asks, auditing each accepted key once, refusals coalesced."""

from __future__ import annotations

import logging

from bastion.edge.audit import AuditLog
from bastion.edge.curve import key_id
from bastion.edge.limits import RefusalCoalescer

log = logging.getLogger("bastion.edge.server")  # its lines keep the name they had in the server


class AllowList:
    """zmq.auth credentials provider: allowed client keys; each accepted key audited once, refusals coalesced."""

    def __init__(self, keys: set[bytes], audit: AuditLog, refusals: RefusalCoalescer) -> None:
        self.keys = keys
        self.audit = audit
        self.refusals = refusals
        self.refused = 0
        self._accepted: set[bytes] = set()  # a subset of self.keys: bounded by the allow list

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            if key not in self._accepted:  # one record per key, not per reconnect
                self._accepted.add(key)
                self.audit.append("client_accepted", key_id=key_id(key))
            return True
        self.refused += 1
        if self.refusals.refuse("client_refused", key_id(key), key_id=key_id(key)):
            log.warning("refused CurveZMQ client %s (repeats are counted in the audit log)", key_id(key))
        return False
