"""Runs in a separate process with N CPU devices (tests/test_distributed.py starts it).

`python tests/mesh_worker.py N OUT_DIR` trains the tiny experiment of test_train on several
meshes and writes, under OUT_DIR: `<case>.npz` (the final state's leaves), `refused.json`
(the message of each mesh that must be refused), `hlo.json` (what the data-parallel program
communicates), and a run folder `resume/` stopped half-way on the N-device mesh.
"""

import json
import os
import sys

N = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N}"
os.environ["JAX_PLATFORMS"] = "cpu"

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from ablate.config import ConfigError  # noqa: E402
from ablate.core import Programs  # noqa: E402
from ablate.train import train  # noqa: E402
from tests.test_train import leaves, tiny  # noqa: E402

# The cases test_distributed.py compares with one device: name -> overrides.
CASES = {
    "data": {"train.mesh": {"data": N}},
    "seeds": {"train.mesh": {"seeds": N, "data": 1}, "train.seeds": list(range(N))},
    "fsdp": {"train.mesh": {"data": N, "fsdp": True}},
    "both": {"train.mesh": {"seeds": 2, "data": N // 2}, "train.seeds": list(range(N))},
}
REFUSED = {
    "batch": {"train.mesh": {"data": N}, "train.batch_size": N + 2},
    "seed_count": {"train.mesh": {"seeds": 2, "data": 1}, "train.seeds": [0, 1, 2]},
    "too_many": {"train.mesh": {"data": 2 * N}},
}


def main(out: Path) -> None:
    assert jax.device_count() == N, jax.devices()
    for name, over in CASES.items():
        exp = tiny(**over)
        programs = Programs(exp)
        state = programs.init()
        for _ in range(exp.train.steps // exp.train.steps_per_dispatch):
            state, metrics = programs.train_chunk(state, ())
        np.savez(out / f"{name}.npz", *leaves(state), loss=np.asarray(metrics["loss"]))
        if name == "data":
            hlo = programs.compiled_chunk.as_text()
            json.dump({"all_reduce": "all-reduce" in hlo}, (out / "hlo.json").open("w"))
        if name == "fsdp":  # which state leaves were really split over `data`
            specs = [str(s.spec) for s in jax.tree.leaves(programs.state_sharding)]
            json.dump(specs, (out / "fsdp_specs.json").open("w"))
    refused = {}
    for name, over in REFUSED.items():
        try:
            Programs(tiny(**over))
            refused[name] = None
        except ConfigError as e:
            refused[name] = str(e)
    json.dump(refused, (out / "refused.json").open("w"))
    train(tiny(**{"train.mesh": {"data": N}}), out / "resume", progress=False, stop_after=10)


if __name__ == "__main__":
    main(Path(sys.argv[2]))
