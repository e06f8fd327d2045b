"""Benchmarks, the soak test and the demo."""
