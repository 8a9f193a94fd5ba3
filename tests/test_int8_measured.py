"""INT8 verdicts say where they were measured (issue #22, audit): the execution provider the INT8 session really ran
on, whether each candidate was measured with the target's kernels, a unit on another provider, the verdict in the
reports, entropy calibration that is not MinMax in disguise, and a bad or changed ``--target`` in ``distill
detect``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bastion.errors import ConfigError, ModelLoadError
from bastion.hardware.isa import CLASSES, ENV_OVERRIDE, ep_class, probe_isa
from bastion.models import Bundle
from bastion.models.manifest import Int8Verdict
from bastion.runtime import int8_check
from conftest import SAMPLE_IMAGES, run_cli
from int8_kit import int8_verdict

CUDA_EP = "CUDAExecutionProvider"


@pytest.fixture(autouse=True)
def warns_afresh(monkeypatch):
    monkeypatch.setattr(int8_check, "_warned", set())


def _verdict(**over) -> Int8Verdict:
    return int8_verdict(**{"target": "x86-cpu", **over})


def _int8_manifest(verdict: Int8Verdict):
    manifest = Bundle.open("yolov5n").manifest
    return manifest.model_copy(update={"precision": "int8", "int8_verdict": verdict})


# ---- 1. the execution provider ------------------------------------------------------------------------------


def test_ep_class_names_the_provider_and_gpu_generation():
    assert ep_class(CUDA_EP, "8.7") == "cuda-sm87"
    assert ep_class("TensorrtExecutionProvider", "8.9") == "tensorrt-sm89"
    assert ep_class("TensorRT 10.3 (int8, Orin)", "8.7") == "tensorrt-sm87"
    assert ep_class(CUDA_EP, "") == "cuda-sm?"  # no generation found (no NVML, a Jetson): unknown, matches nothing
    assert ep_class("CPUExecutionProvider") == probe_isa().name


def test_a_cpu_verdict_on_a_cuda_provider_warns_and_strict_falls_back_or_refuses():
    manifest = _int8_manifest(_verdict())
    providers = [CUDA_EP, "CPUExecutionProvider"]
    check = int8_check.check_int8(manifest, "s1", providers, "warn", running=CLASSES["x86-avx2"])
    assert not check.holds and check.runs == "int8" and check.running_on == CUDA_EP
    assert "measured on CPUExecutionProvider (x86-avx2) but runs on CUDAExecutionProvider" in check.message
    strict = int8_check.check_int8(
        manifest, "s1", providers, "strict", running=CLASSES["x86-avx2"], has_fp32_sibling=True
    )
    assert strict.fell_back and strict.precision == "fp32"
    with pytest.raises(ModelLoadError, match="runs on CUDAExecutionProvider") as refused:
        int8_check.check_int8(manifest, "s1", providers, "strict", running=CLASSES["x86-avx2"])
    hint = str(refused.value)
    # the way out is the CPU provider it was measured on, not "--target CUDAExecutionProvider" (no such target)
    assert "--device ort-cpu" in hint and "--target CUDA" not in hint, hint


def test_a_cuda_verdict_holds_on_the_same_gpu_generation_only():
    manifest = _int8_manifest(
        _verdict(isa="cuda-sm87", holds_on=["cuda-sm87"], execution_provider=CUDA_EP, measured_on_target=False)
    )
    same = int8_check.check_int8(
        manifest, "s2", [CUDA_EP], "strict", running=CLASSES["x86-avx2"], running_ep="cuda-sm87"
    )
    assert same.holds and same.same and same.running_on == "cuda-sm87"
    other = int8_check.check_int8(
        manifest, "s2", [CUDA_EP], "warn", running=CLASSES["x86-avx2"], running_ep="cuda-sm89"
    )
    assert not other.holds and other.measured_on == "cuda-sm87" and other.running_on == "cuda-sm89"
    assert "measured on CUDAExecutionProvider cuda-sm87, this unit runs it on cuda-sm89" in other.message
    with pytest.raises(ModelLoadError, match="quantize it again on this unit's provider"):
        int8_check.check_int8(manifest, "s2", [CUDA_EP], "strict", running=CLASSES["x86-avx2"], running_ep="cuda-sm89")
    on_cpu = int8_check.check_int8(manifest, "s2", ["CPUExecutionProvider"], "warn", running=CLASSES["x86-amx"])
    assert not on_cpu.holds and "runs on CPUExecutionProvider" in on_cpu.message
    unknown = _int8_manifest(  # gated on a GPU whose generation no probe could read (no NVML: a Jetson)
        _verdict(isa="cuda-sm?", holds_on=["cuda-sm?"], execution_provider=CUDA_EP, measured_on_target=False)
    )
    blind = int8_check.check_int8(unknown, "s3", [CUDA_EP], "warn", running=CLASSES["x86-avx2"], running_ep="cuda-sm?")
    assert not blind.holds  # two unknown GPUs are never taken to be the same one


@pytest.fixture
def tiny_gate(coco128):
    """quantize_and_gate on 4 COCO128 images at 160 with one 7-bit recipe: seconds, the numbers do not matter."""
    pytest.importorskip("onnx")
    from bastion.distill.datasets import load_data_yaml

    dataset = load_data_yaml(coco128, "val", 4)
    calibration = sorted((coco128.parent / "images" / "train2017").glob("*.jpg"))[:2]
    return dataset, calibration


def _opened_on(monkeypatch, providers: list[str] | None = None) -> list[str]:
    """Record the device every gate session is opened on; ``providers``: make the sessions report those (a GPU
    build machine simulated on the CPU provider)."""
    from bastion.distill import int8_gate
    from bastion.runtime.backends import open_backend

    asked: list[str] = []

    def opened(model, device="auto", **kw):
        asked.append(device)
        backend = open_backend(model, device="ort-cpu", **kw)
        if providers:
            backend.providers = list(providers)
        return backend

    monkeypatch.setattr(int8_gate, "open_backend", opened)
    return asked


def test_the_gate_measures_on_the_cpu_provider_and_records_the_one_it_ran_on(tiny_gate, tmp_path, monkeypatch):
    from bastion.distill.int8_gate import quantize_and_gate
    from bastion.distill.int8_recipe import U8S8_7BIT

    dataset, calibration = tiny_gate
    asked = _opened_on(monkeypatch)
    bundle = Bundle.open("yolov5n")
    result = quantize_and_gate(
        bundle, calibration, dataset, 160, 100, tmp_path / "int8", recipes=[U8S8_7BIT], min_speedup=0
    )
    # "auto" would take TensorRT or CUDA on a GPU build machine: the CPU target's verdict is measured on CPU kernels
    assert asked and set(asked) == {"ort-cpu"}, asked
    assert result.accepted and result.execution_provider == "CPUExecutionProvider"
    here = probe_isa().name
    assert result.candidates[0]["execution_provider"] == "CPUExecutionProvider"
    assert result.candidates[0]["measured_on"] == here and result.candidates[0]["target_kernels"] is True
    verdict = Bundle.open(tmp_path / "int8", allow_unsigned=True).manifest.int8_verdict
    assert verdict.execution_provider == "CPUExecutionProvider" and verdict.isa == here
    assert result.int8_verdict == verdict.model_dump(mode="json")  # what the reports show is what was signed


def test_a_verdict_measured_on_cuda_records_cuda_and_its_gpu_not_the_cpu_class(tiny_gate, tmp_path, monkeypatch):
    from bastion.distill.int8_gate import quantize_and_gate
    from bastion.distill.int8_recipe import U8S8_7BIT
    from bastion.hardware import probe

    dataset, calibration = tiny_gate
    asked = _opened_on(monkeypatch, [CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(probe, "nvidia_gpus", lambda: [probe.GpuInfo(0, "Orin", 8000, "8.7", "540", None)])
    result = quantize_and_gate(
        Bundle.open("yolov5n"),
        calibration,
        dataset,
        160,
        100,
        tmp_path / "int8",
        recipes=[U8S8_7BIT],
        min_speedup=0,
        device="ort-cuda",
        target="x86-cpu",
    )
    assert set(asked) == {"ort-cuda"}
    assert result.isa == "cuda-sm87" and result.execution_provider == CUDA_EP and not result.measured_on_target
    assert result.candidates[0]["target_kernels"] is False and result.candidates[0]["measured_on"] == "cuda-sm87"
    assert "NOT measured with the target's kernels" in result.note and CUDA_EP in result.note
    verdict = Bundle.open(tmp_path / "int8", allow_unsigned=True).manifest.int8_verdict
    assert verdict.execution_provider == CUDA_EP and verdict.isa == "cuda-sm87" and verdict.holds_on == ["cuda-sm87"]
    assert not verdict.measured_on_target and verdict.target_isa == "x86-avx2"


# ---- 3. per candidate: measured with the target's kernels? -------------------------------------------------


def test_a_refusal_says_which_candidates_were_not_measured_with_the_targets_kernels(tiny_gate, monkeypatch):
    from bastion.distill.int8_gate import quantize_and_gate
    from bastion.distill.int8_recipe import U8S8, U8S8_7BIT

    dataset, calibration = tiny_gate
    monkeypatch.setenv(ENV_OVERRIDE, "x86-avx2")  # this CPU saturates full-range U8S8; the VNNI target does not
    result = quantize_and_gate(
        Bundle.open("yolov5n"),
        calibration,
        dataset,
        160,
        -100,  # nothing passes: a refusal
        None,
        recipes=[U8S8, U8S8_7BIT],
        target="x86-avx512-vnni",
    )
    assert not result.accepted
    flags = {c["recipe"]: c["target_kernels"] for c in result.candidates}
    assert flags == {"u8s8": False, "u8s8-7bit": True}  # 7-bit weights compute the same integers on both
    assert "NOT measured with the target's kernels (x86-avx512-vnni): u8s8 (on x86-avx2" in result.reason
    assert "u8s8-7bit (on" not in result.reason, result.reason


# ---- 4. the signed verdict in the reports ---------------------------------------------------------------------


def _gate(verdict: Int8Verdict | None) -> dict:
    return {
        "accepted": verdict is not None,
        "reason": "accepted: mAP50 drop 1.39 points ≤ 3" if verdict else "refused: mAP50 drops 9.55 points",
        "imgsz": 320,
        "fp32": {"map50": 0.553},
        "int8": {"map50": 0.539},
        "map50_drop_points": 1.39,
        "speedup": 1.21,
        "target": "x86-cpu",
        "note": "",
        "int8_verdict": verdict.model_dump(mode="json") if verdict else None,
    }


def test_the_distill_report_carries_the_signed_verdict(tmp_path):
    from bastion.distill.detect_report import report_md
    from bastion.distill.spec import DistillSpec

    spec = DistillSpec(teachers=["yolov5n"], images=tmp_path, classes=["person"], out=tmp_path / "run", imgsz=320)
    verdict = _verdict()
    result = {
        "labels": {"images": 4, "ground_truth": 4, "pseudo": 0, "corrupt": [], "boxes_per_class": {"person": 3}},
        "ground_truth": {"kind": "pseudo-labelled", "images": 1},
        "int8_gate": {"sliced": _gate(verdict), "student": _gate(None)},
        "student": "not trained",
        "chosen": None,
        "choice_rule": "rule",
    }
    text = report_md(spec, result, [])
    for line in verdict.summary().splitlines():
        assert f"- {line}" in text, text
    assert "Signed INT8 verdict (sliced)" in text and "Signed INT8 verdict (student)" not in text
    for part in ("u8s8-7bit", "x86-avx2", "CPUExecutionProvider", "onnxruntime 1.32.0", "aaaaaaaaaaaa", "1.39"):
        assert part in text


def test_the_demo_report_int8_lines_carry_the_signed_verdict():
    from bastion.demo_report import int8_lines

    verdict = _verdict()
    report = {
        "candidates": [
            {"name": "sliced@320", "latency_ms": 8.0},
            {"name": "sliced-int8@320", "latency_ms": 6.5},
        ],
        "int8_gate": {"sliced": _gate(verdict), "student": _gate(None)},
    }
    lines = int8_lines(report)
    signed = [line for line in lines if line.startswith("INT8 verdict of sliced")]
    assert len(signed) == 1 and "; ".join(verdict.summary().splitlines()) in signed[0]
    assert not any(line.startswith("INT8 verdict of student") for line in lines)  # refused: nothing signed


# ---- 5. entropy calibration and the neck concats ---------------------------------------------------------------


class _Stub:
    """What quantize_int8 reads of a Detector: the input's name and size, and how a frame becomes a tensor. Frames
    become heavy-tailed noise (Student's t), where KL calibration clips the tails and MinMax cannot."""

    def __init__(self, name: str) -> None:
        from types import SimpleNamespace

        self.backend = SimpleNamespace(inputs=[SimpleNamespace(name=name)])
        self.size = (16, 16)
        self.rng = np.random.default_rng(0)

    def prepare(self, image, size_hw):
        return self.rng.standard_t(2, size=(3, *size_hw)).astype(np.float32), None


def _tiny_conv(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w"])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _input_scale(path: Path) -> float:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return float(consts[q.input[1]])


def test_entropy_calibration_chooses_a_range_not_minmax(tmp_path, capsys):
    pytest.importorskip("onnx")
    from dataclasses import replace

    from bastion.distill.int8_recipe import U8S8_7BIT
    from bastion.distill.quantize import quantize_int8

    model = _tiny_conv(tmp_path / "tiny.onnx")
    images = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]
    scales = {}
    for method in ("minmax", "entropy"):
        out = quantize_int8(
            _Stub("x"), model, images, tmp_path / f"{method}.onnx", (16, 16), replace(U8S8_7BIT, calibration=method)
        )
        scales[method] = _input_scale(out)
    # ONNX Runtime's defaults (128 bins, 128 quantized bins) leave one threshold to try: the full range, MinMax's
    assert scales["entropy"] < 0.5 * scales["minmax"], scales
    assert capsys.readouterr().out == ""  # ORT's progress print()s stay off stdout (bastion quantize --json)


def test_the_fast_entropy_search_finds_onnx_runtimes_thresholds_exactly():
    """quantize.entropy_threshold replaces ORT's per-bin Python loops with numpy; the thresholds must not move."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from bastion.distill.quantize import entropy_threshold

    ort = HistogramCollector("entropy", False, 512, 128, None, None)
    rng = np.random.default_rng(0)
    for k, data in enumerate(
        [
            rng.standard_t(2, 5000),  # heavy tails both sides
            np.abs(rng.standard_t(3, 5000)),  # one-sided, as after a SiLU
            np.r_[rng.normal(0, 1, 5000), rng.normal(6, 0.1, 50)],  # a far cluster
            np.r_[np.zeros(5000), np.ones(7)],  # nearly every bin empty
        ]
    ):
        data = data.astype(np.float32)
        top = np.array(np.abs(data).max(), dtype=np.float32)
        counts, edges = np.histogram(data, 512 if k % 2 else 640, range=(-top, top))
        histogram = (counts, edges, data.min(), data.max())
        assert entropy_threshold(histogram, 128) == ort.get_entropy_threshold(histogram, 128), k


def test_targets_that_saturate_try_entropy_calibrated_7bit_weights_first():
    from bastion.distill.int8_recipe import candidates

    names = [r.name for r in candidates(CLASSES["x86-avx2"])]
    assert names[:2] == ["u8s8-7bit-entropy", "u8s8-7bit-symact-first-fp32"], names
    assert [r.name for r in candidates(CLASSES["x86-amx"])][0] == "u8s8"  # exact there: full range first


def test_the_neck_concats_are_the_ones_on_the_paths_into_the_head():
    pytest.importorskip("onnx")
    from bastion.distill.int8_recipe import RECIPES
    from bastion.distill.quantize import neck_concats
    from bastion.models import zoo_path

    found = neck_concats(zoo_path("yolov5n") / "yolov5n-dynamic.onnx")
    assert sorted(found) == sorted(f"/model.{i}/Concat" for i in (16, 17, 19, 20, 22, 23))
    assert "neck concats FP32" in RECIPES["u8s8-7bit-symact-first-neck-fp32"].describe()


# ---- 2. --target in distill detect ----------------------------------------------------------------------------


def test_a_bad_target_is_refused_before_any_stage_runs(tmp_path):
    from bastion.distill.spec import DistillSpec, checked

    with pytest.raises(ConfigError, match="--target 'x86-avx3' is neither a device profile nor a CPU class"):
        checked(
            DistillSpec, teachers=["yolov5n"], images=tmp_path, classes=["person"], out=tmp_path / "r",
            int8_target="x86-avx3",
        )  # fmt: skip
    assert checked(
        DistillSpec, teachers=["yolov5n"], images=tmp_path, classes=["person"], out=tmp_path / "r",
        int8_target="x86-cpu",
    ).int8_target == "x86-cpu"  # fmt: skip
    proc = run_cli(
        "distill", "detect", "--teacher", "yolov5n", "--images", str(SAMPLE_IMAGES), "--classes", "person",
        "--out", str(tmp_path / "run"), "--no-train", "--target", "x86-avx3",
    )  # fmt: skip
    assert proc.returncode == 1 and "x86-avx3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "teachers").exists() and not (tmp_path / "run" / "labels").exists()


def test_a_changed_int8_setting_redoes_the_cached_candidates(tmp_path):
    from bastion.distill.run import DetectRunDir

    def stage_done(target):
        run = DetectRunDir(tmp_path / "run")
        run.record("spec", {"int8": True, "int8_target": target, "max_int8_drop": 1.0})
        return run

    run = stage_done("x86-avx512-vnni")
    assert not run.done("baselines")
    for name in ("labels", "baselines", "report"):
        with run.stage(name) as (_, result):
            result["candidates"] = []
    assert run.state["stages"]["baselines"]["inputs"]["int8_target"] == "x86-avx512-vnni"
    assert "inputs" not in run.state["stages"]["labels"]  # the labels do not depend on the INT8 target
    same = stage_done("x86-avx512-vnni")
    assert same.done("baselines") and same.done("report")  # the same settings: cached
    again = stage_done("x86-cpu")
    assert again.done("labels") and not again.done("baselines") and not again.done("report")  # it and what follows
    assert again.stale("baselines") == "baselines was measured with int8_target 'x86-avx512-vnni', now 'x86-cpu'"
    old = json.loads((tmp_path / "run" / "run.json").read_text())
    del old["stages"]["baselines"]["inputs"]  # a run cached before the inputs were stored: cannot tell, redo
    (tmp_path / "run" / "run.json").write_text(json.dumps(old))
    assert not stage_done("x86-avx512-vnni").done("baselines")


def test_distill_detect_rerun_with_another_target_measures_and_reports_the_new_one(coco128, tmp_path, monkeypatch):
    """No training, the gate replaced by one that only says what it was asked for: the stage caching is under test."""
    pytest.importorskip("onnx")
    from bastion.distill import int8_gate
    from bastion.distill.detect_pipeline import DistillSpec, run_distill

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((coco128.parent / "images" / "train2017").glob("*.jpg"))[:8]:
        shutil.copy(p, images / p.name)
    asked: list[str | None] = []

    def gate(source, calibration, dataset, imgsz, max_drop, out_dir, target=None, **kw):
        asked.append(target)
        return int8_gate.GateResult(
            False, f"refused (gated for {target})", imgsz, {"map50": 0.5}, {"map50": 0.4}, 10.0, 1.0, target=target
        )

    monkeypatch.setattr(int8_gate, "quantize_and_gate", gate)

    def run(target: str) -> str:
        spec = DistillSpec(
            teachers=["yolov5n"], images=images, classes=["person"], imgsz=160, out=tmp_path / "run",
            int8_target=target,
        )  # fmt: skip
        run_distill(spec)
        return (tmp_path / "run" / "report" / "report.md").read_text()

    assert "gated for x86-avx512-vnni" in run("x86-avx512-vnni")
    assert asked == ["x86-avx512-vnni"]
    assert "gated for x86-avx512-vnni" in run("x86-avx512-vnni") and asked == ["x86-avx512-vnni"]  # cached
    report = run("x86-cpu")
    assert asked == ["x86-avx512-vnni", "x86-cpu"]  # measured again for the new target
    assert "gated for x86-cpu" in report and "x86-avx512-vnni" not in report


# ---- 6. hw plan on an unsigned bundle ----------------------------------------------------------------------------


def test_hw_plan_accepts_the_allow_unsigned_its_refusal_suggests(tmp_path):
    unsigned = tmp_path / "unsigned"
    shutil.copytree(Bundle.open("yolov5n").root, unsigned)
    (unsigned / "signature").unlink()
    refused = run_cli("hw", "plan", str(unsigned), "--json")
    assert refused.returncode != 0 and "--allow-unsigned" in refused.stderr, refused.stderr
    proc = run_cli("hw", "plan", str(unsigned), "--json", "--allow-unsigned")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["profile"] == "x86-cpu"


def test_the_entropy_recipe_is_offered_only_where_onnx_runtime_takes_outside_ranges(monkeypatch):
    """pyproject allows onnxruntime older than the one with save_tensors_data/calibration_cache_path: there the
    entropy recipe would fail at quantization, so the targets that saturate start at the tuned MinMax one."""
    import onnxruntime.quantization as quantization

    from bastion.distill import int8_recipe

    saturating = CLASSES["x86-avx2"]
    assert int8_recipe.entropy_ranges_supported()  # the locked onnxruntime has them
    assert int8_recipe.candidates(saturating)[0] is int8_recipe.U8S8_7BIT_ENTROPY
    monkeypatch.delattr(quantization, "save_tensors_data")
    assert not int8_recipe.entropy_ranges_supported()
    assert int8_recipe.candidates(saturating)[0] is int8_recipe.U8S8_7BIT_TUNED
