#!/usr/bin/env bash
# The one launcher behind every job script in slurm/ (r50.sh, cifar10.sh, ...), which exec it
# as the batch shell of their allocation:
#
#   slurm/launch.sh CONFIG [key=value ...]
#
# It starts one torchrun per node through srun (c10d rendezvous on the first node of the
# allocation) running reproduce/train.py on REPRODUCE_NPROC_PER_NODE processes per node.
#
# Stopping and requeueing: USR1 to this shell (from `#SBATCH --signal=B:USR1@120`, 120 s before
# the time limit, or from `scancel --signal=USR1 --batch JOB`) is passed on to every process of
# the step. The training processes agree on it, write a checkpoint and exit with 143; then this
# shell requeues the job (`scontrol requeue`). The requeued job runs the same command, so it
# resumes from that checkpoint into the same MLflow run. TERM (scancel, preemption) is passed on
# the same way, but the job is not requeued: it was cancelled, or the cluster requeues it. A job
# that finished (0) or failed (1: non-finite loss, a stalled rank, a process group that could not
# form; 2: bad config or data) is never requeued.
# The last lines of a job's log say "exit status N" and what was done about it.
#
# Settings, from the environment (sbatch hands the submitting shell's environment to the job):
#   REPRODUCE_DATA            data.path (ImageNet: required; CIFAR-10: a cifar-10-batches-py
#                             folder, image tree or .tar.gz, else torchvision downloads it)
#   REPRODUCE_OVERRIDES       more key=value overrides, space-separated, applied last
#                             ("run.amp=true run.channels_last=true")
#   REPRODUCE_NPROC_PER_NODE  training processes per node (default: the GPUs allocated on the
#                             node, else 1). Without GPUs train.py uses the CPU and gloo.
#   REPRODUCE_PYTHON          the python that has torch (default: <repo>/.venv/bin/python when
#                             it exists, else python3); torchrun is run as `python -m torch.distributed.run`
#   REPRODUCE_WORKDIR         working directory of the training: runs/ and, with
#                             MLFLOW_TRACKING_URI unset, mlflow.db (default: the submit directory)
#   MLFLOW_TRACKING_URI       where the runs are logged (a server for many jobs: see README)
#   REPRODUCE_RDZV_PORT       rendezvous port on the first node (default: 12000 + job id % 20000: below the ephemeral range 32768-60999)
#   REPRODUCE_SRUN_ARGS       more srun flags, space-separated (e.g. "--cpu-bind=none")
#   REPRODUCE_STATUS_DIR      shared folder where the ranks leave their exit status
#                             (default: <repo>/slurm/logs/.status; removed after the step)
#   REPRODUCE_DRY_RUN=1       print the srun command and exit
set -euo pipefail

