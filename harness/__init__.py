"""What the tests and the benchmarks share: real processes on loopback and the fault suite.

- `procs`: a throw-away redis-server, the real service (`python -m app`) with readiness,
  worker discovery and memory, `publish-features`, free ports;
- `cluster`: a throw-away Redis Cluster (`python -m harness.cluster` starts one by hand);
- `bundles`: bundles trained by the real trainer on synthetic data, cached by recipe;
- `stack`: the processes one scenario runs (Redis, service replicas), always stopped;
- `latency`: the latency percentiles every timed load reports;
- `faults`: the fault suite's scenarios, run long by `benchmarks/faults.py` and short by
  `tests/test_faults.py` (`cluster_faults` also by `tests/test_app_redis_cluster.py`).

It uses only the public entry points of `app` and `models` (their CLIs, `models.online_store`,
the Redis key layout `models.redis_keys`, the bundle layout) and is no part of the
distribution: the tests reach it through pytest's `pythonpath`, the benchmarks by putting the
repository root on `sys.path`.
"""
