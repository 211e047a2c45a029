#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one command, for a machine with one CUDA GPU:
#   1. a tiny synthetic pipeline on CUDA (a smoke test: stop here if the CUDA path is broken);
#   2. benchmarks/speed.py --device cuda (the speed ratios, on a quiet GPU);
#   3. benchmarks/specialists.py on the full-size CIFAR-10 recipe, three seeds side by side.
# Results land in benchmarks/results/ and, when OUT is set (the device tool), are packed into
# $OUT/results.tar.gz with the logs. DATA is the CIFAR-10 JPEG archive (default ../shared/data/...).
#
#   bash benchmarks/gpu_run.sh                      # from the repository root
#   DEADLINE=480 bash benchmarks/gpu_run.sh         # stop waiting for the CIFAR seeds after 480 s
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ENSEMBLE_KD_CACHE="${ENSEMBLE_KD_CACHE:-/tmp/ensemble-kd-cache}"
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
LOGS="${OUT:-benchmarks/cache}/logs"
mkdir -p "$LOGS"
started=$(date +%s)
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results.tar.gz" benchmarks/results "$LOGS" 2>/dev/null; }
trap pack EXIT
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

echo "== 1. smoke test on CUDA"
python3 -m ensemble_kd.cli run --config pipelines/configs/digits.toml --out /tmp/ekd-smoke --overwrite --quiet \
  --set device=cuda --set precision=bf16 --set data.crop_pad=1 --set clusters.overlap=0.2 \
  --set generalist.model.arch=cnn --set 'generalist.model.channels=[8,16]' --set generalist.train.epochs=2 \
  --set specialists.init=scratch --set specialists.train.epochs=1 --set specialists.soft_epochs=0 \
  --set student.model.arch=cnn --set 'student.model.channels=[4,8]' --set student.train.epochs=2 \
  > "$LOGS/smoke.log" 2>&1 \
  || { echo "smoke test failed:"; tail -30 "$LOGS/smoke.log"; exit 1; }
tail -12 "$LOGS/smoke.log"

echo "== 2. speed ratios on CUDA ($(($(date +%s) - started)) s)"
python3 benchmarks/speed.py --device cuda --quick > "$LOGS/speed.log" 2>&1 || tail -20 "$LOGS/speed.log"
tail -30 "$LOGS/speed.log"

echo "== 3. CIFAR-10, three seeds side by side ($(($(date +%s) - started)) s)"
left=$(( ${DEADLINE:-100000} - ($(date +%s) - started) ))
timeout --kill-after=20 "$left" python3 benchmarks/specialists.py --data cifar10-jpeg --jobs 3 --set "data.root=$DATA" \
  > "$LOGS/cifar.log" 2>&1 || echo "specialists.py stopped (exit $?; 124 = the deadline): the JSON holds the seeds that finished"
tail -20 "$LOGS/cifar.log"
echo "== done in $(($(date +%s) - started)) s"
