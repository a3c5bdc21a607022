"""`MicroBatcher`: zero-wait gathering, bounded batches, per-item failures stay per item."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app.batcher import MicroBatcher

pytestmark = [pytest.mark.anyio]


class Recorder:
    """A batch function that records its batches; an item < 0 is a per-item failure, and
    `fail_next` makes the next whole batch raise."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_next = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("whole batch")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_a_lone_request_is_served_at_once() -> None:
    serve = Recorder()
    batcher = MicroBatcher(serve, max_size=8)
    assert await batcher.submit(1) == 10  # no timer: nothing else needs to arrive
    assert serve.batches == [[1]]


async def test_requests_waiting_while_a_batch_runs_form_the_next_batch() -> None:
    serve = Recorder()
    sizes: list[int] = []
    batcher = MicroBatcher(serve, max_size=3, observe_size=sizes.append)
    serve.gate = asyncio.Event()
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first batch ([0]) is now being served, held at the gate
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    serve.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]
    assert serve.batches == [[0], [1, 2, 3], [4, 5]]  # bounded by max_size, in order
    assert sizes == [1, 3, 2]


@pytest.mark.parametrize(
    "turns, batches", [(3, [[0], [1, 2, 3]]), (2, [[0], [1], [2, 3]]), (0, [[0], [1], [2, 3]])]
)
async def test_requests_read_while_a_batch_held_the_loop_join_the_next_batch(
    monkeypatch: pytest.MonkeyPatch, turns: int, batches: list[list[int]]
) -> None:
    # As in the service: request 1 is submitted while batch [0] awaits Redis; requests 2 and
    # 3 arrive while it computes (holding the loop), so the loop reads them only afterwards,
    # in a turn of its own, and their handlers then submit them. Three turns between batches
    # let them join 1.
    monkeypatch.setattr("app.batcher.ARRIVAL_TURNS", turns)
    loop = asyncio.get_running_loop()
    batcher: MicroBatcher[int, int]
    submitted: list[asyncio.Future[int]] = []

    async def handler(i: int) -> int:
        await asyncio.sleep(0)  # the loop reads sockets after the turn's ready callbacks
        return await batcher.submit(i)

    def read_arrivals() -> None:  # an I/O callback: starts one handler task per request
        submitted.extend(asyncio.ensure_future(handler(i)) for i in (2, 3))

    class Service(Recorder):
        async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
            await asyncio.sleep(0)  # the Redis round trip
            if items == [0]:
                submitted.append(asyncio.ensure_future(batcher.submit(1)))
                await asyncio.sleep(0)
                loop.call_soon(read_arrivals)  # what arrived during the computation
            return await super().__call__(items)

    serve = Service()
    batcher = MicroBatcher(serve, max_size=8)
    assert await batcher.submit(0) == 0
    while len(submitted) < 3:
        await asyncio.sleep(0)
    assert await asyncio.gather(*submitted) == [10, 20, 30]
    assert serve.batches == batches


async def test_a_failing_item_fails_alone() -> None:
    batcher = MicroBatcher(Recorder(), max_size=8)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-2), batcher.submit(3), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"


async def test_a_failing_batch_fails_its_items_only() -> None:
    serve = Recorder()
    batcher = MicroBatcher(serve, max_size=2)
    serve.fail_next = True
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(2), batcher.submit(3), return_exceptions=True
    )
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert results[2] == 30  # the next batch is served as usual
    assert await batcher.submit(4) == 40


async def test_a_cancelled_request_is_dropped_from_its_batch() -> None:
    serve = Recorder()
    batcher = MicroBatcher(serve, max_size=8)
    serve.gate = asyncio.Event()
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    gone.cancel()  # the client went away while waiting
    serve.gate.set()
    assert (await first, await kept) == (0, 20)
    assert serve.batches == [[0], [2]]


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(Recorder(), max_size=0)
