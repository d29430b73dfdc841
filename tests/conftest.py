"""Strict JAX settings for every test: shape bugs fail loudly, CPU only, float32."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Sweeps in tests (and their subprocesses) compute reference levels on fewer sequences; the
# tests of the levels themselves pass their sample sizes explicitly.
os.environ.setdefault("ABLATE_REFERENCE_SEQUENCES", str(3 * 2048))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
