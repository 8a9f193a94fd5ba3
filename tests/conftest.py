"""Shared fixtures: paths to vendored and shared data, and the zero-egress guard around every test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from egress_guard import is_local  # tests/ is on sys.path: pyproject's [tool.pytest.ini_options] pythonpath

REPO = Path(__file__).resolve().parents[1]

# The package under test is the installed one, however it was installed. `python -m pytest` puts the working
# directory first on sys.path, and from the repo root the checkout's bastion/ folder would then shadow the
# installed package: a non-editable install loses bastion.edge & co, which live in other folders. So the checkout
# leaves sys.path here (an editable install finds it through its own import hook), and every Python subprocess a
# test starts runs with PYTHONSAFEPATH (no cwd or script folder on its path either).
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
os.environ["PYTHONSAFEPATH"] = "1"
SAMPLES = REPO / "bastion" / "samples"
SAMPLE_IMAGES = SAMPLES / "images"
PERSON_IMAGE = SAMPLE_IMAGES / "one-by-one-person-detection-0100.jpg"
# Drawn by hand on the image above (one person standing at a table).
PERSON_BOX = (383.0, 12.0, 514.0, 392.0)
SHARED = Path(os.environ.get("BASTION_SHARED", REPO.parent / "shared"))


# Left out of `make test-fast` (-m "not slow"; `make test` runs them all): each took about 2 s or more on a quiet
# 2-core machine (2026-11-29, `--durations`): training, torch export, CLI subprocesses, real nodes on tmpfs, kill -9
# restarts, floods. One list read from a measurement; they belong in @pytest.mark.slow decorators in their files.
SLOW_BY_MEASURE = frozenset(
    {
        "tests/test_cli.py::test_bench_images_json_has_floor_and_ratios",
        "tests/test_cli.py::test_help_lists_commands_and_examples",
        "tests/test_cli_bundles.py::test_a_bundle_is_named_after_its_out_folder_and_its_maker_can_pack_it",
        "tests/test_cli_bundles.py::test_an_encrypted_key_is_asked_for_on_a_terminal_and_named_without_one",
        "tests/test_cli_bundles.py::test_an_onnx_without_metadata_takes_its_size_from_its_input_or_imgsz",
        "tests/test_cli_bundles.py::test_bundle_create_refuses_bad_metadata",
        "tests/test_cli_bundles.py::test_full_operator_flow",
        "tests/test_cli_bundles.py::test_key_errors_are_one_line",
        "tests/test_distill_pipeline.py::test_checkpoint_teacher_that_is_not_ultralytics_is_refused_clearly",
        "tests/test_distill_pipeline.py::test_distill_bad_input",
        "tests/test_distill_pipeline.py::test_held_out_ground_truth_gets_a_bootstrap_interval",
        "tests/test_distill_pipeline.py::test_per_class_thresholds_chosen_against_ground_truth",
        "tests/test_eval.py::test_eval_subset_and_bad_dataset",
        "tests/test_hardening_bundles.py::test_member_count_is_bounded_without_reading_every_header",
        "tests/test_hardening_bundles.py::test_node_reload_of_a_bomb_is_refused_quickly_and_keeps_serving",
        "tests/test_hardening_control.py::test_a_replay_answer_is_bounded_in_size_and_the_sdk_still_gets_every_event",
        "tests/test_hardening_control.py::test_an_ask_stream_waits_for_a_slow_reader_instead_of_dropping_pieces",
        "tests/test_hardening_control.py::test_an_oversized_answer_is_never_buffered_by_the_sdk",
        "tests/test_hardening_control.py::test_multi_frame_flood_keeps_rss_bounded_and_other_clients_answered",
        "tests/test_hardening_control.py::test_one_client_cannot_hold_the_control_thread_with_expensive_requests",
        "tests/test_hardening_control.py::test_sdk_detects_a_node_whose_seq_went_backwards",
        "tests/test_hardening_control.py::test_subscriptions_longer_than_any_topic_are_refused_by_the_events_socket",
        "tests/test_hardening_node.py::test_a_source_fault_is_retried_and_never_ends_its_reader",
        "tests/test_hardening_node.py::test_a_tampered_checkpoint_signature_is_refused",
        "tests/test_hardening_node.py::test_an_overlong_audit_line_is_damage_read_in_bounded_memory",
        "tests/test_hardening_node.py::test_full_disk_pauses_storage_keeps_every_thread_alive_and_recovers",
        "tests/test_hardening_node.py::test_node_process_exits_nonzero_when_a_worker_thread_dies",
        "tests/test_hardening_node.py::test_signed_checkpoints_catch_forged_append_rewrite_and_truncation",
        "tests/test_hardening_node.py::test_the_node_own_wal_never_fills_the_disk_for_good",
        "tests/test_hardening_node.py::test_watchdog_pings_only_while_the_inference_loop_is_alive",
        "tests/test_hardening_node.py::test_worker_thread_dying_is_reported_and_stops_the_node",
        "tests/test_hardening_store.py::test_a_wal_that_filled_the_disk_gives_its_space_back_once_a_small_file_is_freed",
        "tests/test_hardening_store.py::test_emptied_events_db_refuses_to_start",
        "tests/test_hardening_store.py::test_older_copy_of_events_db_refuses_even_without_the_mark_file_and_gap_is_accepted_audited",
        "tests/test_hardening_store.py::test_wal_lost_after_kill_9_refuses_to_start_and_accept_gap_continues_above_the_mark",
        "tests/test_lm.py::test_bench_lm_against_transformers_generate_same_tokens",
        "tests/test_lm.py::test_distillation_resumes_where_a_killed_run_stopped",
        "tests/test_lm.py::test_export_round_trip_matches_torch",
        "tests/test_lm.py::test_pruning_and_distillation_of_a_tiny_random_teacher",
        "tests/test_newcomer.py::test_models_path_finds_what_models_list_shows",
        "tests/test_newcomer.py::test_the_readme_client_snippet_with_no_node_running_says_so",
        "tests/test_node.py::test_100_subscribers_each_receive_every_event",
        "tests/test_node.py::test_control_survives_10000_malformed_messages",
        "tests/test_node.py::test_curve_allows_listed_clients_and_refuses_and_audits_others",
        "tests/test_node.py::test_encrypted_snapshots_and_retention",
        "tests/test_node.py::test_events_are_stored_then_published_in_seq_order",
        "tests/test_node.py::test_missing_source_backs_off_while_others_run_and_corrupt_frames_are_counted",
        "tests/test_node.py::test_node_status_cli_and_unsigned_override_is_audited",
        "tests/test_node.py::test_node_survives_kill_9_without_gaps_or_duplicates",
        "tests/test_node.py::test_storage_failure_pauses_publishing",
        "tests/test_registry.py::test_two_writers_at_once_keep_the_index_consistent",
        "tests/test_sdk_hostile_node.py::test_a_published_message_over_the_bound_is_dropped_unread",
        "tests/test_stream.py::test_pipeline_matches_serial_detection_in_order",
        "tests/test_tensorrt.py::test_engine_list_and_clear_on_a_real_cache",
        "tests/test_tensorrt.py::test_without_tensorrt_the_commands_say_what_to_install",
    }
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_BY_MEASURE:
            item.add_marker(pytest.mark.slow)


def _contexts_close_without_waiting() -> None:
    """A test that fails with a ZeroMQ socket still open must not hang the whole run.

    pyzmq destroys a forgotten context when it is collected, and with the default linger of -1 that
    waits forever for a peer that is gone (seen: a failed hardening test held CI until its limit).
    Every socket a test (or the node under test) makes therefore starts with linger 0; the node and
    the SDK set it themselves too, so this changes no behaviour a test checks.
    """
    import zmq

    original = zmq.Context.__init__

    def init(self: zmq.Context, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        self.setsockopt(zmq.LINGER, 0)

    zmq.Context.__init__ = init  # type: ignore[method-assign]


_contexts_close_without_waiting()


@pytest.fixture
def shared() -> Path:
    """``../shared`` (CI has it beside the clone); tests that need it skip cleanly without it."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture
