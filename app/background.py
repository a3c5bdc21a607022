"""Stopping a worker's background loops (the model watcher, the item change watcher)."""

from __future__ import annotations

import asyncio


async def stop_task(task: asyncio.Task[None], stopping: asyncio.Event) -> None:
    """Cancel `task` and wait for it to end. `stopping` is set first: it ends the loop even
    if code the loop awaits swallows the cancellation. A cancellation aimed at the caller
    itself propagates; the task's own is absorbed."""
    stopping.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if caller is not None and caller.cancelling():
            raise
