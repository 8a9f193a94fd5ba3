"""Measure INT8 recipes with real AVX2 (non-VNNI) kernels on a machine that has VNNI/AMX, under qemu-user.

ONNX Runtime's MLAS picks its INT8 kernels from CPUID.  On a VNNI or AMX host a full-range U8S8 model never
saturates, so the AVX2 loss (``vpmaddubsw`` adds two u8·s8 products into a saturating int16 lane) cannot be
seen natively, and ``BASTION_CPU_CLASS`` only changes bastion's recipe choice, not the kernels ORT runs.
``qemu-x86_64 -cpu Haswell`` (QEMU >= 7.2: TCG has AVX2) makes the same Python process see an AVX2 CPU without
AVX-512/VNNI through CPUID, so MLAS dispatches its AVX2 kernels.

Usage (root of the repository, ``apt-get install qemu-user``):
    .venv/bin/python scripts/int8_under_qemu.py DATA.yaml CALIB_DIR OUT_DIR
        [--recipes u8s8,u8s8-7bit,u8s8-7bit-symact-first-fp32,u8u8] [--limit 32] [--calib-count 32]
        [--imgsz 320] [--cpu Haswell]

Natively it quantizes each recipe (calibration runs the FP32 model: kernel-independent up to float rounding),
measures FP32 and INT8 mAP50 and the single-thread speed-up here, and keeps the FP32 evaluation's input tensors.
Then it re-runs itself under qemu (``--emulated``): that process first proves it sees an AVX2 CPU without
AVX-512/VNNI (numpy's CPUID features, and a U8S8 MatMulInteger whose exact sum, 64 x 255 x 127, ORT must
saturate), then runs each INT8 model on the same tensors with ONNX Runtime and saves the raw outputs.  Only ORT
runs emulated: bastion's post-processing (NMS at conf 0.001 in numpy) is kernel-independent and took minutes for four
images under TCG, so the outputs are replayed natively through the same Detector and mAP code the gate uses.  Speed under
emulation means nothing and is not measured.  One JSON line per recipe goes to OUT_DIR/results.jsonl, and a
Markdown table to stdout.  bastion's own CPU-class probe reads /proc/cpuinfo, which qemu-user passes through from
the host (it says x86-amx there), so the probe is not the witness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DEFAULT_RECIPES = "u8s8,u8s8-7bit,u8s8-7bit-symact-first-fp32"  # s8s8 took > 14 min emulated
EVAL_OPTS = dict(conf=0.001, iou=0.6, multi_label=True, scaleup=False, rect=False)


def kernel_witness() -> dict:
    """What the process's CPUID says, and whether ORT's U8S8 kernel saturates: 64 × 255 × 127 needs 32 bits."""
    import onnxruntime as ort
    from numpy._core._multiarray_umath import __cpu_features__ as features
    from onnx import TensorProto, helper

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "witness",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [k, 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = np.full((1, k), 255, np.uint8), np.full((k, 16), 127, np.int8)
    got = int(session.run(None, {"a": a, "b": b})[0][0, 0])
    names = ("AVX2", "FMA3", "AVX512F", "AVX512VNNI", "AVX512_SPR")
    return {
        "cpuid": {n: bool(features.get(n)) for n in names},
        "u8s8_exact": k * 255 * 127,
        "u8s8_ort": got,
        "u8s8_saturates": got != k * 255 * 127,
        "onnxruntime": ort.__version__,
    }


class _Recorder:
    """A backend that remembers every single-image input it runs (the INT8 models take the same tensors)."""

    def __init__(self, backend, seen: dict[str, np.ndarray]):
        self._backend, self.seen = backend, seen

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for t in next(iter(feeds.values())):
            self.seen.setdefault(_key(t[None]), t[None])
        return self._backend.run(feeds)


class _Replay(_Recorder):
    """A backend that answers with the outputs the emulated process computed for the same input tensor."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.seen[_key(next(iter(feeds.values())))]


def _key(tensor: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor, np.float32).tobytes()).hexdigest()


def _detector(path: Path, manifest, imgsz: int, wrap=None, table=None):
    from bastion.runtime.backends import open_backend
    from bastion.runtime.detect import DetectOptions, Detector

    backend = open_backend(path, threads=1)
    backend = wrap(backend, table) if wrap else backend
    return Detector(backend, manifest, DetectOptions(imgsz=imgsz, **EVAL_OPTS))


