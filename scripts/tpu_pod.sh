#!/usr/bin/env bash
# ablate on a TPU VM pod slice: the same command on every worker, e.g.
#
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#       --command="cd ablate && bash scripts/tpu_pod.sh experiments/context_full.toml /mnt/shared/runs"
#
# Each worker is one JAX process; JAX finds the others itself (jax.distributed.initialize(),
# called by ablate when TPU_WORKER_HOSTNAMES names several workers). All chips form one mesh,
# by default every chip on the `data` axis (add e.g. --set train.mesh.seeds=4 to spread seeds).
# WORKDIR must be storage every worker sees (NFS, a GCS bucket mounted with gcsfuse):
# checkpoints are written by all workers, logs/results/report by worker 0 only.
# Install once per worker: pip install -U "jax[tpu]" && pip install -e .
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,13p "$0"; exit 2; }
EXPERIMENT=$1
WORKDIR=$2
shift 2
exec "${PYTHON:-python3}" -m ablate.cli sweep "$EXPERIMENT" --workdir "$WORKDIR" --quiet "$@"
