"""INT8 that holds on the unit that runs it: the CPU class probe, the recipes a target allows, the verdict signed into
the manifest, and the check a unit makes when it loads an INT8 bundle gated on another CPU class."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from bastion import Detector
from bastion.errors import ConfigError, ModelLoadError
from bastion.hardware.isa import CLASSES, ENV_OVERRIDE, classes_holding, classify, cpu_flags, probe_isa, resolve_target
from bastion.models import Bundle
from bastion.models.keys import generate_keypair, load_private_key
from bastion.models.trust import TrustStore
from bastion.runtime import int8_check
from conftest import SAMPLE_IMAGES, run_cli
from int8_kit import int8_verdict


@pytest.fixture(autouse=True)
def warns_afresh(monkeypatch):
    """The INT8 warning is said once per process and bundle; each test starts as a fresh process would (an xdist
    worker runs many tests in one, in an order these tests must not depend on)."""
    monkeypatch.setattr(int8_check, "_warned", set())


EPYC_AVX2 = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni\n"
CASCADE_LAKE = "flags\t\t: fpu sse avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni\n"
SKYLAKE_SP = "flags\t\t: fpu sse avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n"
SAPPHIRE_RAPIDS = CASCADE_LAKE.rstrip() + " avx_vnni amx_bf16 amx_tile amx_int8\n"
ALDER_LAKE = "flags\t\t: fpu sse avx avx2 fma avx_vnni\n"
ORIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
CORTEX_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    "cpuinfo, machine, expected",
    [
        (EPYC_AVX2, "x86_64", "x86-avx2"),
        (SKYLAKE_SP, "x86_64", "x86-avx512"),
        (CASCADE_LAKE, "x86_64", "x86-avx512-vnni"),
        (ALDER_LAKE, "x86_64", "x86-avx-vnni"),
        (SAPPHIRE_RAPIDS, "x86_64", "x86-amx"),
        ("flags\t: fpu sse sse2\n", "x86_64", "x86-sse"),
        (ORIN, "aarch64", "arm64-dotprod"),
        (CORTEX_A72, "aarch64", "arm64"),
    ],
)
def test_cpu_class_from_cpuinfo(tmp_path, cpuinfo, machine, expected):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    assert classify(cpu_flags(cpuinfo), machine).name == expected
    assert probe_isa(tmp_path, machine, env={}).name == expected
    assert probe_isa(tmp_path, machine, env={ENV_OVERRIDE: "x86-avx2"}).name == "x86-avx2"  # the override wins


def test_unknown_cpu_class_and_profile_without_class_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="BASTION_CPU_CLASS: unknown CPU instruction-set class 'x86-avx3'"):
        probe_isa(env={ENV_OVERRIDE: "x86-avx3"})
    with pytest.raises(ConfigError, match="neither a device profile nor a CPU class"):
        resolve_target("no-such-profile")
    proc = run_cli(
        "quantize", "--model", "yolov5n", "--calib", str(SAMPLE_IMAGES), "--data", "none.yaml", "--target", "x86-avx3"
    )
    assert proc.returncode == 1 and "x86-avx3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    profile = tmp_path / "box.yaml"
    profile.write_text(
        "name: box\ndescription: d\nkind: cpu\nmemory_mb: 100\npreferred_backend: ort-cpu\n"
        "precision: fp32\nmax_batch: 1\nmax_imgsz: 320\n"
    )
    with pytest.raises(ConfigError, match="names no CPU instruction-set class"):
        resolve_target(str(profile))


def test_targets_get_only_recipes_that_hold_there():
    from bastion.distill.int8_recipe import candidates

    assert resolve_target("x86-cpu").isa.name == "x86-avx2"  # the profile names the least capable CPU it covers
    assert resolve_target("jetson-orin-nano-8gb").isa.name == "arm64-dotprod"
    avx2 = candidates(resolve_target("x86-cpu").isa)
    assert avx2 and all(r.saturation_free for r in avx2)  # U8S8 with 8-bit weights saturates on AVX2
    vnni = candidates(CLASSES["x86-avx512-vnni"])
    assert vnni[0].name == "u8s8" and not vnni[0].saturation_free  # exact there, and the fastest kernel
    # a full-range U8S8 verdict travels only within its kernel family; a saturation-free one across x86
    assert set(classes_holding(False, "x86-avx512-vnni")) == {"x86-avx512-vnni", "x86-avx-vnni", "x86-amx", "x86-sse"}
    assert "x86-avx2" in classes_holding(True, "x86-avx512-vnni")
    assert "arm64" not in classes_holding(True, "x86-avx2")


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    """A real QDQ INT8 yolov5n at 160, calibrated on two sample frames (the numbers do not matter here)."""
    pytest.importorskip("onnx")
    from bastion.distill.quantize import quantize_int8
    from bastion.runtime.backends import open_backend
    from bastion.runtime.detect import DetectOptions

    bundle = Bundle.open("yolov5n")
    base = Detector(open_backend(bundle.model_path, threads=1), bundle.manifest, DetectOptions(imgsz=160))
    out = tmp_path_factory.mktemp("int8") / "yolov5n-int8-160.onnx"
    quantize_int8(base, bundle.model_path, sorted(SAMPLE_IMAGES.glob("*.jpg"))[:2], out, size_hw=(160, 160))
    base.close()
    return out


def _int8_bundle(
    model: Path, out: Path, key_stem: Path, isa: str, saturation_free: bool, fp32_sibling: Path | None = None
) -> Path:
    """A signed INT8 bundle whose verdict says it was gated on ``isa`` (carrying ``fp32_sibling`` if given)."""
    from bastion.distill.int8_gate import static_manifest
    from bastion.runtime.bundle_create import create_bundle

    source = Bundle.open("yolov5n")
    verdict = int8_verdict(
        isa,
        saturation_free,
        onnxruntime="test",
        calibration_sha256="0" * 64,
        calibration_images=2,
        evaluation_sha256="1" * 64,
        int8_map50=0.550,
        map50_drop_points=0.35,
        speedup=1.5,
    )
    fields = static_manifest(source.manifest, 160).model_dump(mode="json", exclude={"files"})
    fields.update(
        name="yolov5n-int8", version="test-int8", precision="int8", int8_verdict=verdict.model_dump(mode="json")
    )
    licenses = [source.root / f.path for f in source.manifest.files if f.role == "license"]
    fields["license"] = {**fields["license"], "files": [p.name for p in licenses]}
    if not key_stem.with_suffix(".pub").exists():
        TrustStore().trust(generate_keypair(key_stem).public_path)
    create_bundle(model, out, fields, licenses, load_private_key(key_stem.with_suffix(".key")), fp32_sibling)
    return out


def _key_stem(tmp_path: Path) -> Path:
    pair_dir = tmp_path / "keys"
    pair_dir.mkdir(exist_ok=True)
    return pair_dir / "team"


def test_bundle_gated_on_vnni_is_flagged_on_an_avx2_cpu_and_refused_when_strict(
    int8_model, tmp_path, monkeypatch, caplog
):
    stem = _key_stem(tmp_path)
    path = _int8_bundle(int8_model, tmp_path / "vnni", stem, "x86-avx512-vnni", saturation_free=False)
    bundle = Bundle.open(path)  # signed and trusted: the verdict is part of the signed manifest
    assert bundle.manifest.int8_verdict.isa == "x86-avx512-vnni"
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")  # this process now sees an AVX2 CPU through the probe
    with caplog.at_level(logging.WARNING, logger="bastion.runtime.int8_check"):
        det = Detector.load(path, warmup=False)
        again = Detector.load(path, warmup=False)
    check = det.int8_check
    assert not check.holds and check.measured_on == "x86-avx512-vnni" and check.running_on == "x86-avx2"
    flagged = [r for r in caplog.records if "gated on x86-avx512-vnni, this CPU is x86-avx2" in r.getMessage()]
    assert len(flagged) == 1, "warned once per bundle and CPU class, not on every load"
    assert len(det.detect(str(SAMPLE_IMAGES / "one-by-one-person-detection-0100.jpg"))) >= 0  # it still runs
    det.close()
    again.close()
    with pytest.raises(ModelLoadError, match="gated on x86-avx512-vnni, this CPU is x86-avx2") as refused:
        Detector.load(path, warmup=False, int8_policy="strict")
    assert "carries no FP32 sibling" in str(refused.value)  # what to do about it, in the same line
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx512-vnni")  # the class it was gated on: nothing to say
    same = Detector.load(path, warmup=False, int8_policy="strict")
    assert same.int8_check.holds and same.int8_check.same
    same.close()


def test_saturation_free_recipe_holds_on_avx2_and_inspect_shows_the_verdict(int8_model, tmp_path, monkeypatch):
    stem = _key_stem(tmp_path)
    path = _int8_bundle(int8_model, tmp_path / "7bit", stem, "x86-avx512-vnni", saturation_free=True)
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    det = Detector.load(path, warmup=False, int8_policy="strict")  # same integers on AVX2: strict accepts it
    assert det.int8_check.holds and not det.int8_check.same
    det.close()
    proc = run_cli("bundle", "inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "int8 verdict" in proc.stdout and "x86-avx512-vnni" in proc.stdout


def test_int8_bundle_without_a_verdict_is_flagged(int8_model, tmp_path, monkeypatch):
    stem = _key_stem(tmp_path)
    path = _int8_bundle(int8_model, tmp_path / "v", stem, "x86-amx", saturation_free=False)
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    import json

    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["int8_verdict"]  # as written before bastion recorded it (re-signed below)
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    (legacy / "signature").unlink()
    assert run_cli("bundle", "sign", str(legacy), "--key", str(stem.with_suffix(".key"))).returncode == 0
    det = Detector.load(legacy, warmup=False)
    assert not det.int8_check.holds and det.int8_check.measured_on == "unknown"
    det.close()
    with pytest.raises(ModelLoadError, match="does not record the CPU"):
        Detector.load(legacy, warmup=False, int8_policy="strict")


def test_fp32_manifests_keep_their_canonical_bytes():
    """The new field is absent, not null, when unset: every bundle signed before it still verifies."""
    manifest = Bundle.open("yolov5n").manifest
    assert manifest.int8_verdict is None and b"int8_verdict" not in manifest.canonical_bytes()


def test_node_audits_an_int8_bundle_from_another_cpu_class_and_strict_refuses_it(int8_model, tmp_path, monkeypatch):
    import json

    import yaml

    from bastion.edge.config import load_config
    from bastion.edge.node import Node

    path = _int8_bundle(int8_model, tmp_path / "vnni", _key_stem(tmp_path), "x86-avx512-vnni", saturation_free=False)
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")
    storage = tmp_path / "data"

    def config(**over) -> Path:
        cfg = {
            "id": "n1",
            "model": str(path),
            "threads": 1,
            "storage": {"dir": str(storage)},
            "sources": [{"name": "cam1", "uri": str(SAMPLE_IMAGES)}],
            "endpoints": {"events": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
            **over,
        }
        (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / "node.yaml"

    node = Node(load_config(config()))
    node.start()
    node.close()
    records = [json.loads(x) for x in (storage / "audit.log").read_text().splitlines()]
    mismatch = [r for r in records if r["kind"] == "int8_cpu_mismatch"]
    assert len(mismatch) == 1, records
    assert mismatch[0]["fields"]["running_on"] == "x86-avx2" and mismatch[0]["fields"]["holds"] is False
    with pytest.raises(ModelLoadError, match="gated on x86-avx512-vnni"):
        Node(load_config(config(int8_policy="strict")))
    kinds = [json.loads(x)["kind"] for x in (storage / "audit.log").read_text().splitlines()]
    # the refusal is the last record before the signed checkpoint a refused start leaves behind (62e0bd5)
    assert kinds[-2:] == ["bundle_refused", "checkpoint"], kinds[-4:]


def test_doctor_reports_this_cpu_class():
    import json

    proc = run_cli("doctor", "--json", env={ENV_OVERRIDE: "x86-avx2"})
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["cpu class"]["detail"].startswith("x86-avx2 — AVX2 without VNNI"), checks["cpu class"]
    proc = run_cli("doctor", "--json")
    here = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}["cpu class"]
    assert here["detail"].startswith(probe_isa().name)


def test_hw_plan_says_whether_the_int8_verdict_holds_on_each_profile(int8_model, tmp_path):
    from bastion.hardware.profiles import load_profile
    from bastion.hardware.planner import plan

    stem = _key_stem(tmp_path)
    vnni = Bundle.open(_int8_bundle(int8_model, tmp_path / "vnni", stem, "x86-avx512-vnni", saturation_free=False))
    safe = Bundle.open(_int8_bundle(int8_model, tmp_path / "7bit", stem, "x86-avx512-vnni", saturation_free=True))
    cpu = load_profile("x86-cpu")
    notes = plan(vnni, cpu, measure_speed=False).notes
    assert any("does NOT hold on x86-avx2" in n and "--target x86-cpu" in n for n in notes), notes
    assert any("holds on x86-avx2" in n and "NOT" not in n for n in plan(safe, cpu, measure_speed=False).notes)
    jetson = plan(safe, load_profile("jetson-orin-nano-8gb"), measure_speed=False).notes
    assert any("not measured with its kernels" in n for n in jetson), jetson
