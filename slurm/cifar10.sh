#!/usr/bin/env bash
# CIFAR-10 (§4.2, Table 6, Fig. 6): a job array over nets x depths x seeds, one GPU per task,
# each task requeued until done. From the repository root:
#   mkdir -p slurm/logs && REPRODUCE_DATA=/path/to/cifar-10-batches-py sbatch slurm/cifar10.sh
# Task i trains configs/cifar10/<net><depth>.yaml with seed=<seed>, taking i apart as
# (net, depth, seed), seed fastest, from CIFAR10_NETS (default "resnet plain"), CIFAR10_DEPTHS
# (default "20 32 44 56 110") and CIFAR10_SEEDS (default "0"): 10 tasks. Other lists need the
# matching --array, e.g. Table 6's five runs of ResNet-110:
#   CIFAR10_NETS=resnet CIFAR10_DEPTHS=110 CIFAR10_SEEDS="0 1 2 3 4" sbatch --array=0-4 slurm/cifar10.sh
# Override any #SBATCH line on sbatch's command line; the other settings: slurm/launch.sh.
#SBATCH --job-name=cifar10
#SBATCH --array=0-9
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
set -euo pipefail
read -r -a nets <<< "${CIFAR10_NETS:-resnet plain}"
read -r -a depths <<< "${CIFAR10_DEPTHS:-20 32 44 56 110}"
read -r -a seeds <<< "${CIFAR10_SEEDS:-0}"
task=${SLURM_ARRAY_TASK_ID:-0}
count=$(( ${#nets[@]} * ${#depths[@]} * ${#seeds[@]} ))
if (( task >= count )); then
    echo "error: array task $task, but ${#nets[@]} nets x ${#depths[@]} depths x ${#seeds[@]} seeds" \
         "make $count tasks: submit with --array=0-$(( count - 1 ))" >&2
    exit 2
fi
seed=${seeds[task % ${#seeds[@]}]}
depth=${depths[task / ${#seeds[@]} % ${#depths[@]}]}
net=${nets[task / (${#seeds[@]} * ${#depths[@]})]}
echo "cifar10: array task $task of $count -> $net$depth, seed $seed"

# sbatch runs a copy of this file: find the checkout from the submit directory (or REPRODUCE_REPO).
repo=${REPRODUCE_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
[[ -f $repo/slurm/launch.sh ]] || { echo "error: no slurm/launch.sh under $repo: submit from the repository root or set REPRODUCE_REPO" >&2; exit 2; }
exec bash "$repo/slurm/launch.sh" "configs/cifar10/$net$depth.yaml" "seed=$seed" "$@"
