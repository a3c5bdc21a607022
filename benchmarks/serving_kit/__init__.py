"""Pieces of `benchmarks/serving.py`: bundle cache, processes, load generators, in-process
floor and HNSW recall, profiling. Nothing here imports `app` at import time."""