def run_emulated(out: Path, recipes: list[str]) -> None:
    """Under qemu: only ONNX Runtime runs here (the slow part); post-processing and mAP are computed natively."""
    import onnxruntime as ort

    inputs = np.load(out / "inputs.npy")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for name in recipes:
        session = ort.InferenceSession(str(out / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        outputs = [session.run(None, {feed: x[None]}) for x in inputs]
        np.savez(out / f"{name}.emulated.npz", *[np.stack([o[k] for o in outputs]) for k in range(len(outputs[0]))])
        print(f"emulated {name}: {len(inputs)} images", file=sys.stderr, flush=True)


def measure_native(args: argparse.Namespace) -> dict:
    """FP32 and INT8 mAP50 and the single-thread speed-up here; records the FP32 evaluation's input tensors."""
    from bastion.distill.datasets import load_data_yaml
    from bastion.distill.evaluate import EvalSettings, evaluate_detector, latency_ms
    from bastion.distill.int8_gate import static_manifest
    from bastion.distill.int8_recipe import RECIPES
    from bastion.distill.quantize import quantize_int8
    from bastion.models.bundle import Bundle
    from bastion.runtime.media import list_images, read_image

    bundle = Bundle.open(args.model)
    dataset = load_data_yaml(args.data, "val", args.limit)
    settings = EvalSettings(imgsz=args.imgsz, rect=False)
    seen: dict[str, np.ndarray] = {}
    base = _detector(bundle.model_path, bundle.manifest, args.imgsz, _Recorder, seen)
    out = {"witness": kernel_witness(), "fp32_map50": round(evaluate_detector(base, dataset, settings).map50, 4)}
    np.save(args.out / "inputs.npy", np.concatenate(list(seen.values())))
    sample = [read_image(p) for p in dataset.images[:16]]
    calibration = list_images(args.calib)[: args.calib_count]
    for name in args.recipes.split(","):
        path = args.out / f"{name}.onnx"
        quantize_int8(base, bundle.model_path, calibration, path, (args.imgsz, args.imgsz), RECIPES[name])
        int8 = _detector(path, static_manifest(bundle.manifest, args.imgsz), args.imgsz)
        row = {"int8_map50": round(evaluate_detector(int8, dataset, settings).map50, 4)}
        row["drop_points"] = round((out["fp32_map50"] - row["int8_map50"]) * 100, 2)
        latency = latency_ms({"fp32": base, "int8": int8}, sample)
        row["speedup"] = round(latency["fp32"] / latency["int8"], 3)
        int8.close()
        out[name] = row
        print(json.dumps({"native": True, "recipe": name, **row}), file=sys.stderr, flush=True)
    base.close()
    return out


def map_emulated(args: argparse.Namespace, fp32_map50: float) -> dict:
    """mAP50 of each recipe from the outputs the AVX2 kernels computed under qemu."""
    from bastion.distill.datasets import load_data_yaml
    from bastion.distill.evaluate import EvalSettings, evaluate_detector
    from bastion.distill.int8_gate import static_manifest
    from bastion.models.bundle import Bundle

    bundle = Bundle.open(args.model)
    dataset = load_data_yaml(args.data, "val", args.limit)
    inputs = np.load(args.out / "inputs.npy")
    rows = {}
    for name in args.recipes.split(","):
        with np.load(args.out / f"{name}.emulated.npz") as npz:
            stacked = [npz[f"arr_{k}"] for k in range(len(npz.files))]
        table = {_key(x[None]): [s[i] for s in stacked] for i, x in enumerate(inputs)}
        det = _detector(
            args.out / f"{name}.onnx", static_manifest(bundle.manifest, args.imgsz), args.imgsz, _Replay, table
        )
        map50 = round(evaluate_detector(det, dataset, EvalSettings(imgsz=args.imgsz, rect=False)).map50, 4)
        det.close()
        rows[name] = {"int8_map50": map50, "drop_points": round((fp32_map50 - map50) * 100, 2)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--calib-count", type=int, default=32)
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--max-drop", type=float, default=3.0, help="the gate's limit, for the verdict column")
    ap.add_argument("--cpu", default="Haswell", help="qemu CPU model without AVX-512/VNNI (Haswell, EPYC-Rome)")
    ap.add_argument("--emulated", action="store_true", help="internal: this process runs under qemu")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    if args.emulated:
        witness = kernel_witness()
        if witness["cpuid"]["AVX512F"] or not witness["cpuid"]["AVX2"] or not witness["u8s8_saturates"]:
            sys.exit(f"the emulated CPU is not an AVX2-only one with saturating U8S8 kernels: {witness}")
        run_emulated(args.out, recipes)
        print(json.dumps(witness))
        return
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("qemu-x86_64 not found: apt-get install qemu-user (QEMU >= 7.2 emulates AVX2)")
    args.out.mkdir(parents=True, exist_ok=True)
    native = measure_native(args)
    argv = [qemu, "-cpu", args.cpu, sys.executable, __file__, *sys.argv[1:], "--emulated"]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.returncode != 0:
        sys.exit(f"emulated run failed (exit {proc.returncode}): {proc.stdout.strip()[-500:]}")
    witness = json.loads(proc.stdout.strip().splitlines()[-1])
    emulated = map_emulated(args, native["fp32_map50"])
    print(f"native witness: {native['witness']}\nqemu -cpu {args.cpu} witness: {witness}")
    print(f"FP32 mAP50 (native): {native['fp32_map50']}\n")
    print("| recipe | drop, native (pts) | speed-up, native | drop, AVX2 kernels under qemu (pts) | gate on AVX2 |")
    print("|---|---|---|---|---|")
    with (args.out / "results.jsonl").open("a") as fh:
        for name in recipes:
            n, e = native[name], emulated[name]
            fh.write(json.dumps({"recipe": name, "cpu": args.cpu, "native": n, "emulated": e}) + "\n")
            gate = "refused" if e["drop_points"] > args.max_drop else f"within {args.max_drop:g}"
            print(f"| {name} | {n['drop_points']} | {n['speedup']}x | {e['drop_points']} | {gate} |")


if __name__ == "__main__":
    main()
