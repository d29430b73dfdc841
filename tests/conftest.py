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
