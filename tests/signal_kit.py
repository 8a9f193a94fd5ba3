"""Signals sent to real processes at points they reach, for the stop tests of `bastion detect` and `bastion node run`.

Each process writes a marker file when it reaches a point (its model load begins, its first frame or event); the
test sends it its signals a set time after that marker appears, all processes at once (one model load's wait, not
one per case), then requires each to end within a bound. The bound is not a timing: a process that stops as it
should ends in a second or two; one that hangs (a lock left held by an interrupt) never does.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

# case -> (marker file name, seconds after it appears, signals sent 50 ms apart)
Plan = dict[str, tuple[str, float, tuple[int, ...]]]


def signal_at_markers(
    procs: dict[str, tuple[Path, subprocess.Popen]], plan: Plan, reach_s: float, end_s: float
) -> dict[str, tuple[int, str, str]]:
    """Signal each process ``(markers dir, text-mode Popen)`` as its plan says; return each one's (returncode,
    stdout, stderr). Fails the test when a marker is never reached within ``reach_s`` or a process still runs
    ``end_s`` after its signals; kills whatever is left either way."""
    results = {}
    try:
        pending, reached_at = dict(plan), {}
        deadline = time.monotonic() + reach_s
        while pending and time.monotonic() < deadline:
            for case, (marker, after, signums) in list(pending.items()):
                markers, proc = procs[case]
                if proc.poll() is not None:
                    pending.pop(case)  # ended by itself: the caller's checks say how
                elif (markers / marker).exists():
                    if time.monotonic() - reached_at.setdefault(case, time.monotonic()) >= after:
                        for signum in signums:
                            proc.send_signal(signum)
                            time.sleep(0.05)
                        pending.pop(case)
            time.sleep(0.02)
        assert not pending, f"never reached: {pending}"
        for case, (_, proc) in procs.items():
            try:
                out, err = proc.communicate(timeout=end_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"{case}: still running {end_s:.0f} s after its signal; stderr: {err[-2000:]}")
            results[case] = proc.returncode, out, err
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results
