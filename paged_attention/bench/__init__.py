"""Benchmarks: real runs of the engine, printed as tables and written as JSON."""
