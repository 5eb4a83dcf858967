#!/usr/bin/env bash
# One GPU run of bench/accelerator.py: SD3.5-M-sized MMDiT-X against diffusers + torch (then the
# FLUX.1-dev-sized forward if time is left), in at most $BUDGET seconds (default 400), each part
# under its own time limit so that partial results still come back. Results: $OUT/*.json (one per
# part, rows saved as they finish), $OUT/summary.txt (the merged tables), $OUT/log.txt (everything).
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from the repository root
#   OUT=/tmp/out TINY=1 BUDGET=3000 bash bench/gpu_check.sh   # CPU dry run at tiny sizes
#   BUDGET=300 JAX_S=205 TORCH_S=95 bash bench/gpu_check.sh    # SD3.5-M parts only, shorter
#   PLAN=rest BUDGET=570 bash bench/gpu_check.sh   # what the H100 run of 2026-11-27 left out
#                                                  # (ran on an H200 the same day in 441 s)
#
# PLAN=rest runs, in priority order: the SD3.5-M LoRA train step (jax alone with a 330 s limit,
# since its first call outlasted the ~120 s it had, then torch's), OCR images/s against the
# number of workers on the host's cores (bench/rewards.py, 180 s: a 16-worker process pool's
# start-up alone takes tens of seconds), then the FLUX parts. The OCR part also needs the
# rapidocr_onnxruntime, pyclipper and shapely wheels in .whl/ (onnxruntime and opencv are in
# the GPU image). It leaves 9 files in $OUT; the device tool brings 8 back, and log.txt holds
# every table.
#
# Needs python3 with jax (GPU), flax, optax, chex, numpy; torch (CUDA) for the baseline. diffusers
# and ml_collections (imported by mgrpo_jax.trainer), which the GPU image lacks, are installed
# from the wheels in .whl/ into /tmp/site (no network needed).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET=${BUDGET:-400}
TINY=${TINY:-0}
PLAN=${PLAN:-all}        # all | rest (see above)
JAX_S=${JAX_S:-250}      # limit of the SD3.5-M jax part (seconds)
TORCH_S=${TORCH_S:-110}  # limit of the SD3.5-M torch part
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
else
  echo "no wheels in .whl/: diffusers / ml_collections must already be installed"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi || echo "nvidia-smi: not available"
# First the GPU-only test of the cuDNN attention at odd lengths (values and gradients of the padded
# backward against float64 numpy). The image's own pytest if it has one (its plugins refused the
# pytest 8.3.5 wheel), else the wheels in .whl/.
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_pytest \
    .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/packaging-*.whl \
    || echo "no pytest: the GPU test is skipped"
fi
if [ "$TINY" != 1 ]; then
  JAX_PLATFORMS=cuda XLA_FLAGS= PYTHONPATH=$PYTHONPATH:/tmp/site_pytest timeout 120 \
    python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k real_cudnn -rs
  echo "== real cuDNN test: exit $?"
fi
python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" \
  || echo "torch/diffusers do not import: the torch rows will say so"

left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME LIMIT_S ARGS...: one bench process under min(LIMIT_S, time left); SIGINT first so the
# rows it finished are already in $OUT/NAME.json.
part() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  ((limit > remaining)) && limit=$remaining
  if ((limit < 45)); then
    echo "== $name: skipped ($remaining s of the budget left)"
    return
  fi
  echo "== $name: limit ${limit} s, starting at $((SECONDS - START)) s"
  timeout --signal=INT --kill-after=15 "$limit" \
    python3 bench/accelerator.py "$@" --json "$OUT/$name.json"
  echo "== $name: exit $? at $((SECONDS - START)) s"
}

SIZE=()
[ "$TINY" = 1 ] && SIZE=(--tiny)
# JAX and torch in separate processes: JAX preallocates most of the GPU memory.
# auto = cuDNN flash attention on an H100; xla (the previous code path) for the forward only.
if [ "$PLAN" = rest ]; then
  part sd35m_train_jax 330 --model sd35m "${SIZE[@]}" --framework jax --attention auto \
    --parts train --warmup 1 --repeats 3
  part sd35m_train_torch 90 --model sd35m "${SIZE[@]}" --framework torch --parts train \
    --warmup 1 --repeats 3
  echo "== ocr: limit 180 s, starting at $((SECONDS - START)) s"
  # Rows are printed as they are measured, so a cut run still reports.
  timeout --signal=INT --kill-after=15 180 \
    python3 bench/rewards.py --ocr-scaling --workers 1 4 8 16 --images 64 | tee "$OUT/ocr.txt"
else
  part sd35m_jax "$JAX_S" --model sd35m "${SIZE[@]}" --framework jax --attention auto,xla \
    --compare-parts forward --warmup 1 --repeats 3
  part sd35m_torch "$TORCH_S" --model sd35m "${SIZE[@]}" --framework torch --warmup 1 \
    --repeats 3
fi
part flux_jax 90 --model flux "${SIZE[@]}" --framework jax --attention auto,xla \
  --parts forward --warmup 1 --repeats 3
part flux_torch 60 --model flux "${SIZE[@]}" --framework torch --parts forward --warmup 1 \
  --repeats 3

for model in sd35m flux; do
  files=("$OUT/${model}"_*.json)
  if ((${#files[@]})); then
    python3 bench/accelerator.py --merge "${files[@]}" --json "$OUT/$model.json" \
      | tee -a "$OUT/summary.txt"
  fi
done
echo "gpu_check.sh: done in $((SECONDS - START)) s"
