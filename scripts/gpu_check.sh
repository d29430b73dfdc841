#!/usr/bin/env bash
# One prepared check of ablate on a GPU machine: the device, the benchmark (quick, medium and
# GPT-2-small shapes in bfloat16, attention variants at the medium shape), then the test suite
# on the GPU. Everything it prints is also written to $OUT (or /tmp/ablate_gpu_check).
#
#   bash scripts/gpu_check.sh           # on a machine whose JAX sees an NVIDIA GPU; < 8 minutes
#   bash scripts/gpu_check.sh --quick   # the benchmark part only, tiny sizes, on the CPU (~1 min)
#
# Python: $PYTHON if set, else .venv/bin/python if its JAX sees a GPU, else python3. The repo is
# put on PYTHONPATH, so it need not be installed. Budget: the benchmark may take 240 s (it writes
# its JSON after every phase, so a cut-off run still leaves what it measured); the tests get what
# is left of 450 s. tests/conftest.py only *defaults* JAX_PLATFORMS to cpu, so exporting
# JAX_PLATFORMS=cuda here puts the tests on the GPU.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
RESULTS=${OUT:-${TMPDIR:-/tmp}/ablate_gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_DATASETS_OFFLINE=1
# The benchmark's compile-cache probes run in subprocesses beside it on the same GPU: no process
# may grab 75% of the memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
START=$SECONDS
STATUS=0

note() { echo "== [$((SECONDS - START)) s] $*"; }

sees_gpu() { JAX_PLATFORMS=cuda "$1" -c "import jax; assert jax.devices()[0].platform == 'gpu'" >/dev/null 2>&1; }

if [[ "${1:-}" == "--quick" ]]; then
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    note "smoke test of the benchmark on the CPU ($PY)"
    JAX_PLATFORMS=cpu "$PY" -m ablate.cli bench --quick --out "$RESULTS/bench_quick.json" 2>&1 |
        tee "$RESULTS/bench_quick.log"
    exit "${PIPESTATUS[0]}"
fi

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]] && sees_gpu .venv/bin/python; then
    PY=.venv/bin/python
else
    PY=python3
fi
export JAX_PLATFORMS=cuda

note "device"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$RESULTS/device.log"
if ! sees_gpu "$PY"; then
    echo "JAX under $PY sees no GPU (set PYTHON to a Python whose jax has CUDA)" | tee -a "$RESULTS/device.log"
    exit 2
fi

note "benchmark: quick, medium, gpt2_small in bfloat16 (at most 240 s)"
timeout 240 "$PY" -m ablate.cli bench --shapes quick,medium,gpt2_small --dtype bfloat16 \
    --variants learned,frozen,synthesizer,uniform,none --out "$RESULTS/bench.json" 2>&1 |
    tee "$RESULTS/bench.log"
rc=${PIPESTATUS[0]}
[[ $rc -eq 124 ]] && echo "benchmark cut off at 240 s; $RESULTS/bench.json holds the phases done"
[[ $rc -ne 0 ]] && STATUS=1

LEFT=$((450 - (SECONDS - START)))
((LEFT < 60)) && LEFT=60
note "tests on the GPU, float32 matmuls at full precision (at most $LEFT s)"
# On GPUs XLA multiplies float32 in TF32 by default; the tests' tolerances assume float32.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$LEFT" "$PY" -m pytest -q -x -p no:cacheprovider 2>&1 |
    tee "$RESULTS/tests.log"
rc=${PIPESTATUS[0]}
[[ $rc -eq 124 ]] && echo "tests cut off at $LEFT s"
[[ $rc -ne 0 ]] && STATUS=1

note "done (status $STATUS); logs and bench.json in $RESULTS"
exit $STATUS
