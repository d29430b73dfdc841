#!/usr/bin/env bash
# ablate on all the GPUs of one machine: one process drives every local device.
#
#   bash scripts/multi_gpu.sh EXPERIMENT.toml [data|seeds] [more ablate sweep flags]
#
#   data  (default) each batch is split over the GPUs, parameters replicated (data parallel);
#         the number of GPUs must divide train.batch_size
#   seeds the seeds of each run are split over the GPUs (Z seeds on Z GPUs at once); the
#         number of GPUs must divide the seed count (train.seeds)
# ablate checks both before anything is made and says what to change.
#
# Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,... . Without GPUs, ABLATE_CPU_DEVICES=5 makes the
# CPU pose as 5 devices (to try a mesh). The same experiment file runs unchanged on one
# device: the mesh is only `--set train.mesh.*`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { sed -n 2,14p "$0"; exit 2; }
EXPERIMENT=$1
shift
AXIS=data
if [[ "${1:-}" == "data" || "${1:-}" == "seeds" ]]; then
    AXIS=$1
    shift
fi
PY=${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${ABLATE_CPU_DEVICES:-}" ]]; then
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$ABLATE_CPU_DEVICES"
fi
N=$("$PY" -c "import jax; print(jax.device_count())")
if [[ "$AXIS" == data ]]; then
    MESH=(--set "train.mesh.data=$N" --set train.mesh.seeds=1)
else
    MESH=(--set train.mesh.data=1 --set "train.mesh.seeds=$N")
fi
echo "ablate: $N device(s), mesh axis '$AXIS'"
exec "$PY" -m ablate.cli sweep "$EXPERIMENT" "${MESH[@]}" "$@"
