"""A model team marks what it distils: --classification/--releasable-to/--marking go into the shipped bundle's
signed manifest and into the run's report, so a unit of another nation refuses the bundle (#19 item 3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bastion.models import Bundle
from bastion.models.cli_options import markings_from
from bastion.models.manifest import Markings, report_line
from bastion.models.releasability import ReleasabilityError
from conftest import SHARED, run_cli

MARKED = Markings(classification="SECRET", releasable_to=["CAN", "GBR"], marking="REL TO CAN, GBR")


def test_a_shipped_detector_carries_the_runs_markings_under_its_signature(tmp_path):
    from bastion.distill.detect_pipeline import Candidate
    from bastion.distill.detect_bundles import ship_bundle
    from bastion.models.keys import generate_keypair, load_private_key
    from bastion.models.trust import TrustStore

    pair = generate_keypair(tmp_path / "keys" / "team")
    TrustStore().trust(pair.public_path)
    chosen = Candidate("sliced@320", "sliced", 320, 0.5, 0.3, {}, "baselines/sliced-320", 2.0)
    dataset = SimpleNamespace(root=tmp_path / "val", sha256=lambda: "0" * 64)
    source = Bundle.open("yolov5n").root
    ship_bundle(source, tmp_path / "bundle", load_private_key(pair.private_path), chosen, dataset, markings=MARKED)
    shipped = Bundle.open(tmp_path / "bundle", nation="GBR")  # verified: the signature covers the markings
    assert shipped.manifest.markings == MARKED and shipped.verification.signed
    with pytest.raises(ReleasabilityError, match="not releasable to FRA"):
        Bundle.open(tmp_path / "bundle", nation="FRA")
    ship_bundle(source, tmp_path / "plain", None, chosen, dataset)
    assert Bundle.open_fresh(tmp_path / "plain").manifest.markings is None  # none asked: none given


def test_the_report_says_what_the_bundle_is_marked():
    assert report_line(MARKED) == "Markings (signed into the bundle): SECRET // REL TO: CAN, GBR (REL TO CAN, GBR)."
    assert report_line(None).startswith("Markings: none (every unit may run it")


def test_markings_options_are_checked_before_any_work(tmp_path):
    assert markings_from(None, [], None) is None
    assert markings_from("SECRET", ["can", " gbr"], None).releasable_to == ["CAN", "GBR"]
    for argv, said in (
        (["--releasable-to", "CAN"], "--releasable-to and --marking go with a classification"),
        (["--classification", "SECRET", "--releasable-to", "not a code"], "bad markings"),
        (["--classification", "   "], "classification: is blank"),
        (["--classification", "SECRET\nMarkings (signed into the bundle): UNCLASSIFIED"], "has a control character"),
        (["--classification", "SECRET", "--marking", "a\tb"], "marking: has a control character"),
    ):
        proc = run_cli(
            "distill", "detect", "--teacher", "yolov5n", "--images", str(tmp_path), "--classes", "person",
            "--out", str(tmp_path / "run"), "--no-train", *argv,
        )  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and said in lines[0], proc.stderr
        assert not (tmp_path / "run").exists()  # refused before any stage ran


def test_a_distilled_lm_bundle_carries_its_markings(tmp_path):
    pytest.importorskip("torch")
    from bastion.distill.lm_export import export_lm_bundle

    src = SHARED / "weights" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip("../shared is not present")
    manifest = export_lm_bundle(
        src / "stories260K.bin", src / "hf" / "tokenizer.json", tmp_path / "b", "s", "1", "MIT", "test", [],
        markings=MARKED,
    )  # fmt: skip
    assert manifest.markings == MARKED
    with pytest.raises(ReleasabilityError):
        Bundle.open(tmp_path / "b", allow_unsigned=True, nation="FRA")


@pytest.mark.parametrize(("chosen", "said"), [("sliced@320", "SECRET // REL TO: CAN, GBR"), (None, "nothing ships")])
def test_report_md_states_the_markings_of_what_ships_and_only_then(tmp_path, chosen, said):
    from bastion.distill.candidates import Candidate
    from bastion.distill.detect_report import report_md
    from bastion.distill.spec import DistillSpec

    spec = DistillSpec(teachers=["yolov5n"], images=tmp_path, classes=["person"], out=tmp_path / "run", markings=MARKED)
    candidates = [
        Candidate("yolov5n@320", "teacher", 320, 0.6, 0.4, {}, "yolov5n", 7.5, latency_ms=10.0),
        Candidate("sliced@320", "sliced teacher (no training)", 320, 0.5, 0.3, {}, "baselines/s", 2.0, latency_ms=5.0),
    ]
    labels = {"images": 2, "ground_truth": 0, "pseudo": 2, "corrupt": [], "boxes_per_class": {"person": 3}}
    truth = {"kind": "pseudo-labelled", "images": 2, "labels_sha256": None}
    result = {"labels": labels, "ground_truth": truth, "chosen": chosen, "choice_rule": "rule", "student": "none"}
    markings = [line for line in report_md(spec, result, candidates).splitlines() if line.startswith("Markings")]
    assert len(markings) == 1 and said in markings[0]
