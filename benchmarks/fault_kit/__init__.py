"""The fault suite's parts (benchmarks/faults.py, tests/test_faults.py): real processes on
loopback, a checking load generator, Redis faults, corrupt bundles, hostile input."""
