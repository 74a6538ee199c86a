#!/usr/bin/env bash
# The checks a lent GPU (one H100 or H200, under 8 minutes) is for:
#   1. the GPU-marked tests (Testing/test_gpu.py: CUDA inference agrees with
#      the CPU; training in the precision chosen for the card stays finite);
#   2. inference speed, benchmarks/speed.py --device cuda (FocusNetv2 only;
#      add the MONAI peers with MODELS=focusnet,dynunet,segresnet after
#      pip install -e '.[bench]');
#   3. a short configs/paper.yaml training on small phantoms (paper network,
#      ITERS iterations per stage), printing iterations per second per stage
#      and the share of time spent waiting for crops (from history.csv).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # here: the same steps on the CPU,
#                                           # a tiny network, 2 iterations
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
DEVICE=cuda; ITERS=${ITERS:-100}; SLICES=120; WIDTH=1.0; CASES=6
if [ $DRY = 1 ]; then DEVICE=cpu; ITERS=2; SLICES=40; WIDTH=0.125; CASES=3; fi
OUT=${OUT:-$(mktemp -d -t focusnet-gpu-check-XXXX)}
echo "== gpu_check: device $DEVICE, results in $OUT"
$PY -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

echo "== 1. GPU tests"
$PY -m pytest -q -p no:cacheprovider -m gpu Testing/test_gpu.py || { [ $DRY = 1 ] || exit 1; }

echo "== 2. inference speed"
$PY benchmarks/speed.py --device "$DEVICE" --slices "$SLICES" --models "${MODELS:-focusnet}"

echo "== 3. paper.yaml training, $ITERS iterations per stage"
$PY -m FocusNetCore phantom --n "$CASES" --seed 7000 --size small --out "$OUT/data" >/dev/null
cat > "$OUT/check.yaml" <<YAML
base: $(pwd)/configs/paper.yaml
network:
  width: $WIDTH
  preprocess:
    crop_size: [$([ $DRY = 1 ] && echo "64, 64" || echo "240, 240")]
autoencoder_width: $WIDTH
stages: {snet: $ITERS, snet_fixed_bn: $ITERS, solnet: $ITERS, aae_pretrain: $ITERS, sos: $ITERS, finetune: $ITERS}
precise_bn_crops: $([ $DRY = 1 ] && echo 2 || echo 20)
validation_cases: 1
test_cases: 1
validate_every: 100000
checkpoint_every: $ITERS
YAML
$PY -m FocusNetCore train --config "$OUT/check.yaml" --data "$OUT/data" --out "$OUT/run" --device "$DEVICE" --no-progress \
  | grep -E "training precision|test set|wrote" || true
$PY - "$OUT/run/history.csv" <<'PYTHON'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for stage in dict.fromkeys(r["stage"] for r in rows):
    mine = [r for r in rows if r["stage"] == stage][1:] or [r for r in rows if r["stage"] == stage]  # first: warm-up
    data, step = sum(float(r["data_s"]) for r in mine), sum(float(r["step_s"]) for r in mine)
    print(f"{stage:14s} {len(mine) / (data + step):7.2f} it/s   waiting for crops {100 * data / (data + step):5.1f} %")
PYTHON
echo "== gpu_check done ($OUT)"
