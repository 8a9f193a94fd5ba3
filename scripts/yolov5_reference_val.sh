#!/usr/bin/env bash
# The held-out reference for `bastion eval detect`: upstream YOLOv5's own val.py on the same yolov5n.pt.
#
# It uses the PyPI package `yolov5` (7.0.14, a packaging of ultralytics/yolov5 v7.0, GPL-3.0) installed into a
# private directory, never into bastion's environment, and applies four patches so 2022 code runs offline on
# today's stack (none touches the metric):
#   1. models/common.py, utils/downloads.py: no Hugging Face hub lookups (offline);
#   2. models/experimental.py: torch.load(..., weights_only=False) (torch >= 2.6 defaults to True);
#   3. utils/metrics.py: np.trapz -> np.trapezoid (removed in numpy 2; identical integration).
# A font is placed in its config dir so it downloads nothing. Needs torch + torchvision (the [distill] venv).
#
# usage: scripts/yolov5_reference_val.sh PYTHON SHARED_DIR WORK_DIR
set -euo pipefail
PY=${1:-.venv/bin/python}; SHARED=${2:-../shared}; WORK=${3:-/tmp/yolov5-reference}
SHARED=$(cd "$SHARED" && pwd)
mkdir -p "$WORK/cfg"
"$PY" -m pip install -q --no-deps -t "$WORK/lib" yolov5==7.0.14
"$PY" -m pip install -q -t "$WORK/lib" pandas seaborn "setuptools<70" requests gitpython
rm -rf "$WORK"/lib/numpy "$WORK"/lib/numpy-* "$WORK"/lib/numpy.libs   # keep the venv's numpy
Y="$WORK/lib/yolov5"
sed -i 's/        result = attempt_download_from_hub(w, hf_token=hf_token, revision=revision)/        result = None/' "$Y/models/common.py"
sed -i 's/^def attempt_download_from_hub(repo_id, hf_token=None, revision=None):$/&\n    return None/' "$Y/utils/downloads.py"
sed -i "s/map_location='cpu')  # load/map_location='cpu', weights_only=False)  # load/" "$Y/models/experimental.py"
sed -i 's/np\.trapz(/np.trapezoid(/' "$Y/utils/metrics.py"
cp "$(find "$(dirname "$("$PY" -c 'import matplotlib;print(matplotlib.__file__)')")" -name DejaVuSans.ttf | head -1)" "$WORK/cfg/Arial.ttf"
sed "s|^train: |path: $SHARED/data/coco128\ntrain: |" "$SHARED/data/coco128/coco128.yaml" > "$WORK/coco128.yaml"
cd "$Y"
YOLOV5_CONFIG_DIR="$WORK/cfg" PYTHONPATH="$WORK/lib:$Y" "$PY" val.py --weights "$SHARED/weights/yolov5n/yolov5n.pt" \
  --data "$WORK/coco128.yaml" --img 640 --conf-thres 0.001 --iou-thres 0.6 --batch-size 32 --device cpu \
  --project "$WORK" --name val --exist-ok
