"""Internal code names backends by their canonical names (``ort-cpu``); the old spellings (``cpu``, ``cuda``,
``tensorrt``) are for users only. Proven by emptying the alias table: every internal path below must still open its
real ONNX Runtime session, while a user's alias would now be refused (the CLI's alias is tested in test_backends)."""

import pytest

from bastion.errors import ConfigError
from bastion.hardware import backend_names
from bastion.models import Bundle


@pytest.fixture
def no_aliases(monkeypatch):
    monkeypatch.setattr(backend_names, "ALIASES", {})
    with pytest.raises(ConfigError):
        backend_names.backend_name("cpu")  # the table really is gone: an internal alias would fail below


def test_bundle_create_opens_its_sessions_by_canonical_name(no_aliases):
    from bastion.runtime.bundle_create import _smoke_test, infer_fields, infer_input

    bundle = Bundle.open("yolov5n")
    assert infer_input(bundle.model_path)["input"]["name"]
    infer_fields(bundle.model_path)
    _smoke_test(bundle.model_path.read_bytes(), bundle.manifest)


def test_distill_candidates_evaluate_on_the_canonical_cpu_backend(no_aliases):
    from bastion.distill.candidates import open_for_eval

    detector = open_for_eval(Bundle.open("yolov5n"), 320)
    try:
        assert detector.backend.providers == ["CPUExecutionProvider"]
    finally:
        detector.close()
