"""Pieces of `benchmarks/quality.py`: what it measures against (`references`), one split's
measurement (`measure`) and the markdown of its JSON (`render`)."""
