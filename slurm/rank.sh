#!/usr/bin/env bash
# One training process under torchrun (launch.sh starts it with `--no-python bash slurm/rank.sh
# PYTHON reproduce/train.py ...`). torchrun reports any training process that did not exit 0 as
# its own status 1, so each rank leaves its exact status in $REPRODUCE_RANK_STATUS_DIR for
# launch.sh: 0 finished, 143 stopped on request (checkpoint written), 1 non-finite loss, 2 bad
# config or data, 128+N killed by signal N.
set -u
# A stop request (USR1 from launch.sh through srun; TERM or INT from torchrun or scancel) also
# reaches the python process, which checkpoints and exits: this shell only waits for it. (USR1
# arrives here already ignored, inherited from torchrun, so it needs no trap.)
trap : TERM INT
"$@"
status=$?
echo "$status" > "$REPRODUCE_RANK_STATUS_DIR/rank-$RANK"
# Every rank stops at the same iteration, but they exit one after another, and torchrun sends
# SIGTERM to the others as soon as one exits non-zero: rank 0 may still be ending the MLflow run.
# So a rank that stopped on request reports success to torchrun; its status file says 143.
(( status == 143 )) && exit 0
exit "$status"
