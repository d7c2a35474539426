"""Per-client request rate limit of the search service (``distann serve --rate-limit``).

The accounting is the ``limits`` package's moving window (exact: at most N requests in any
window of the given length, so N is also the largest burst); several limits separated by
``;`` all apply, e.g. ``"50/second;600/minute"`` allows bursts of 50 and 10 per second
sustained. A client is its remote address (behind a reverse proxy every client has the
proxy's address: rate-limit there instead). A request over a limit is answered 429 with
``Retry-After`` (whole seconds until the window has room) before it is read or authenticated,
so a flood of bad tokens is limited too.
"""

from __future__ import annotations

import math
import time

from distann.errors import ValidationError

EXAMPLE = "e.g. '20/second' or '50/second;600/minute' (the limits package's notation)"


def parse_rate_limit(value: object, param: str = "rate_limit") -> list:
    """The ``limits`` items of ``value``; a ValidationError naming ``param`` if it does not parse."""
    from limits import parse_many

    try:
        items = parse_many(value) if isinstance(value, str) else None
    except ValueError:
        items = None
    if not items or any(item.amount < 1 for item in items):
        raise ValidationError(param, value, f"requests per period, {EXAMPLE}")
    return items


class RateLimit:
    """ASGI middleware: at most ``rate`` (a limits string) HTTP requests per client address."""

    def __init__(self, app, rate: str, on_limited=None):
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.app = app
        self.items = parse_rate_limit(rate)
        self.rate = rate
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.on_limited = on_limited

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope.get("client") or ("unknown", 0))[0]
        # test every limit before counting any, so that a refused request uses no budget;
        # the memory storage answers synchronously, so nothing interleaves between the two
        full = [item for item in self.items if not self.limiter.test(item, key)]
        if not full:
            for item in self.items:
                self.limiter.hit(item, key)
            await self.app(scope, receive, send)
            return
        reset = max(self.limiter.get_window_stats(item, key)[0] for item in full)  # (reset time, remaining)
        retry = max(1, math.ceil(reset - time.time()))
        from starlette.responses import JSONResponse

        message = f"more than {self.rate} requests from {key} (--rate-limit); retry after {retry} s"
        response = JSONResponse({"error": {"type": "rate_limited", "message": message, "retry_after_s": retry}},
                                status_code=429, headers={"Retry-After": str(retry)})
        if self.on_limited is not None:
            self.on_limited(scope.get("path", ""))
        await response(scope, receive, send)
