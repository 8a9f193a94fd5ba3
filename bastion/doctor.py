"""``bastion doctor``: is this unit ready to run offline? Each check says ok / warn / fail and why."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from bastion.console import out, print_json

# Settings that would make a library reach out, or that reveal an attempt to route traffic.
_EGRESS_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1"}


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def run_checks(lock: Path | None = None, node_storage: Path | None = None) -> list[Check]:
    """Doctor only looks: with no state directory yet, the state checks run against an empty throw-away one
    (what this unit's first use will find), so that `bastion doctor` creates nothing under HOME.
    ``node_storage``: a node's storage directory (events, snapshots, clips, its audit log), checked for
    encryption too — it need not be under BASTION_HOME."""
    import tempfile

    from bastion.models.home import bastion_home

    home = bastion_home()
    storage = [_storage(home)] + ([_node_storage(node_storage)] if node_storage is not None else [])
    if home.exists():
        return _checks(_home(home), lock, storage)
    with tempfile.TemporaryDirectory(prefix="bastion-doctor-") as empty:
        saved = os.environ.get("BASTION_HOME")
        os.environ["BASTION_HOME"] = empty
        try:
            return _checks(_home(home), lock, storage)
        finally:
            if saved is None:
                os.environ.pop("BASTION_HOME", None)
            else:
                os.environ["BASTION_HOME"] = saved


def _checks(home: Check, lock: Path | None, storage: list[Check]) -> list[Check]:
    checks = [
        home,
        *storage,
        _trust(),
        _policy(),
        _unit(),
        _registry(),
        _zoo(),
        _providers(),
        _cpu_class(),
        _egress_env(),
        _ort_telemetry(),
        _ultralytics_settings(),
        _versions(lock),
    ]
    return [c for c in checks if c is not None]


def _home(home: Path) -> Check:
    if not home.exists():
        parent = next((p for p in home.parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            return Check("state directory", "fail", f"{home} does not exist and {parent} is not writable")
        return Check("state directory", "ok", f"{home} does not exist yet (made on first use; {parent} is writable)")
    try:
        probe = home / ".doctor-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        return Check("state directory", "ok", f"{home} is writable")
    except OSError as exc:
        return Check("state directory", "fail", f"{home} is not writable: {exc.strerror}")


def _storage(home: Path) -> Check:
    """A warning unless the state directory (unit key, trust, events, sealed bundles) is on dm-crypt/LUKS."""
    from bastion.storage_crypt import storage_crypt

    found = storage_crypt(home)
    if found.state == "encrypted":
        return Check("encrypted storage", "ok", found.detail)
    hint = "; put BASTION_HOME on a LUKS volume (docs/security.md, 'Encrypted storage')"
    if found.state == "unknown":
        return Check("encrypted storage", "warn", f"unknown: {found.detail}{hint}")
    return Check("encrypted storage", "warn", found.detail + hint)


def _node_storage(path: Path) -> Check:
    """The same warning for a node's storage directory: its events, snapshots, clips and audit log."""
    from bastion.storage_crypt import storage_crypt

    name = "node storage"
    try:
        if not str(path).strip() or not path.is_dir():
            return Check(name, "fail", f"{str(path)!r} is not a directory (give the node's storage.dir)")
        found = storage_crypt(path.resolve())
    except OSError as exc:  # not searchable by this user, a name too long: say so in the row
        return Check(name, "fail", f"{str(path)[:200]!r} cannot be read: {exc.strerror or exc}")
    if found.state == "encrypted":
        return Check(name, "ok", found.detail)
    hint = "; put the node's storage.dir on a LUKS volume (docs/security.md, 'Encrypted storage')"
    return Check(name, "warn", ("unknown: " if found.state == "unknown" else "") + found.detail + hint)


def _trust() -> Check:
    from bastion.models.trust import TrustStore

    try:
        store = TrustStore()
        keys = store.keys()
    except Exception as exc:  # a damaged store is exactly what doctor must report
        return Check("trust store", "fail", str(exc))
    active = [k for k in keys.values() if not k.revoked]
    builtin = [k for k in active if k.source == "built-in"]
    detail = (
        f"{len(active)} trusted key(s) ({len(builtin)} built-in: {', '.join(k.key_id for k in builtin) or '-'}),"
        f" {len(store.revoked())} revoked"
    )
    if not active:
        return Check("trust store", "fail", detail + "; no bundle can be verified — bastion keys trust KEY.pub")
    return Check("trust store", "ok", detail)


def _policy() -> Check:
    """The signed trust policy in force (bastion policy apply), or that the trust store rules alone."""
    from bastion.models.policy_store import PolicyStore

    try:
        signed = PolicyStore().in_force()
    except Exception as exc:  # missing, rolled back, expired: every bundle is refused, say why
        return Check("trust policy", "fail", str(exc))
    if signed is None:
        return Check("trust policy", "ok", "none applied: any trusted key may sign any bundle (1 of 1)")
    p = signed.policy
    return Check(
        "trust policy",
        "ok",
        f"v{p.version}, expires {p.expires.date()}, {len(p.keys)} key(s), {len(p.rules)} rule(s), "
        f"root {p.root.threshold} of {len(p.root.keys)} ({p.root.fingerprint()[:16]}…)",
    )


def _unit() -> Check:
    """What this unit is to a coalition: the nation markings are checked against (releasability) and the unit key
    sealed bundles open with — the two settings a unit of one nation must get right before a model arrives."""
    from bastion.errors import BastionError
    from bastion.models.releasability import NATION_ENV, unit_nation
    from bastion.models.unit_key import home_key_path, unit_key_path

    try:
        nation = unit_nation()
    except BastionError as exc:
        return Check("unit", "fail", f"{NATION_ENV}: {exc}")
    said = [
        f"nation {nation}: bundles not releasable to it are refused"
        if nation
        else f"no nation set: markings are shown, not enforced ({NATION_ENV}=CODE, or nation: in node.yaml)"
    ]
    path = unit_key_path()
    if path is None:
        home = home_key_path()
        if os.path.lexists(home):  # a FIFO, a folder, a dangling link: unit_key_path() does not take it for a key
            return Check("unit", "fail", "; ".join([*said, f"{home} is not a unit key file (bastion keys unit-init)"]))
        said.append("no unit key: bundles sealed to units cannot open here (bastion keys unit-init)")
        return Check("unit", "ok", "; ".join(said))
    status, about = _unit_key(path)
    return Check("unit", status, "; ".join([*said, about]))


def _unit_key(path: Path) -> tuple[str, str]:
    """(status, what) of the unit key at ``path``, never asking a passphrase: a key in clear is opened and must be
    the key its ``unit.pub`` names; an encrypted one is shown by its ``unit.pub``."""
    import stat

    from bastion.errors import BastionError
    from bastion.models.keys import is_encrypted_pem
    from bastion.models.safe_read import read_bounded
    from bastion.models.unit_key import MAX_KEY_BYTES, load_unit_key, load_unit_public, unit_key_id

    try:
        mode = path.stat().st_mode
        encrypted = is_encrypted_pem(read_bounded(path, MAX_KEY_BYTES))  # as load_unit_key decides
    except OSError as exc:
        return "fail", f"the unit key {path} cannot be read: {exc}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return "fail", f"the unit key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): chmod 600"
    public = path.with_suffix(".pub")
    try:
        named = unit_key_id(load_unit_public(public)) if public.is_file() else None
    except (BastionError, OSError):
        return "fail", f"{public} is not the public half of a unit key (bastion keys unit-export rewrites it)"
    if encrypted:
        if named is None:
            return "warn", f"unit key {path}, passphrase-protected; no {public.name} beside it to show its id"
        return "ok", f"unit key {named} ({path}), passphrase-protected"
    try:
        unit = load_unit_key()
    except BastionError as exc:
        return "fail", str(exc)
    if unit is None or (named is not None and named != unit.key_id):
        return "fail", f"{public.name} is not the public half of {path} (bastion keys unit-export rewrites it)"
    return "warn", f"unit key {unit.key_id} ({path}) in clear: fine on a LUKS volume only (unit-init --passphrase)"


