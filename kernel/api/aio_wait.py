"""Waiting for a lane's work item on the event loop (grpc.aio front end): no worker thread per call.

``attach`` gives the item a future that its lane (or the decision finisher)
resolves from its own thread when the item is finished; ``wait_finished``
awaits it while a timer answers the item's deadline on time (lane threads
only look at deadlines when they pick the next batch) and a cancelled call
takes the item back from the queue.
"""

from __future__ import annotations

import asyncio
import time


def attach(item) -> asyncio.Future:
    """A future on the running loop, resolved (with the item) once ``item`` is finished."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    item.on_done = lambda it: loop.call_soon_threadsafe(_resolve, done, it)
    return done


async def wait_finished(service, item, done: asyncio.Future) -> None:
    """Await ``done`` (from ``attach``); ``service`` (an InferenceService) expires or cancels ``item``."""
    timer = None
    if item.deadline_ns:
        delay = (item.deadline_ns - time.monotonic_ns()) / 1e9
        timer = asyncio.get_running_loop().call_later(max(0.0, delay), service.expire, item)
    try:
        await done
    except asyncio.CancelledError:
        service.cancel(item)
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _resolve(future: asyncio.Future, item) -> None:
    if not future.done():
        future.set_result(item)
