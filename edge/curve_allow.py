"""Who may connect to a CurveZMQ node and in which role: the allow list ZAP asks, auditing each accepted key once,
refusals coalesced.

The allow list is what ``security.allowed_clients`` names: public certificate
files, or folders of them.  A key's role is the name of the folder its
certificate sits in — ``admin/``, ``operator/`` or ``observer/`` — so the role is
decided by whoever writes the node's own key folders (the node's admin), never by
the certificate a client hands over: a client cannot name its own role.  A folder
may hold its role folders one level down (``keys/clients/operator/alice.key``),
or be one (``allowed_clients: [keys/admins/admin]``).

A certificate in any other folder — every allow list from before roles — is an
``observer`` (edge/roles.py ``DEFAULT_ROLE``): least privilege.  It keeps
watching as before; an old client that reloads or asks is refused in one line
that names the fix, instead of an upgrade quietly handing every old key ``admin``.
A sub-folder holding certificates whose name is not a role (``admins/``), or a
key filed under two roles, stops the node with one line: a typo must not drop or
raise a client's rights unseen.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bastion.edge.audit import AuditLog
from bastion.edge.curve import key_id, load_public
from bastion.edge.limits import RefusalCoalescer
from bastion.edge.roles import DEFAULT_ROLE, ROLES, Role
from bastion.errors import ConfigError

log = logging.getLogger("bastion.edge.server")  # its lines keep the name they had in the server
MAX_CLIENT_KEYS = 10_000  # certificates read from the allow list at most (each is a file read at start)


def role_of_file(cert: Path) -> Role:
    """The role a certificate file grants: its folder's name when that is a role, else the default."""
    name = cert.parent.name
    return name if name in ROLES else DEFAULT_ROLE  # type: ignore[return-value]


def certificate_files(entry: Path) -> list[Path]:
    """The ``*.key`` files an allow-list entry names: itself, or a folder's own and its role folders' ones."""
    entry = Path(entry)
    if not entry.is_dir():
        return [entry]
    files = sorted(entry.glob("*.key"))
    for sub in sorted(p for p in entry.iterdir() if p.is_dir()):
        inside = sorted(sub.glob("*.key"))
        if inside and sub.name not in ROLES:
            raise ConfigError(
                f"allowed_clients: {sub} holds client certificates but {sub.name!r} is not a role",
                f"name the folder one of {', '.join(ROLES)} (or move the certificates out)",
            )
        files += inside
    return files


def client_certificates(entries: list[Path]) -> list[tuple[bytes, Role, Path]]:
    """Each allowed client key (z85) with its role and certificate file, from ``security.allowed_clients``; one
    line if the list is wrong (a folder that is not a role, a key under two roles, too many files)."""
    found: dict[bytes, tuple[Role, Path]] = {}
    listed: list[tuple[bytes, Role, Path]] = []
    for entry in entries:
        for cert in certificate_files(entry):
            if len(listed) >= MAX_CLIENT_KEYS:
                raise ConfigError(f"allowed_clients: more than {MAX_CLIENT_KEYS} client certificates")
            key, role = load_public(cert), role_of_file(cert)
            if key in found and found[key][0] != role:
                raise ConfigError(
                    f"allowed_clients: client key {key_id(key)} is {found[key][0]} ({found[key][1]}) and {role} "
                    f"({cert})",
                    "keep its certificate in one role folder",
                )
            found[key] = (role, cert)
            listed.append((key, role, cert))
    return listed


def client_roles(entries: list[Path]) -> dict[bytes, Role]:
    """Each allowed client key (z85) with its role: what the node's ZAP handler and dispatcher read."""
    return {key: role for key, role, _ in client_certificates(entries)}


class AllowList:
    """zmq.auth credentials provider: allowed client keys and their roles; each accepted key audited once (with its
    role), refusals coalesced."""

    def __init__(self, roles: dict[bytes, Role], audit: AuditLog, refusals: RefusalCoalescer) -> None:
        self.roles = roles  # read at start, never changed: the server reads it from its control thread
        self.keys = set(roles)
        self.audit = audit
        self.refusals = refusals
        self.refused = 0
        self._accepted: set[bytes] = set()  # a subset of self.keys: bounded by the allow list

    def role(self, key: bytes) -> Role | None:
        """The role of an authenticated client (its ZAP User-Id, the z85 key); None for a key not on the list."""
        return self.roles.get(key)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            if key not in self._accepted:  # one record per key, not per reconnect
                self._accepted.add(key)
                self.audit.append("client_accepted", key_id=key_id(key), role=self.roles[key])
            return True
        self.refused += 1
        if self.refusals.refuse("client_refused", key_id(key), key_id=key_id(key)):
            log.warning("refused CurveZMQ client %s (repeats are counted in the audit log)", key_id(key))
        return False
