"""HTTP load generator for the search service (used by bench_serve.py, run as its own process).

    python jobs/_loadgen.py URL QUERIES.npy --clients 32 --seconds 30 --max-requests 1000000 --out load.json

``--clients`` concurrent clients each send one single-vector JSON ``POST /search`` after the
other until ``--seconds`` have passed or ``--max-requests`` have been sent in all (loopback
only: the URL must be http://127.0.0.1 or localhost). Writes every request's start time,
latency and HTTP status (0: no response) to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from urllib.parse import urlparse

import numpy as np


async def run(url: str, xq: np.ndarray, clients: int, seconds: float, max_requests: int, k: int, nprobe: int,
              token: str | None, timeout: float) -> list[tuple[float, float, int]]:
    import aiohttp  # a lighter client than httpx: the generator must not be the bottleneck on 2 cores

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    bodies = [json.dumps({"vectors": [row.tolist()], "k": k, "nprobe": nprobe}).encode() for row in xq]
    out: list[tuple[float, float, int]] = []
    t_end = time.perf_counter() + seconds
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async def client(c: int) -> None:
            nonlocal sent
            i = c
            while time.perf_counter() < t_end and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with http.post("/search", data=bodies[i % len(bodies)]) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                out.append((t0, time.perf_counter() - t0, status))
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("queries")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets loopback addresses")
    xq = np.load(args.queries)
    t0 = time.perf_counter()
    rows = asyncio.run(run(args.url, xq, args.clients, args.seconds, args.max_requests, args.k, args.nprobe,
                           os.environ.get("DISTANN_TOKEN"), args.timeout))
    with open(args.out, "w") as f:
        json.dump({"t0": t0, "requests": [(s - t0, lat, st) for s, lat, st in rows]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
