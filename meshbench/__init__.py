"""Benchmarks of the platform's building blocks; each writes its results under ``results/``."""
