"""Bundle versions, ordered as people mean them: ``1.10`` after ``1.9``, ``2.0-rc1`` before ``2.0``.

Re-adding an old signed bundle is what a rollback attack looks like: the old
bundle verifies perfectly.  So the registry resolves a bare name to the highest
version (not the last added), and adding — or a node reloading — a version
older than one already there needs an explicit allowance, which is recorded.
"""

from __future__ import annotations

import re
from typing import Protocol

from bastion.errors import ModelLoadError

_RELEASE = re.compile(r"^[vV]?(\d+(?:\.\d+)*)(.*)$")
_PIECE = re.compile(r"\d+|[^\W\d_]+")
_PRE_RELEASE = ("dev", "a", "alpha", "b", "beta", "pre", "preview", "rc", "c")


class Versioned(Protocol):
    name: str
    version: str


def _natural(text: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in _PIECE.findall(text))


def version_key(version: str) -> tuple:
    """A sort key giving precedence: numeric release first (trailing zeros ignored), a pre-release tag
    (``-rc1``, ``b2``, ``.dev3``) before its release; any other suffix (``-coco``) names a variant of the same
    release, not a newer or older one. Versions that are not numbers at all sort below every numeric one."""
    match = _RELEASE.match(version.strip())
    if not match:
        return (0, (), 1, _natural(version))
    release = tuple(int(x) for x in match.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    suffix = _natural(match.group(2).split("+", 1)[0])  # +build metadata never orders
    if suffix and suffix[0][0] == 1 and suffix[0][2] in _PRE_RELEASE:
        return (1, release, 0, suffix)
    return (1, release, 1, ())


def is_older(candidate: str, than: str) -> bool:
    return version_key(candidate) < version_key(than)


def check_not_downgrade(current: Versioned, new: Versioned, allow: bool) -> bool:
    """Refuse switching from ``current`` to an older version of the same model unless ``allow``.

    Returns True when it *is* a downgrade that was allowed (the caller records that), False when it is no
    downgrade at all (a newer or equal version, or another model altogether)."""
    if new.name != current.name or not is_older(new.version, current.version):
        return False
    if not allow:
        raise ModelLoadError(
            f"{new.name}:{new.version} is older than the running {current.name}:{current.version}",
            'a rollback must be deliberate: send the reload again with "allow_downgrade": true '
            "(SDK: Client.reload(bundle, allow_downgrade=True)); it is audited",
        )
    return True
