"""Which torchrun rank writes what under a folder (tests/test_ddp.py): an audit hook (``sys.addaudithook``) that
records every Python-level write of a rank — a file opened for writing, mkdir, rename/replace, remove, rmdir,
rmtree, symlink — under ``BASTION_TEST_AUDIT_ROOT`` into ``BASTION_TEST_AUDIT_LOG/writes-rank{RANK}.txt`` (one
path per line, with the event; a mkdir of a folder already there changes nothing and is left out: Ultralytics'
validator does one on every rank). Installed by the children's ``sitecustomize``; a process without RANK (torchrun's
agent) records nothing. Writes from native code that bypass Python's audit events (OpenCV's imwrite) are not seen.
"""

from __future__ import annotations

import os
import sys

ROOT_ENV = "BASTION_TEST_AUDIT_ROOT"
LOG_ENV = "BASTION_TEST_AUDIT_LOG"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.replace": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "shutil.rmtree": (0,),
    "os.symlink": (1,),
    "os.link": (1,),
    "os.truncate": (0,),
}


def _written(event: str, args: tuple) -> list:
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        return [path] if writing else []
    return [args[i] for i in _PATH_EVENTS.get(event, ()) if i < len(args)]


def install() -> None:
    root, logdir, rank = os.environ.get(ROOT_ENV), os.environ.get(LOG_ENV), os.environ.get("RANK")
    if not (root and logdir and rank is not None):
        return
    root = os.path.realpath(root)
    log_path = os.path.join(logdir, f"writes-rank{rank}.txt")
    busy = []

    def hook(event: str, args: tuple) -> None:
        if busy or (event != "open" and event not in _PATH_EVENTS):
            return
        busy.append(1)
        try:
            for path in _written(event, args):
                if isinstance(path, (str, bytes, os.PathLike)):
                    full = os.path.realpath(os.fsdecode(path))
                    if event == "os.mkdir" and os.path.isdir(full):
                        continue  # (the event comes first) a folder already there: nothing changes
                    if full == root or full.startswith(root + os.sep):
                        with open(log_path, "a") as f:
                            f.write(f"{event} {full}\n")
        except Exception:  # never break the process under audit
            pass
        finally:
            busy.clear()

    sys.addaudithook(hook)