def _registry() -> Check:
    from bastion.models.registry import Registry

    try:
        entries = Registry().entries()
    except Exception as exc:
        return Check("model registry", "fail", str(exc))
    missing = [e for e in entries if not e.path.is_dir()]
    if missing:
        return Check("model registry", "fail", f"{len(missing)} indexed bundle(s) missing on disk")
    return Check("model registry", "ok", f"{len(entries)} bundle(s)")


def _zoo() -> Check:
    from bastion.models.bundle import Bundle
    from bastion.models.zoo import zoo_names

    bad = []
    for name in zoo_names():
        try:
            Bundle.open(name)
        except Exception as exc:
            bad.append(f"{name}: {exc}")
    if bad:
        return Check("vendored models", "warn", "; ".join(bad))
    return Check("vendored models", "ok", f"{', '.join(zoo_names())} verified")


def _providers() -> Check:
    """Every backend of the registry under the names ``--device`` takes (hardware/backend_names.py)."""
    from bastion.runtime.backends.registry import backend_specs
    from bastion.runtime.backends.select import resolve_device

    rows = []
    for name, spec in backend_specs().items():
        if spec.available():
            rows.append(f"{name}: ok ({spec.library} {spec.version()})")
        else:
            rows.append(f"{name}: not installed (needs {spec.needs})")
    auto = resolve_device("auto")
    fallback = " (falls back to the next one, logged, if it cannot start)" if auto == "trt" else ""
    return Check("inference backend", "ok", f"device=auto uses {auto}{fallback}; " + "; ".join(rows))


def _cpu_class() -> Check:
    """The class INT8 bundles are checked against on load (docs/benchmarks.md: INT8 depends on the CPU)."""
    from bastion.hardware.isa import probe_isa

    isa = probe_isa()
    return Check(
        "cpu class",
        "ok",
        f"{isa.name} — {isa.description}; INT8 bundles gated on another class are "
        "flagged on load (int8_policy strict refuses them)",
    )


