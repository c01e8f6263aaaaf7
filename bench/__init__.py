"""Benchmarks: each prints its figures and the reference measured in the same run."""
