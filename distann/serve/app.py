"""The HTTP search service: a FastAPI application over a served index (``distann serve``).

Endpoints (OpenAPI description at ``/openapi.json``, browsable at ``/docs``):

* ``POST /search``: JSON ``{"vectors": [[...]], "k": 10, "nprobe": 16}`` ->
  ``{"distances": [[...]], "ids": [[...]], "generation": N, "coverage": 1.0, "missing_shards": []}``;
  or a raw little-endian float32 body (``Content-Type: application/octet-stream``, the other
  parameters in the query string), answered in JSON or, with ``Accept: application/octet-stream``,
  as raw float32 distances followed by int64 ids (``X-Distann-*`` headers give the shapes).
* ``POST /range_search``: the same with ``radius`` instead of ``k``; per-query lists of results.
* ``GET /health`` (``?ready=1``: 503 until every shard is resident), ``GET /info``,
  ``GET /metrics`` (Prometheus), ``POST /reload`` (serve the newly committed generation).

Every request is validated before it joins a micro-batch (4xx with the parameter named, the
other requests unaffected). Nothing a client sends is unpickled: bodies are JSON or raw float32.
A bearer token, when configured, is required on every request, documentation included; a
per-client rate limit, when configured, answers 429 with ``Retry-After`` (:mod:`.ratelimit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as ModelError

from distann.errors import DistannError, IndexFormatError, ShardsUnavailableError, ValidationError
from distann.serve.batcher import MicroBatcher
from distann.serve.holder import IndexHolder
from distann.serve.metrics import ServiceMetrics
from distann.serve.ratelimit import RateLimit
from distann.validation import (check_k, check_max_codes, check_nprobe, check_positive_int, check_queries,
                                check_radius)

log = logging.getLogger(__name__)

RAW = "application/octet-stream"


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches, bounds and protects requests (``distann serve`` options)."""

    batch_wait_ms: float = 2.0
    max_batch: int = 4096
    deadline_ms: float = 30_000.0
    max_body_bytes: int = 64 << 20
    max_queries: int = 65_536
    max_k: int = 1024
    token: str | None = None
    rate_limit: str | None = None  # per client address, in the limits package's notation ("20/second")
    watch_seconds: float | None = None
    inflight_batches: int = 2

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["token"] = "set" if self.token else None
        return out


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nprobe: int | None = None
    max_codes: int | None = None
    ids_allowed: list[int] | None = None
    timeout_ms: float | None = None
    allow_partial: bool = False


class SearchParams(_Common):
    """kNN parameters (in the JSON body, or the query string of a raw body)."""

    k: int = 10
    k_factor: int | None = None


class RangeParams(_Common):
    """Range search parameters: ``radius`` is a squared L2 distance (l2) or a similarity (ip, cosine)."""

    radius: float


class SearchBody(SearchParams):
    vectors: list[list[float]]


class RangeBody(RangeParams):
    vectors: list[list[float]]


class _HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, **extra: Any):
        self.status, self.kind, self.message, self.extra = status, kind, message, extra


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status_code=status)


