#!/usr/bin/env bash
# Plain-34 (Table 2) on ImageNet: 1 node x 8 GPUs (one process per GPU,
# 8 data loader workers each: 64 CPUs), 60e4 iterations, requeued until done. From the repository root:
#   mkdir -p slurm/logs && REPRODUCE_DATA=/path/to/imagenet sbatch slurm/plain34.sh
# Override any #SBATCH line on sbatch's command line (-p, -A, --nodes, --gpus-per-node, --time,
# --output); the other settings are environment variables, listed in slurm/launch.sh.
#SBATCH --job-name=plain34
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file: find the checkout from the submit directory (or REPRODUCE_REPO).
repo=${REPRODUCE_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
[[ -f $repo/slurm/launch.sh ]] || { echo "error: no slurm/launch.sh under $repo: submit from the repository root or set REPRODUCE_REPO" >&2; exit 2; }
exec bash "$repo/slurm/launch.sh" configs/imagenet/plain34.yaml "$@"
