"""BASTION_HOME housekeeping: staging left by a killed process is swept, the archive cache stays under its budget
(least recently used first), and nothing a living process holds is ever removed.

Real files and real processes: each archive is loaded by its own Python process (as each `bastion` command is),
holders are killed with SIGKILL mid-unpack or mid-add, and the flocks they held die with them.
"""

import os
import signal
import subprocess
import sys
import tarfile

import pytest

from bastion.errors import ConfigError, RegistryError
from bastion.models.archive_cache import CACHE_BYTES_ENV, cache_budget
from bastion.models.registry import Registry
from conftest import REPO

PAYLOAD = 256 << 10  # each test archive holds one 256 KiB file
PRELUDE = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; import egress_guard; egress_guard.install()\n"
LOAD = PRELUDE + "from bastion.models.archive import unpack_cached; print(unpack_cached(sys.argv[1], sys.argv[2]))\n"
LOAD_AND_HOLD = LOAD + "print('ready', flush=True); sys.stdin.read()\n"  # holds its entry until stdin closes
STUCK_MID_UNPACK = PRELUDE + (
    "import time; from bastion.models import archive\n"
    "real = archive._extract\n"
    "def one_then_hang(*a):\n"
    "    real(*a); print('ready', flush=True); time.sleep(120)\n"
    "archive._extract = one_then_hang\n"
    "archive.unpack_cached(sys.argv[1], sys.argv[2])\n"
)
STUCK_MID_ADD = PRELUDE + (
    "import time; from bastion.models.registry import Registry\n"
    "def hang(path):\n"
    "    print('ready', flush=True); time.sleep(120)\n"
    "Registry(sys.argv[1]).add(sys.argv[2], hang)\n"
)


def _env(**extra):
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    return env


def _archive(tmp_path, i):
    """A small archive unlike any other (its own payload bytes): manifest.json and one file."""
    src = tmp_path / f"src{i}"
    src.mkdir()
    (src / "manifest.json").write_text(f'{{"name": "b{i}"}}')
    (src / "weights.bin").write_bytes(os.urandom(PAYLOAD))
    path = tmp_path / f"b{i}.bastion"
    with tarfile.open(path, "w") as tar:
        for name in ("manifest.json", "weights.bin"):
            tar.add(src / name, arcname=name)
    return path


def _load(archive, cache, **env):
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(archive), str(cache)],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _start(code, *args, **env):
    """A process that prints 'ready' once it holds what the test is about (a staging dir, a cache entry)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        cwd=REPO,
    )
    line = proc.stdout.readline()
    while line and line.strip() != "ready":
        line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(proc.stderr.read())
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _entries(cache):
    return {p.name: p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _cache_bytes(cache):
    return sum(f.stat().st_size for entry in _entries(cache).values() for f in entry.rglob("*") if f.is_file())


def _staging(cache):
    return [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_a_killed_unpack_leaves_staging_that_is_swept_only_once_its_process_is_dead(tmp_path):
    cache = tmp_path / "cache"
    first, other = _archive(tmp_path, 0), _archive(tmp_path, 1)
    stuck = _start(STUCK_MID_UNPACK, first, cache)
    try:
        [staging] = _staging(cache)  # half an archive on disk, its process alive
        _load(other, cache)  # another process uses the cache meanwhile: the live staging is not its to remove
        assert _staging(cache) == [staging] and (staging / "manifest.json").is_file()
    finally:
        _kill(stuck)  # kill -9 mid-unpack: no cleanup ran
    assert _staging(cache) == [staging]
    _load(other, cache)  # the next use of the cache (a hit) sweeps it
    assert _staging(cache) == []
    loaded = {os.path.basename(_load(first, cache)), os.path.basename(_load(other, cache))}  # the killed one again
    assert set(_entries(cache)) == loaded


def test_a_killed_registry_add_leaves_staging_that_the_next_registry_use_removes(tmp_path):
    root = tmp_path / "registry"
    source = tmp_path / "bundle"
    source.mkdir()
    stuck = _start(STUCK_MID_ADD, root, source)
    try:
        [staging] = [p for p in root.iterdir() if p.name.startswith("add-")]
        with pytest.raises(RegistryError):
            Registry(root).remove("nothing")  # a registry use while the add is alive: its staging stays
        assert staging.is_dir()
    finally:
        _kill(stuck)
    with pytest.raises(RegistryError):
        Registry(root).remove("nothing")
    assert not staging.exists()
    assert sorted(p.name for p in root.iterdir()) == [".lock"]


def test_the_cache_stays_under_its_budget_evicting_the_least_recently_used(tmp_path):
    cache = tmp_path / "cache"
    archives = [_archive(tmp_path, i) for i in range(5)]
    budget = str(int(PAYLOAD * 2.5))  # room for two entries
    names = [os.path.basename(_load(a, cache, **{CACHE_BYTES_ENV: budget})) for a in archives[:2]]
    assert set(_entries(cache)) == set(names)
    os.utime(cache / names[0], (1, 1))  # entry 0 used long ago ...
    os.utime(cache / names[1], (2, 2))
    _load(archives[0], cache, **{CACHE_BYTES_ENV: budget})  # ... and now again: it becomes the most recent
    for archive in archives[2:]:
        names.append(os.path.basename(_load(archive, cache, **{CACHE_BYTES_ENV: budget})))
        assert _cache_bytes(cache) <= int(budget)
        assert len(_entries(cache)) == 2
        if len(names) == 3:  # least recently *used* goes first: entry 1, though entry 0 was made before it
            assert set(_entries(cache)) == {names[0], names[2]}
    assert set(_entries(cache)) == {names[3], names[4]}
    assert _staging(cache) == []


def test_an_entry_in_use_is_never_evicted_until_its_process_dies(tmp_path):
    cache = tmp_path / "cache"
    held, *others = [_archive(tmp_path, i) for i in range(4)]
    budget = {CACHE_BYTES_ENV: str(int(PAYLOAD * 1.5))}  # room for one entry
    holder = _start(LOAD_AND_HOLD, held, cache, **budget)  # a node serving the bundle in this archive
    try:
        held_name = next(iter(_entries(cache)))
        os.utime(cache / held_name, (1, 1))  # the least recently used of all
        for archive in others:
            _load(archive, cache, **budget)
            assert held_name in _entries(cache) and (cache / held_name / "weights.bin").stat().st_size == PAYLOAD
        assert set(_entries(cache)) == {held_name, os.path.basename(_load(others[-1], cache, **budget))}
    finally:
        _kill(holder)
    _load(others[-1], cache, **budget)  # its holder is gone: now it is an entry like any other
    assert held_name not in _entries(cache) and _cache_bytes(cache) <= PAYLOAD * 1.5


def test_a_bad_cache_budget_is_one_line(monkeypatch):
    monkeypatch.setenv(CACHE_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match=CACHE_BYTES_ENV):
        cache_budget()
    monkeypatch.setenv(CACHE_BYTES_ENV, "0")  # a cache that keeps only what is in use
    assert cache_budget() == 0
