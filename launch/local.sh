#!/usr/bin/env bash
# Runs mgrpo_jax on this machine: one process, all local devices (CPU, one GPU node, one TPU VM host).
#
#   launch/local.sh [--dry-run] [--venv DIR] [--devices N] -- --config configs/X.py --workdir DIR [...]
#
# --devices N simulates N CPU devices (XLA host-platform device count), for testing sharding.
# Everything after `--` goes to `python -m mgrpo_jax.train` unchanged.
set -euo pipefail
dry_run=0; venv=""; devices=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --venv) venv="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local.sh: give the training flags after --" >&2; exit 2; }

cmd=()
[[ -n "$venv" ]] && cmd+=(env "PATH=$venv/bin:$PATH")
[[ -n "$devices" ]] && cmd+=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu)
cmd+=(python -m mgrpo_jax.train "$@")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
