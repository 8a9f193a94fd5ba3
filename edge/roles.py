"""Who may do what on the node's control socket: three roles, ordered, and the role each op needs.

A CurveZMQ client key gets its role from where the node's admin put its public
certificate (edge/curve_allow.py): ``observer`` watches (status, replay, the
events socket), ``operator`` also works the node (snapshot, clip, ask), ``admin``
also changes what it runs (reload).  Each role includes the ones below it.

The table ``OP_ROLES`` is data: an op names the least role it needs, and the
check runs in one place before any handler (``control_ops.dispatch``).  An op
missing from the table needs ``admin``: a new op is closed until someone says
who may use it.  A node without CurveZMQ (loopback only) cannot tell its clients
apart, so each gets ``admin`` — that is why anything beyond loopback needs CurveZMQ.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["observer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("observer", "operator", "admin")  # least to most; each includes the ones before
DEFAULT_ROLE: Role = "observer"  # a key whose certificate is not in a role's folder (every key before roles)
NO_CURVE_ROLE: Role = "admin"  # without CurveZMQ no client has an identity: the loopback user runs the node

OP_ROLES: dict[str, Role] = {
    "ping": "observer",
    "status": "observer",
    "replay": "observer",
    "snapshot": "operator",
    "clip": "operator",  # named before the op lands (#19 item 6 and the clip work ran side by side)
    "ask": "operator",
    "reload": "admin",
}


def needs(op: str) -> Role:
    """The least role that may run ``op``; ``admin`` for an op nobody has given a role yet (closed by default)."""
    return OP_ROLES.get(op, "admin")


def allows(role: str | None, op: str) -> bool:
    """Whether a client with ``role`` (None: a key the allowlist does not know) may run ``op``."""
    if role not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needs(op))  # type: ignore[arg-type]


def refusal(op: str, role: str | None) -> str:
    """The one line a refused client reads: what it is, what the op needs, who can change it."""
    who = f"role {role}" if role in ROLES else "no role"
    return (
        f"{op} refused: this client key has {who}; {op} needs {needs(op)} "
        "(the node's admin moves its certificate into that role's folder: bastion node allow --role)"
    )