if (( $# < 1 )); then
    echo "usage: $0 CONFIG [key=value ...]  (run by the job scripts in slurm/)" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=$1
shift
[[ $config == /* ]] || config=$repo/$config
if [[ ! -f $config ]]; then
    echo "error: config $config not found" >&2
    exit 2
fi

python=${REPRODUCE_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
workdir=${REPRODUCE_WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}
job=${SLURM_JOB_ID:-local}
nnodes=${SLURM_NNODES:-1}

# One process per GPU unless told otherwise. SLURM_GPUS_ON_NODE is set when GPUs are allocated;
# SLURM_GPUS_PER_NODE may read "a100:8".
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
nproc=${REPRODUCE_NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}

if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
    head=$(hostname)
fi
# Several jobs may share a head node: the port comes from the (unique) job id.
port=${REPRODUCE_RDZV_PORT:-$(( 12000 + ${SLURM_JOB_ID:-0} % 20000 ))}

overrides=("$@")
[[ -z ${REPRODUCE_DATA:-} ]] || overrides+=("data.path=$REPRODUCE_DATA")
read -r -a extra <<< "${REPRODUCE_OVERRIDES:-}"
overrides+=(${extra[@]+"${extra[@]}"})  # ${a[@]+...}: an empty array is no error under set -u in bash < 4.4
read -r -a srun_args <<< "${REPRODUCE_SRUN_ARGS:-}"

# Distributed settings. A rank left waiting in a collective fails after run.collective_timeout_s
# (600 s in the configs; REPRODUCE_OVERRIDES="run.collective_timeout_s=1200" for slow storage)
# instead of holding the allocation until the time limit; NCCL's asynchronous error handling
# makes a hung NCCL call honour it (the first name is torch >= 2.2's, the second the older one).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
# When torchrun itself gets TERM (scancel) it passes it on and waits this long (s) for the
# checkpoint before SIGKILL (recent torchrun reads it; older ones wait 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
export PYTHONUNBUFFERED=1  # log lines reach the job's log as they are written
# Debugging switches (export them before sbatch, or uncomment here):
#   export NCCL_DEBUG=INFO                  # NCCL's choice of network, topology and its errors
#   export NCCL_DEBUG_SUBSYS=INIT,NET       # ... narrowed to set-up and network
#   export TORCH_DISTRIBUTED_DEBUG=DETAIL   # checks every rank calls the same collectives with the same shapes
#   export TORCH_CPP_LOG_LEVEL=INFO         # c10d's own log (rendezvous, store)
#   export NCCL_SOCKET_IFNAME=ib0           # the interface NCCL uses when it picks a wrong one (docker0, lo)
#   export NCCL_IB_DISABLE=1                # rule out InfiniBand when a multi-node job hangs at start

# srun starts one task per node; torchrun there ignores USR1 (inherited SIG_IGN: its default
# action would kill it), while the training processes, which slurmstepd signals as well, handle
# it. rank.sh records each training process's own exit status: torchrun turns any into 1.
# A node whose torchrun fails brings the others down at once instead of leaving them waiting
# for it until the collective timeout (a stop on request is not a failure: see rank.sh).
step=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
      ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}
      ${srun_args[@]+"${srun_args[@]}"}
      bash -c 'trap "" USR1; exec "$@"' torchrun
      "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc"
      --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$job"
      --no-python bash "$repo/slurm/rank.sh"
      "$python" "$repo/reproduce/train.py" --config "$config" ${overrides[@]+"${overrides[@]}"})

# A config the training would refuse is refused here, in one line, before srun starts anything
# (the data is checked by the ranks, on the nodes that read it).
if ! PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m reproduce.cli check --no-data "$config" ${overrides[@]+"${overrides[@]}"} >/dev/null; then
    echo "reproduce: exit status 2 (bad config, not started)"
    exit 2
fi

echo "reproduce: job $job${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}, restart ${SLURM_RESTART_COUNT:-0}," \
     "$nnodes node(s) x $nproc process(es), rendezvous $head:$port, started $(date '+%F %T')"
echo "reproduce: workdir $workdir; MLflow ${MLFLOW_TRACKING_URI:-sqlite:///$workdir/mlflow.db}"
echo "reproduce: $(printf '%q ' "${step[@]}")"
[[ ${REPRODUCE_DRY_RUN:-0} != 1 ]] || exit 0
cd "$workdir"
status_base=${REPRODUCE_STATUS_DIR:-$repo/slurm/logs/.status}
mkdir -p "$status_base"
status_dir=$(mktemp -d "$status_base/job-$job.XXXXXX")
export REPRODUCE_RANK_STATUS_DIR=$status_dir

stop_requested=""
pid=""
# shellcheck disable=SC2317  # called by the traps below
forward_stop() {
    stop_requested=$1
    echo "reproduce: got SIG$1 $(date '+%F %T'); asking the training to checkpoint and stop"
    [[ -z $pid ]] || kill -USR1 "$pid" 2>/dev/null || true  # srun passes USR1 on to every process of the step
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

"${step[@]}" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal interrupts wait
wait "$pid" && status=0 || status=$?

# torchrun (so srun) says 1 when a training process failed, and 0 when all finished or
# stopped on request (rank.sh): the ranks' own statuses say which. A failure wins (the lowest
# code: 1 or 2 rather than a signal's), because torchrun sends TERM to the other ranks when
# one fails and they then show 143. Otherwise all ranks must agree: all 0 = finished, all
# 143 = stopped on request with a checkpoint written.
ranks=$(( nnodes * nproc ))
mapfile -t codes < <(cat "$status_dir"/rank-* 2>/dev/null | sort -nu)
found=$(find "$status_dir" -name 'rank-*' | wc -l)
rm -rf "$status_dir"
failed=""
for code in "${codes[@]}"; do
    (( code == 0 || code == 143 )) || { failed=$code; break; }
done
if [[ -n $failed ]]; then
    status=$failed
elif (( found == ranks && ${#codes[@]} == 1 )); then
    status=${codes[0]}
elif (( status == 0 )); then
    status=1  # some rank left no status, or finished while another stopped: not a clean end
fi

case $status in
    0)   echo "reproduce: exit status 0 (finished)" ;;
    143) echo "reproduce: exit status 143 (stopped on request${stop_requested:+ after SIG$stop_requested}; checkpoint written)" ;;
    *)   echo "reproduce: exit status $status (failed, not requeued; $found of $ranks ranks left a status: ${codes[*]:-none})" ;;
esac
if (( status == 143 )) && [[ $stop_requested == TERM ]]; then
    # TERM is scancel (the user wants the job gone) or a preemption (a cluster with
    # PreemptMode=REQUEUE requeues the job itself): starting the same script again resumes it.
    echo "reproduce: not requeued: SIGTERM means cancelled or preempted"
elif (( status == 143 )); then
    echo "reproduce: requeueing job $job $(date '+%F %T')"
    # This ends the batch shell: print nothing after it.
    scontrol requeue "$job" || echo "reproduce: requeue refused (submitted with --no-requeue?)"
fi
exit "$status"
