#!/usr/bin/env bash
# ablate on all the GPUs of one machine: one process drives every local device.
#
#   bash scripts/multi_gpu.sh EXPERIMENT.toml [data|seeds] [more ablate sweep flags]
#
#   data  (default) each batch is split over the GPUs, parameters replicated (data parallel)
#   seeds the seeds of each run are split over the GPUs (K seeds on K GPUs at once); the
#         number of GPUs must divide the seed count (train.seeds), or ablate says so and stops
#
# Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,... . Without GPUs, ABLATE_CPU_DEVICES=4 makes the
# CPU pose as 4 devices (to try a mesh; not faster). The same experiment file runs unchanged
# on one device: the mesh is only `--set train.mesh.*`.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n 2,13p "$0"; exit 2; }
EXPERIMENT=$1
AXIS=${2:-data}
shift $(($# >= 2 ? 2 : 1))
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if [[ -n "${ABLATE_CPU_DEVICES:-}" ]]; then
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$ABLATE_CPU_DEVICES"
fi
N=$("$PY" -c "import jax; print(jax.device_count())")
case "$AXIS" in
    data) MESH=(--set "train.mesh.data=$N" --set train.mesh.seeds=1) ;;
    seeds) MESH=(--set train.mesh.data=1 --set "train.mesh.seeds=$N") ;;
    *) echo "axis must be 'data' or 'seeds', got '$AXIS'" >&2; exit 2 ;;
esac
echo "ablate: $N device(s), mesh axis '$AXIS'"
exec "$PY" -m ablate.cli sweep "$EXPERIMENT" "${MESH[@]}" "$@"
