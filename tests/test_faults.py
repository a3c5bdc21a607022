"""The fault suite (benchmarks/faults.py) in CI size: the same scenarios (harness/faults),
shorter runs, on the session's trained bundles. Real processes throughout: redis-server,
`python -m app` (several workers, two replicas), a delay proxy; the table a scenario prints is
shown when it broke an expectation. The long runs are documented in benchmarks/README.md."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import SOURCE_V1, Bundles
from helpers_app import admin_headers, make_settings
from helpers_process import FAULT_P99_BUDGET_MS
from schemathesis.python.asgi import shutdown_lifespans

from app.main import create_app
from harness.faults import hostile, items, redis_faults, reload, shutdown, soak
from harness.faults.fuzz import fuzz
from harness.faults.report import Row, table
from harness.stack import Stack, Versions, model_dir_with

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


def _import_all_of_schemathesis() -> None:
    """Every schemathesis module, imported now (collection: one thread). schemathesis imports
    most of itself lazily, and pytest rewrites each module it imports (it is a pytest plugin):
    that `ast.parse`, in the middle of the fuzz test, beside the app's loader thread scripting
    the towers (`torch.jit.script` parses their source too), trips CPython 3.11's shared AST
    state: "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905)."""
    for module in pkgutil.walk_packages(schemathesis.__path__, "schemathesis."):
        with contextlib.suppress(ImportError):  # optional integrations (allure)
            importlib.import_module(module.name)


_import_all_of_schemathesis()


@pytest.fixture
def versions(tmp_path: Path, bundles: Bundles) -> Versions:
    return model_dir_with(tmp_path / "artifacts", bundles.v1, bundles.v2, SOURCE_V1)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "procs") as stack:
        yield stack


def assert_behaved(rows: list[Row]) -> None:
    assert rows and all(not row.problems for row in rows), "\n" + table(rows)


def test_reloads_under_load_lose_nothing_and_mix_no_versions(
    stack: Stack, versions: Versions
) -> None:
    options = reload.ReloadOptions(replicas=(2, 1), reloads=4, connections=3, poll_s=0.25)
    rows = reload.run(stack, versions, options)
    assert_behaved(rows)
    good, bad = rows
    assert len(good.data["converge_s"]) == 4
    assert set(good.data["answers_by_version"]) == {versions.v1, versions.v2}
    assert [r["status"] for r in bad.data["refusals"]] == [409] * 5
    assert good.stats.requests > 0 and bad.stats.requests > 0


def test_item_changes_during_reloads_under_load_reach_every_worker_and_a_restart(
    stack: Stack, versions: Versions
) -> None:
    options = items.ItemsOptions(replicas=(2, 1), rounds=4, connections=3, poll_s=0.25)
    rows = items.run(stack, versions, options)
    assert_behaved(rows)
    changes, restarted = rows
    assert len(changes.data["converge_s"]) == 8 and changes.stats.requests > 0
    assert changes.data["versions"] == sorted([versions.v1, versions.v2])
    assert restarted.recovery_s is not None


def test_redis_faults_degrade_recall_and_refuse_writes_then_heal(
    stack: Stack, versions: Versions
) -> None:
    options = redis_faults.RedisOptions(
        workers=1,
        phase_s=1.5,
        users=300,
        timeout_ms=100,
        p99_budget_ms=FAULT_P99_BUDGET_MS,
    )
    rows = redis_faults.run(stack, versions, options)
    assert_behaved(rows)
    assert len(rows) == 7
    hung = next(row for row in rows if "SIGSTOP" in row.scenario)
    assert hung.data["sources"].get("redis", 0) < hung.stats.requests / 2  # Redis was out
    assert all(row.recovery_s is not None for row in rows[1:])


def test_hostile_input_over_http_gets_4xx_and_reaches_only_its_own_keys(
    stack: Stack, versions: Versions
) -> None:
    base, store = hostile.start(stack, versions)
    row = hostile.extremes_row(base, store)
    assert_behaved([row])
    statuses = {case["status"] for case in row.data["cases"]}
    assert statuses <= {200, 400, 401, 413, 422}


def test_sigterm_finishes_requests_in_flight_and_bounds_a_stalled_client(
    stack: Stack, versions: Versions
) -> None:
    options = shutdown.ShutdownOptions(workers=2, inflight=6, shutdown_timeout_s=1)
    rows = shutdown.run(stack, versions, options)
    assert_behaved(rows)
    assert rows[0].data["exit_code"] == 0


def test_short_soak_answers_steady_through_reloads(stack: Stack, versions: Versions) -> None:
    # Too short to see a leak (a replaced model kept alive: test_app_admin's weak reference
    # sees it); `benchmarks/faults.py --scenarios soak` runs it long enough for memory.
    options = soak.SoakOptions(duration_s=6, interval_s=1.5, reload_every_s=1, workers=2, users=300)
    rows = soak.run(stack, versions, options)
    assert_behaved(rows)
    # A reload asked for every second of 6: at least 3 land however slow the host.
    assert rows[0].data["reloads"] >= 3 and len(rows[0].data["intervals"]) >= 3


def test_schemathesis_finds_no_5xx_and_no_schema_violation_in_process(
    versions: Versions,
) -> None:
    # In process through the ASGI app (its real lifespan, started and stopped by schemathesis).
    settings = make_settings(versions.model_dir, max_body_bytes=64 * 1024)
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        # The app listens at once and loads its bundle in the background: a recall before
        # then is a documented 503, which the fuzzer's 5xx check would count.
        ready = schema["/health/ready"]["GET"]
        deadline = time.monotonic() + 120
        while ready.Case().call().status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.05)
        report = fuzz(schema, max_examples=15, headers=admin_headers())
    finally:
        shutdown_lifespans()
    assert report.failures == []
    assert report.requests >= 15 * 8
    assert {200, 401, 422} <= set(report.statuses)
