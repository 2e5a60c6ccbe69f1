"""Rate limits of the anonymous link endpoints (/s/...), per client address.

Two budgets, each a sliding window of one minute (the ``limits`` library, in this
process's memory: with several workers or API nodes each keeps its own, so an address
gets that many times the budget; these bound abuse, they guard no secret):

* ``open``: the page and the record of a link, and every answer for an unknown or
  ended link, whatever was asked (what someone probing for links spends);
* ``fetch``: the manifest and chunks of a link that answers (a download: one request
  per 1 MiB chunk).

Over a budget: 429 ``throttled`` with ``Retry-After``.
"""
from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from . import errors as E


class LinkLimiter:
    def __init__(self, opens_per_minute: int, fetches_per_minute: int) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._items = {"open": RateLimitItemPerMinute(opens_per_minute),
                       "fetch": RateLimitItemPerMinute(fetches_per_minute)}

    def hit(self, budget: str, addr: str) -> None:
        """Count one request from ``addr`` against ``budget`` (429 when over it)."""
        item = self._items[budget]
        if not self._limiter.hit(item, budget, addr):
            reset = self._limiter.get_window_stats(item, budget, addr).reset_time
            raise E.throttled(math.ceil(max(1.0, reset - time.time())), "too many requests for links")
