"""Headless Chromium for the report tests: load a local page, read back the DOM or a screenshot, offline.

``make test`` installs Debian's ``chromium`` where apt-get can (see the Makefile); without it the browser tests
skip with that reason. Every run is kept off the network: all host names resolve to nothing and any request that
still goes out is sent to a proxy on a closed loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI and this machine run tests as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


SKIP_REASON = (
    "no Chromium on PATH: make test installs Debian's chromium with apt-get where it can (root or sudo, apt "
    "reachable); install it to run the report's browser checks"
)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [chromium(), *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def dump_dom(page: Path, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (scripts ran, media loaded and played)."""
    proc = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()], timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(page: Path, out: Path, size: str = "1280,2400", budget_ms: int = 3000, timeout: float = 120) -> Path:
    proc = _run(
        [
            f"--screenshot={out.resolve()}",
            f"--window-size={size}",
            "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}",
            page.resolve().as_uri(),
        ],
        timeout,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return out
