"""One timer per connection for all its deadlines, moved lazily.

A connection has several deadlines (a head's, a body's, an idle spell's) that move on every
request; a timer per deadline per request would cost more than much of the request. Instead
each connection keeps its deadlines as timestamps and one timer that fires no later than the
nearest: a timer that fires early just looks at the timestamps and sets itself again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["no_later_than"]


def no_later_than(
    watch: asyncio.TimerHandle | None,
    when: float,
    loop: asyncio.AbstractEventLoop,
    callback: Callable[[], None],
) -> asyncio.TimerHandle:
    """The timer to keep so that ``callback`` runs no later than ``when``: ``watch`` itself
    when it already fires by then, else a new one (``watch`` is cancelled)."""
    if watch is not None:
        if watch.when() <= when:
            return watch
        watch.cancel()
    return loop.call_at(when, callback)
