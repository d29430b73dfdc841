"""ablate: how much does a task depend on attention learning context? Measured with JAX."""

__version__ = "0.1.0"
