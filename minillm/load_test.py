"""A load test for a server on this machine: N concurrent clients, a fixed number of requests, a time limit.

::

    result = load_test("http://127.0.0.1:8000", {"model": "shakespeare-char", "prompt": "ROMEO:", "max_tokens": 32,
                                                 "temperature": 0}, concurrency=16, requests=64)
    result.requests_per_s, result.tokens_per_s, result.p50_s, result.p99_s, result.errors

Each of ``concurrency`` clients (``httpx``, asynchronous, one event loop) sends a request, waits for its answer,
and sends the next, until ``requests`` have been sent or ``time_limit_s`` has passed (requests not yet sent
then are not sent; one in flight may still finish). That is a *closed* loop: at most ``concurrency``
requests are in the server at once, as with that many users who each wait for their answer.

- throughput: answered requests per second, and generated tokens per second (the answers' ``usage``
  ``completion_tokens``), over the wall-clock time from the first request sent to the last answer;
- latency: seconds from sending a request to its whole answer, its median (p50) and 99th percentile (p99);
- errors: requests answered with a status other than 200, or not answered (a refused connection, a timeout).

The URL must be a loopback address (``127.0.0.1``, ``::1``, ``localhost``): the test loads this machine only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
import urllib.parse
from dataclasses import dataclass, field

from minillm import MinillmError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadTestResult:
    """What a :func:`load_test` measured (latencies in seconds, one per answered request, in order of answer)."""

    concurrency: int
    sent: int
    ok: int
    errors: int
    seconds: float
    completion_tokens: int
    latencies_s: list[float] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)  # the first few, to say what went wrong

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_s(self) -> float:
        return percentile(self.latencies_s, 50)

    @property
    def p99_s(self) -> float:
        return percentile(self.latencies_s, 99)

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "sent": self.sent, "ok": self.ok, "errors": self.errors,
                "seconds": round(self.seconds, 3), "requests_per_s": round(self.requests_per_s, 2),
                "tokens_per_s": round(self.tokens_per_s, 1), "p50_s": round(self.p50_s, 4),
                "p99_s": round(self.p99_s, 4)}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile by the nearest-rank method: the smallest value with at least q% of the values at or
    below it (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if its host is this machine; a :class:`MinillmError` otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise MinillmError(f"a load test runs against this machine only (http://127.0.0.1:PORT), not {url!r}")
    return url.rstrip("/")


async def _load(url: str, payload: dict, path: str, concurrency: int, requests: int, time_limit_s: float,
                request_timeout_s: float) -> LoadTestResult:
    import httpx

    result = LoadTestResult(concurrency, 0, 0, 0, 0.0, 0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    deadline = start + time_limit_s

    async def client(http: httpx.AsyncClient) -> None:
        while result.sent < requests and time.perf_counter() < deadline:
            result.sent += 1  # one event loop: no other client runs between the test and this line
            sent_at = time.perf_counter()
            try:
                response = await http.post(path, json=payload, timeout=request_timeout_s)
                body = response.json() if response.status_code == 200 else None
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            except Exception as error:  # any failure is counted, never raised: the test goes on
                result.errors += 1
                if len(result.error_messages) < 5:
                    result.error_messages.append(f"{type(error).__name__}: {error}")
                continue
            result.latencies_s.append(time.perf_counter() - sent_at)
            result.ok += 1
            result.completion_tokens += (body.get("usage") or {}).get("completion_tokens", 0)

    async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


def load_test(url: str, payload: dict, concurrency: int = 16, requests: int = 64, time_limit_s: float = 60.0,
              path: str = "/v1/completions", request_timeout_s: float | None = None) -> LoadTestResult:
    """Send ``payload`` (a JSON body) to ``url + path`` from ``concurrency`` clients at once, ``requests`` times in
    all, sending no more after ``time_limit_s``; a request unanswered after ``request_timeout_s`` (default:
    ``time_limit_s``) is an error. See the module's docstring for what is measured."""
    if concurrency < 1 or requests < 1:
        raise ValueError(f"concurrency and requests must be at least 1, got {concurrency} and {requests}")
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    url = check_loopback(url)
    run = _load(url, payload, path, concurrency, requests, time_limit_s, request_timeout_s or time_limit_s)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop in this thread: the usual case
        return asyncio.run(run)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # inside a running loop (Jupyter): a thread of its own
        return thread.submit(asyncio.run, run).result()
