#!/usr/bin/env bash
# Runs mgrpo_jax on every worker of a Cloud TPU VM slice (single host or pod), big_vision style.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] [--accelerator v5litepod-16 --version V]
#                    --repo GIT_URL [--branch B] [--create] [--dry-run] -- TRAIN FLAGS...
#
# Steps (each printed before it runs; --dry-run prints them only):
#   1. optionally create the slice (gcloud compute tpus tpu-vm create),
#   2. on all workers: clone/update the repo and pip install -e ".[tpu]",
#   3. on all workers at once: python -m mgrpo_jax.train TRAIN FLAGS, output streamed back.
# jax.distributed.initialize() finds the other workers of the slice by itself on TPU VMs.
set -euo pipefail
name=""; zone=""; project=""; accel="v5litepod-8"; version="v2-alpha-tpuv5-lite"
create=0; repo=""; branch="main"; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --branch) branch="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$repo" ]] || {
  echo "tpu_vm.sh: --name, --zone and --repo (git URL the workers can clone) are required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "tpu_vm.sh: give the training flags after --" >&2; exit 2; }

gcloud=(gcloud compute tpus tpu-vm)
proj=(); [[ -n "$project" ]] && proj=(--project "$project")
train_flags=$(printf '%q ' "$@")
setup="set -e; if [ -d mgrpo_jax ]; then git -C mgrpo_jax fetch -q && git -C mgrpo_jax checkout -q $branch && git -C mgrpo_jax pull -q; else git clone -q -b $branch $repo mgrpo_jax; fi; cd mgrpo_jax; python3 -m venv .venv; . .venv/bin/activate; pip install -q -e '.[tpu]'"
run="cd mgrpo_jax && . .venv/bin/activate && python -m mgrpo_jax.train $train_flags"

step() {
  printf '%q ' "$@"; echo
  [[ $dry_run == 1 ]] || "$@"
}
if [[ $create == 1 ]]; then
  step "${gcloud[@]}" create "$name" --zone "$zone" "${proj[@]}" --accelerator-type "$accel" --version "$version"
fi
step "${gcloud[@]}" ssh "$name" --zone "$zone" "${proj[@]}" --worker=all --command "$setup"
step "${gcloud[@]}" ssh "$name" --zone "$zone" "${proj[@]}" --worker=all --command "$run"
