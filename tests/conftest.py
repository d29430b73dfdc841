"""Strict JAX settings for every test: shape bugs fail loudly, CPU only, float32."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, in a temporary folder (never the user's
# ~/.cache): the tests compile the same small programs many times, in this process and in
# the subprocesses they start. A cache hit returns the same executable, so no result changes.
_CACHE = tempfile.mkdtemp(prefix="ablate-tests-jax-cache-")
os.environ.setdefault("ABLATE_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Sweeps in tests (and their subprocesses) compute reference levels on fewer sequences; the
# tests of the levels themselves pass their sample sizes explicitly.
os.environ.setdefault("ABLATE_REFERENCE_SEQUENCES", str(3 * 2048))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)


#: The test files that take longest (measured: --durations), run first. With two xdist
#: workers and whole files per worker (--dist loadfile), a long file started last runs alone
#: at the end; starting the long ones first packs the two workers evenly.
LONGEST_FIRST = (
    "test_sweep_executors.py",  # its slow tests: several minutes
    "test_train.py",
    "test_sweep.py",
    "test_seq2seq_train.py",
    "test_probe_seq2seq.py",
    "test_probe.py",
    "test_data.py",
    "test_pretrained.py",
    "test_external_variant.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
