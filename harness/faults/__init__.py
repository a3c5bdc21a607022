"""The fault suite's scenarios (benchmarks/faults.py, tests/test_faults.py): a checking load
generator, Redis faults behind a delay proxy, corrupt bundles, hostile input, graceful
shutdown, a soak and Redis Cluster failover, each judged into rows of a report."""