def _egress_env() -> Check:
    proxies = [k for k in _EGRESS_ENV if os.environ.get(k)]
    not_offline = [k for k, v in _OFFLINE_ENV.items() if os.environ.get(k) != v]
    if proxies:
        return Check(
            "egress settings",
            "warn",
            f"proxy variables set ({', '.join(proxies)}): something here expects "
            "a network; bastion itself never uses one",
        )
    return Check(
        "egress settings",
        "ok",
        "no proxy configured; bastion sets offline modes itself"
        + (f" (not exported here: {', '.join(not_offline)})" if not_offline else ""),
    )


def _ort_telemetry() -> Check:
    from bastion import ort_telemetry

    quiet, line = ort_telemetry.status()
    return Check("onnxruntime telemetry", "ok" if quiet else "fail", line)


def _ultralytics_settings() -> Check | None:
    from bastion.distill.ultra import config_dir

    settings = config_dir() / "settings.json"
    if not settings.is_file():
        return None
    try:
        data = json.loads(settings.read_text())
    except json.JSONDecodeError:
        return Check("ultralytics settings", "warn", f"{settings} is unreadable; it is rewritten on next use")
    on = [k for k in ("sync", "hub", "wandb", "mlflow", "comet", "clearml", "neptune", "dvc") if data.get(k)]
    if on:
        return Check(
            "ultralytics settings",
            "warn",
            f"{', '.join(on)} enabled in {settings}; bastion turns them off before every use",
        )
    return Check("ultralytics settings", "ok", "integrations and sync off")


# `name==version \` at the start of a line of a pip-compile lock; the `--hash=` lines and comments that follow it
# say nothing about the version.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """The pins of one requirements lock (``requirements/*.txt``, made by ``make lock``), by normalised name."""
    return {_norm(name): version for name, version in _PIN.findall(path.read_text())}


def checkout_locks() -> list[Path]:
    """The locks of the checkout this bastion runs from (an editable install); [] for an installed wheel."""
    folder = Path(__file__).resolve().parents[1] / "requirements"
    return sorted(folder.glob("*.txt")) if (folder / "core.txt").is_file() else []


# Build tools the locks pin so that bastion itself builds the same everywhere; what runs does not depend on them,
# and every new venv brings its own pip and setuptools.
_BUILD_TOOLS = frozenset({"pip", "setuptools", "wheel"})


def version_drift(locks: list[Path]) -> list[str]:
    """One line per installed distribution whose version is not the one the locks pin (the locks agree); a pinned
    package that is not installed belongs to another extra set and is not drift."""
    pins: dict[str, str] = {}
    for lock in locks:
        pins.update(read_lock(lock))
    for tool in _BUILD_TOOLS:
        pins.pop(tool, None)
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    return [
        f"{name} {installed[name]} (lock: {pins[name]})"
        for name in sorted(pins)
        if name in installed and installed[name] != pins[name]
    ]


def _versions(lock: Path | None) -> Check:
    locks = [lock] if lock is not None else checkout_locks()
    if not locks:
        return Check(
            "installed versions",
            "warn",
            "no lock to compare with: bastion is installed from a wheel, "
            "not a checkout; pass --lock (the wheelhouse carries requirements.txt)",
        )
    drift = version_drift(locks)
    where = ", ".join(str(p) for p in locks) if lock is not None else f"{locks[0].parent}/"
    if drift:
        return Check(
            "installed versions",
            "warn",
            f"{len(drift)} differ from {where}: {'; '.join(drift)} — "
            "reinstall from the lock (make install / install-dev) or refresh it deliberately (make lock)",
        )
    return Check("installed versions", "ok", f"installed packages match {where}")


def doctor_command(
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    lock: Optional[Path] = typer.Option(
        None,
        "--lock",
        help="Compare installed versions with this lock file "
        "(default: the checkout's requirements/*.txt, when run from one).",
    ),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="A node's storage directory (storage.dir in node.yaml): also warn unless it is on an encrypted "
        "block device.",
    ),
) -> None:
    """Check offline readiness: state directory, trust store, registry, vendored models, providers, egress,
    installed versions against the lock.

    With --storage, also whether a node's storage directory is on an encrypted block device.

    Example: bastion doctor --json --storage /var/lib/bastion/node-data
    """
    if lock is not None and not lock.is_file():
        from bastion.errors import InputNotFoundError

        raise InputNotFoundError(f"lock file not found: {lock}")
    checks = run_checks(lock, None if storage is None else Path(storage) if storage.strip() else Path(" "))
    failed = any(c.status == "fail" for c in checks)
    if json_out:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        table = Table(show_edge=False)
        for col in ("check", "status", "detail"):
            table.add_column(col)
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", escape(c.detail))  # "[tensorrt]" is text
        out.print(table)
    if failed:
        raise typer.Exit(1)