class _BearerToken:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                response = _error(401, "unauthorized", "a valid bearer token is required "
                                  "(header 'Authorization: Bearer <token>')")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, "too_large", f"request body of {declared} bytes; at most {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, "too_large", f"request body over {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _finite_or_none(D: np.ndarray) -> list:
    obj = D.astype(object)
    obj[~np.isfinite(D)] = None
    return obj.tolist()


def create_app(holder: IndexHolder, settings: ServeSettings | None = None) -> FastAPI:
    """The service's ASGI application over ``holder`` (which owns the served index)."""
    settings = settings or ServeSettings()
    metrics = ServiceMetrics(holder)
    batcher = MicroBatcher(lambda p, xq, dl: _run(holder, metrics, p, xq, dl), _split,
                           wait=settings.batch_wait_ms / 1000.0, max_batch=settings.max_batch,
                           inflight=settings.inflight_batches, on_batch=metrics.batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(_watch(holder, settings.watch_seconds)) if settings.watch_seconds else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            batcher.close()

    app = FastAPI(title="distann search service", version="1", lifespan=lifespan,
                  description="kNN and range search over a distann IVF index served from a Dask cluster.")
    app.state.holder, app.state.settings, app.state.metrics = holder, settings, metrics

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, exc: _HTTPError):
        return _error(exc.status, exc.kind, exc.message, **exc.extra)

    async def answer(request: Request, endpoint: str, body_model, params_model, op: str) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await _handle(request, holder, settings, batcher, body_model, params_model, op)
            status = response.status_code
            return response
        except _HTTPError as exc:
            status = exc.status
            raise
        finally:
            metrics.request(endpoint, status, time.perf_counter() - t0)

    raw_doc = {"requestBody": {"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/SearchBody"}},
        RAW: {"schema": {"type": "string", "format": "binary",
                         "description": "little-endian float32 queries, row after row; parameters in the query string"}}}}}

    @app.post("/search", openapi_extra=raw_doc, summary="k nearest neighbours of each query vector",
              responses={413: {"description": "body too large"}, 422: {"description": "invalid request"},
                         503: {"description": "shards unavailable"}, 504: {"description": "deadline passed"}})
    async def search(request: Request) -> Response:
        return await answer(request, "search", SearchBody, SearchParams, "knn")

    range_doc = {"requestBody": {"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/RangeBody"}},
        RAW: raw_doc["requestBody"]["content"][RAW]}}}

    @app.post("/range_search", openapi_extra=range_doc, summary="every vector within a radius of each query")
    async def range_search(request: Request) -> Response:
        return await answer(request, "range_search", RangeBody, RangeParams, "range")

    @app.get("/health", summary="liveness; ?ready=1 answers 503 until every shard is resident")
    async def health(ready: bool = False) -> Response:
        t0 = time.perf_counter()
        with holder.use() as index:
            state = await asyncio.get_running_loop().run_in_executor(None, index.health)
        ok = state["shards_resident"] == state["shards"]
        body = {"status": "ok" if ok else "degraded", **state}
        status = 503 if ready and not ok else 200
        metrics.request("health", status, time.perf_counter() - t0)
        return JSONResponse(body, status_code=status)

    @app.get("/info", summary="the served index and the service settings")
    async def info() -> dict:
        with holder.use() as index:
            out = await asyncio.get_running_loop().run_in_executor(None, index.info)
        out["service"] = settings.public()
        metrics.request("info", 200, 0.0)
        return out

    @app.post("/reload", summary="serve the newly committed generation once it is resident")
    async def reload() -> dict:
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, holder.reload)
        except DistannError as exc:
            metrics.request("reload", 500, 0.0)
            raise _HTTPError(500, "reload_failed", str(exc)) from None
        metrics.request("reload", 200, 0.0)
        return out

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if settings.token:
        app.add_middleware(_BearerToken, token=settings.token)
    if settings.rate_limit:  # added last: the outermost layer, so unauthenticated floods are limited too
        endpoints = {"search", "range_search", "health", "info", "reload", "metrics"}

        def limited(path: str) -> None:
            name = path.strip("/")
            metrics.request(name if name in endpoints else "other", 429, 0.0)  # no label per unknown path

        app.add_middleware(RateLimit, rate=settings.rate_limit, on_limited=limited)
    return app