def coco128(shared: Path) -> Path:
    path = shared / "data" / "coco128" / "coco128.yaml"
    if not path.is_file():
        pytest.skip("coco128 is not in ../shared")
    return path


@pytest.fixture(autouse=True)
def bastion_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty BASTION_HOME (trust store, registry, caches), CLI subprocesses too."""
    home = tmp_path_factory.mktemp("bastion-home")
    monkeypatch.setenv("BASTION_HOME", str(home))
    monkeypatch.delenv("BASTION_KEY_PASSPHRASE", raising=False)
    return home


class EgressAttempt(AssertionError):
    pass


def _address_host(address: object) -> object:
    if isinstance(address, tuple) and address:
        return address[0]
    return None  # AF_UNIX paths and the like are local


@pytest.fixture(autouse=True)
def zero_egress(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if anything in-process tries to reach a non-loopback address."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo
    real_create = socket.create_connection

    def guard(what: str, host: object) -> None:
        if not is_local(host):
            attempts.append(f"{what}({host!r})")
            raise EgressAttempt(f"zero-egress: {what} to {host!r} attempted")

    def connect(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard("connect", _address_host(address))
        return real_connect(self, address)

    def connect_ex(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard("connect_ex", _address_host(address))
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        guard("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        guard("create_connection", _address_host(address))
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield attempts
    assert not attempts, f"network egress attempted: {attempts}"


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``bastion`` in a subprocess under the same zero-egress guard (tests/egress_guard.py)."""
    full_env = {**os.environ, **(env or {})}
    # No empty entry: an empty PYTHONPATH item means the cwd, the repo root, whose bastion/ would shadow the package.
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), full_env.get("PYTHONPATH")]))
    # PYTHONSAFEPATH keeps the cwd (the repo) off sys.path on 3.11+; the first statement does it on 3.10.
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "import egress_guard; egress_guard.install(); from bastion.cli import run; run()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )
