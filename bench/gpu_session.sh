#!/usr/bin/env bash
# What is still unmeasured on a GPU after the H100 session of 2026-11-27, in priority order, for
# one device session (about 10 minutes of script after the machine starts):
#   1. the SD3.5-M LoRA train step, jax (attention auto) against diffusers + torch: the jax part
#      alone, because its first call (compilation) took over 2 minutes and was cut last time;
#   2. OCR images/s against the number of workers on the host's cores (bench/rewards.py);
#   3. the FLUX.1-dev-sized forward, jax against torch.
# Each part runs under its own limit and writes its rows as they finish:
#   $OUT/train_jax.json, $OUT/train_torch.json, $OUT/train.txt (merged table), $OUT/ocr.txt,
#   $OUT/flux_jax.json, $OUT/flux_torch.json, $OUT/log.txt  (at most 8 files come back)
#
#   bash bench/gpu_session.sh                                    # on the GPU machine
#   OUT=/tmp/out TINY=1 bash bench/gpu_session.sh                # CPU dry run at tiny sizes
#
# Needs the wheels of bench/gpu_check.sh in .whl/ plus rapidocr_onnxruntime, pyclipper and shapely
# (onnxruntime and opencv are in the GPU image).
set -u
OUT=${OUT:-/tmp/gpu_session_out}
TINY=${TINY:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
START=$SECONDS
shopt -s nullglob
wheels=(.whl/diffusers-*.whl .whl/ml_collections-*.whl .whl/rapidocr*.whl .whl/pyclipper*.whl
        .whl/shapely*.whl)
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || echo "wheel install failed: ${wheels[*]}"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
SIZE=()
[ "$TINY" = 1 ] && SIZE=(--tiny)

run() {  # run LIMIT_S COMMAND...: SIGINT at the limit, so finished rows are already saved
  local limit=$1
  shift
  echo "== $* (limit ${limit} s, at $((SECONDS - START)) s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  echo "== exit $? at $((SECONDS - START)) s"
}

run 330 python3 bench/accelerator.py --model sd35m "${SIZE[@]}" --framework jax --attention auto \
  --parts train --warmup 1 --repeats 3 --json "$OUT/train_jax.json"
run 90 python3 bench/accelerator.py --model sd35m "${SIZE[@]}" --framework torch --parts train \
  --warmup 1 --repeats 3 --json "$OUT/train_torch.json"
python3 bench/accelerator.py --merge "$OUT/train_jax.json" "$OUT/train_torch.json" \
  > "$OUT/train.txt" 2>&1
cat "$OUT/train.txt"
# 16 workers of the process pool each load the OCR model: the pool's start-up alone can take
# tens of seconds, so this part needs minutes, not the 75 s it had last time.
run 180 python3 bench/rewards.py --ocr-scaling --workers 1 4 8 16 --images 64 > "$OUT/ocr.txt"
cat "$OUT/ocr.txt"
run 90 python3 bench/accelerator.py --model flux "${SIZE[@]}" --framework jax --attention auto \
  --parts forward --warmup 1 --repeats 3 --json "$OUT/flux_jax.json"
run 60 python3 bench/accelerator.py --model flux "${SIZE[@]}" --framework torch --parts forward \
  --warmup 1 --repeats 3 --json "$OUT/flux_torch.json"
echo "gpu_session.sh: done in $((SECONDS - START)) s"
