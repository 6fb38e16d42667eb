#!/usr/bin/env bash
# Issue 28: CIFAR-10 Table 6 at the paper's protocol on a CPU, one run after another, in order:
# ResNet-20 seeds 0 1 2, plain-20 s0, ResNet-32 s0, plain-32 s0. All 50k training images
# (data.val_split=0), two processes of one thread each (torchrun, gloo): BN over 64 images as on the
# paper's two GPUs; bf16 autocast, channels_last; the full schedule of each config.
#
#   tools/table6.sh run  [WORKDIR]   unpark what pending/cifar10-table6/ holds, then train the queue
#                                    (each finished run is then scored by tools/table6_gap.py)
#   tools/table6.sh park [WORKDIR]   park every unfinished run into pending/cifar10-table6/ (finished
#                                    ones leave it) and rebuild results/cifar10/table6/ from the store
#                                    and the runs finished in earlier stores, and results/cifar10/gap/;
#                                    then commit pending/, results/cifar10/table6 and results/cifar10/gap
#
# WORKDIR (default /work/fidelity) holds the study's mlflow.db and runs/. `run` is idempotent: a
# run finished in the committed export (results/cifar10/table6/runs.json) or in WORKDIR is skipped in
# seconds, a stopped one resumes from its newest checkpoint. SIGTERM stops
# the current run with a checkpoint (exit 143) and ends the queue. CODE=DIR runs the train.py of
# another checkout (a worktree at a fixed commit, so edits here cannot change a run).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
action=${1:?usage: tools/table6.sh run|park [WORKDIR]}
work=${2:-/work/fidelity}
code=${CODE:-$here}
data=${REPRODUCE_CIFAR10:-$here/../shared/data/cifar10-jpeg.tar.gz}
python=${PYTHON:-$here/.venv/bin/python}
pending=$here/pending/cifar10-table6
results=$here/results/cifar10/table6
mkdir -p "$work"
cd "$work"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$work/mlflow.db}
reproduce() { PYTHONPATH=$here "$python" -m reproduce.cli "$@"; }

case $action in
park)
  shopt -s nullglob
  dirs=(runs/cifar10-table6/*/)
  parked=0  # a run that cannot be parked is named and still leaves the report to be rebuilt
  [ ${#dirs[@]} -eq 0 ] || reproduce park "${dirs[@]%/}" --to "$pending" || parked=$?
  with=()
  [ -f "$results/runs.json" ] && with=(--with-export "$results/runs.json")
  mkdir -p "$results"
  reproduce report --study cifar10 --experiment cifar10-table6 "${with[@]}" --export "$results/runs.json" \
      --out "$results" --no-mlflow
  PYTHONPATH=$here "$python" "$here/tools/table6_gap.py" --decompose >/dev/null  # results/cifar10/gap/README.md
  exit "$parked" ;;
run) ;;
*) echo "usage: tools/table6.sh run|park [WORKDIR]" >&2; exit 2 ;;
esac

shopt -s nullglob
parked=("$pending"/*/)
[ ${#parked[@]} -eq 0 ] || reproduce unpark "${parked[@]%/}"
queue=("resnet20 0" "resnet20 1" "resnet20 2" "plain20 0" "resnet32 0" "plain32 0")
# Runs that finished on an earlier machine are in the committed export, not in this WORKDIR: skip
# them by their model and seed tags, or a fresh machine would train them all over again.
finished=$(PYTHONPATH=$here "$python" - "$results/runs.json" <<'PY'
import sys
from pathlib import Path
from reproduce.report.runs import read_export
path = Path(sys.argv[1])
try:
    runs = read_export(path)["runs"] if path.exists() else []
except ValueError as err:
    sys.exit(f"tools/table6.sh: {err}")
done = {f"{r['tags'].get('reproduce.model')}-s{r['tags'].get('reproduce.seed')}" for r in runs if r["status"] == "FINISHED"}
print(" ".join(sorted(done)))
PY
)
for item in "${queue[@]}"; do
  read -r model seed <<<"$item"
  if [[ " $finished " == *" $model-s$seed "* ]]; then
    echo "== $model seed $seed finished before ($results/runs.json); skipped"
    continue
  fi
  echo "== $model seed $seed ($(date -u +%FT%TZ))"
  status=0
  "$python" -m reproduce.torchrun --nproc_per_node 2 "$code/reproduce/train.py" \
      --config "$code/configs/cifar10/$model.yaml" experiment=cifar10-table6 seed="$seed" \
      data.path="$data" data.loader=gpu data.val_split=0 run.device=cpu \
      run.amp=true run.channels_last=true run.progress=false || status=$?
  if [ "$status" -ne 0 ]; then
    echo "== $model seed $seed ended with exit status $status; the queue stops here"
    exit "$status"
  fi
  # Item 4 of issue 28, here, while the final weights exist: the same 1,017 test images as original
  # pixels and as JPEG (results/cifar10/gap/measured.json; commit it with the parked runs).
  for dir in runs/cifar10-table6/"$model-s$seed"-*/; do
    grep -qs "\"label\": \"$model s$seed\"" "$here/results/cifar10/gap/measured.json" && continue  # done before
    PYTHONPATH=$here "$python" "$here/tools/table6_gap.py" --net "$model s$seed=$work/${dir%/}" >/dev/null \
        || echo "== the gap measurement of $dir failed; run tools/table6_gap.py on it by hand"
  done
done
echo "== queue done"