async def _handle(request: Request, holder: IndexHolder, settings: ServeSettings, batcher: MicroBatcher,
                  body_model, params_model, op: str) -> Response:
    body = await _read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    index = holder.current
    try:
        if content_type == RAW:
            params = params_model.model_validate(dict(request.query_params))
            if len(body) % (4 * index.d):
                raise ValidationError("body", f"{len(body)} bytes", f"little-endian float32 rows of d={index.d} "
                                      f"values ({4 * index.d} bytes each)")
            xq = np.frombuffer(body, dtype="<f4").reshape(-1, index.d)
        elif content_type == "application/json":
            params = body_model.model_validate_json(body or b"{}")
            xq = params.vectors
            if xq and len({len(v) for v in xq}) != 1:
                raise ValidationError("vectors", "rows of different lengths", f"rows of d={index.d} numbers")
            xq = np.asarray(xq, dtype=np.float32) if xq else np.empty((0, index.d), np.float32)
        else:
            raise _HTTPError(415, "unsupported_media_type",
                             f"Content-Type {content_type!r}; use application/json or {RAW}")
        xq = _validate(index, settings, params, op, xq)
    except ModelError as exc:
        problems = [{"parameter": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                    for e in exc.errors()[:10]]
        raise _HTTPError(422, "invalid_request", "; ".join(f"{p['parameter']}: {p['message']}" for p in problems),
                         problems=problems) from None
    except ValidationError as exc:
        if exc.param == "xq":  # the API's name of the request's vectors
            exc = ValidationError("vectors", exc.received, exc.allowed)
        raise _HTTPError(422, "invalid_request", str(exc), parameter=exc.param) from None
    timeout_ms = settings.deadline_ms if params.timeout_ms is None else params.timeout_ms
    deadline = time.monotonic() + timeout_ms / 1000.0
    fields = params.model_dump(exclude={"vectors", "ids_allowed"})
    key = (op, tuple(sorted(fields.items())))
    if params.ids_allowed is not None:
        key = (op, uuid.uuid4().hex)  # filtered requests run alone
    try:
        result = await batcher.submit(key, (op, params), xq, deadline)
    except ShardsUnavailableError as exc:
        status = 504 if exc.timed_out else 503
        raise _HTTPError(status, "deadline_exceeded" if exc.timed_out else "shards_unavailable", str(exc),
                         missing_shards=exc.shards) from None
    except IndexFormatError as exc:
        raise _HTTPError(503, "index_unavailable", str(exc)) from None
    return _respond(request, result, op)


def _validate(index, settings: ServeSettings, params, op: str, xq: np.ndarray) -> np.ndarray:
    if len(xq) == 0:
        raise ValidationError("vectors", "no query vectors", "at least one query vector")
    if len(xq) > settings.max_queries:
        raise ValidationError("vectors", f"{len(xq)} queries", f"at most {settings.max_queries} per request "
                              "(--max-queries)")
    xq = check_queries(xq, index.d)
    if params.nprobe is not None:
        check_nprobe(params.nprobe, index.nlist)
    check_max_codes(params.max_codes)
    if params.timeout_ms is not None and not params.timeout_ms > 0:
        raise ValidationError("timeout_ms", params.timeout_ms, "a positive number of milliseconds")
    if op == "knn":
        check_k(params.k)
        if params.k > settings.max_k:
            raise ValidationError("k", params.k, f"at most {settings.max_k} (--max-k)")
        if params.k_factor is not None:
            check_positive_int("k_factor", params.k_factor)
    else:
        check_radius(params.radius, index.metric)
    return xq


def _run(holder: IndexHolder, metrics: ServiceMetrics, request: tuple, xq: np.ndarray, deadline: float | None):
    op, params = request
    allowed = None if params.ids_allowed is None else np.asarray(params.ids_allowed, dtype=np.int64)
    with holder.use() as index:  # one generation for the whole batch
        # a deadline already passed still goes through the search: it fails (or, with
        # allow_partial, answers what it has) naming the shards, as any late answer does
        timeout = None if deadline is None else max(1e-6, deadline - time.monotonic())
        common = dict(max_codes=params.max_codes, ids_allowed=allowed, timeout=timeout,
                      allow_partial=params.allow_partial)
        if op == "knn":
            result = index.search_result(xq, params.k, params.nprobe, k_factor=params.k_factor, **common)
        else:
            result = index.range_search_result(xq, params.radius, params.nprobe, **common)
    metrics.shards(result.shard_seconds)
    return result


def _split(result, sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for n in sizes:
        part = {"generation": result.generation, "coverage": result.coverage, "missing_shards": result.missing_shards}
        if result.lims is None:
            part["D"], part["I"] = result.D[start:start + n], result.I[start:start + n]
        else:
            lims = result.lims[start:start + n + 1]
            part["lims"] = lims - lims[0]
            part["D"], part["I"] = result.D[lims[0]:lims[-1]], result.I[lims[0]:lims[-1]]
        out.append(part)
        start += n
    return out


def _respond(request: Request, part: dict, op: str) -> Response:
    headers = {"X-Distann-Generation": str(part["generation"]), "X-Distann-Coverage": repr(part["coverage"])}
    if part["missing_shards"]:
        headers["X-Distann-Missing-Shards"] = ",".join(part["missing_shards"])
    if RAW in request.headers.get("accept", ""):
        D, I = np.ascontiguousarray(part["D"], "<f4"), np.ascontiguousarray(part["I"], "<i8")
        if op == "knn":
            headers.update({"X-Distann-Nq": str(D.shape[0]), "X-Distann-K": str(D.shape[1])})
            return Response(D.tobytes() + I.tobytes(), media_type=RAW, headers=headers)
        lims = np.ascontiguousarray(part["lims"], "<i8")
        headers.update({"X-Distann-Nq": str(len(lims) - 1), "X-Distann-Results": str(len(I))})
        return Response(lims.tobytes() + D.tobytes() + I.tobytes(), media_type=RAW, headers=headers)
    body = {"generation": part["generation"], "coverage": part["coverage"], "missing_shards": part["missing_shards"]}
    if op == "knn":
        body["distances"], body["ids"] = _finite_or_none(part["D"]), part["I"].tolist()
    else:
        lims = part["lims"]
        body["distances"] = [part["D"][lims[i]:lims[i + 1]].tolist() for i in range(len(lims) - 1)]
        body["ids"] = [part["I"][lims[i]:lims[i + 1]].tolist() for i in range(len(lims) - 1)]
    return JSONResponse(body, headers=headers)


async def _watch(holder: IndexHolder, every: float) -> None:
    """Poll the committed generation and reload when a newer one appears."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            await loop.run_in_executor(None, holder.reload)
        except Exception as exc:  # noqa: BLE001 - keep serving the old generation; try again later
            log.warning("watching %s: reload failed: %s", holder.loc.url, exc)
