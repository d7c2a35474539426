"""A Python client of the search service (``distann query`` uses it).

Small batches go as JSON; batches of more than ``raw_above`` numbers go as a raw float32
body and come back raw, which avoids formatting and parsing millions of decimal numbers.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import numpy as np

from distann.errors import DistannError, ValidationError

RAW = "application/octet-stream"


def _ssl_context(verify: object) -> bool | ssl.SSLContext:
    """What httpx takes as ``verify`` (it deprecates CA file paths there: they become a context)."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        return verify
    if isinstance(verify, (str, os.PathLike)):
        if not os.path.isfile(verify):
            raise ValidationError("verify", verify, "an existing PEM file of CA certificates, True or False")
        try:
            return ssl.create_default_context(cafile=os.fspath(verify))
        except ssl.SSLError as exc:
            raise ValidationError("verify", verify, f"a PEM file of CA certificates: {exc.reason or exc}") from None
    raise ValidationError("verify", verify, "True, False, a CA file path or an ssl.SSLContext")


class ServiceError(DistannError):
    """The service answered with an error (``status``: the HTTP status, ``body``: its JSON)."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('message', body)}")


class ServiceUnreachableError(DistannError, ConnectionError):
    """No service answered at the address (connection refused, timed out, name unknown)."""


class SearchClient:
    """``SearchClient("http://127.0.0.1:8000", token=...)``; the token defaults to ``$DISTANN_TOKEN``.

    ``verify`` (https only): True checks the server's certificate against the system's CAs, a
    path trusts the CA certificates in that PEM file (a self-signed service's own certificate
    or its CA), an ``ssl.SSLContext`` is used as it is; False skips the check (tests only)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, raw_above: int = 16384,
                 verify: bool | str | os.PathLike | ssl.SSLContext = True):
        import httpx

        token = token if token is not None else os.environ.get("DISTANN_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.raw_above = raw_above
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=_ssl_context(verify))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, **kw: Any):
        import httpx

        try:
            return self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServiceUnreachableError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None

    def _check(self, response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ServiceError(response.status_code, body)
        return response

    def _post(self, path: str, xq, params: dict[str, Any]):
        xq = np.asarray(xq, dtype=np.float32)
        params = {k: v for k, v in params.items() if v is not None}
        if xq.ndim == 2 and xq.size > self.raw_above and "ids_allowed" not in params:
            query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
            return self._check(self._send("POST", path, params=query, content=np.ascontiguousarray(xq, "<f4").tobytes(),
                                               headers={"Content-Type": RAW, "Accept": RAW})), True
        return self._check(self._send("POST", path, json={"vectors": xq.tolist(), **params})), False

    def search(self, xq, k: int = 10, nprobe: int | None = None, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` as ``Index.search`` (padding: +inf/-inf and -1)."""
        out = self.search_result(xq, k, nprobe, **params)
        return out["distances"], out["ids"]

    def search_result(self, xq, k: int = 10, nprobe: int | None = None, **params: Any) -> dict[str, Any]:
        """``{"distances", "ids", "generation", "coverage", "missing_shards"}`` with numpy arrays;
        ``params``: max_codes, k_factor, ids_allowed, timeout_ms, allow_partial."""
        if "ids_allowed" in params and params["ids_allowed"] is not None:
            params["ids_allowed"] = np.asarray(params["ids_allowed"]).tolist()
        response, raw = self._post("/search", xq, {"k": k, "nprobe": nprobe, **params})
        if raw:
            nq, kk = int(response.headers["x-distann-nq"]), int(response.headers["x-distann-k"])
            buf = response.content
            D = np.frombuffer(buf, "<f4", nq * kk).reshape(nq, kk)
            I = np.frombuffer(buf, "<i8", nq * kk, offset=4 * nq * kk).reshape(nq, kk)
            missing = response.headers.get("x-distann-missing-shards", "")
            return {"distances": D, "ids": I, "generation": int(response.headers["x-distann-generation"]),
                    "coverage": float(response.headers["x-distann-coverage"]),
                    "missing_shards": missing.split(",") if missing else []}
        body = response.json()
        ids = np.asarray(body["ids"], dtype=np.int64).reshape(-1, k)
        pad = np.float32(np.inf)
        D = np.array([[pad if v is None else v for v in row] for row in body["distances"]], np.float32).reshape(-1, k)
        if ids.size and (ids < 0).any():
            info_metric = self._metric()
            D[ids < 0] = -np.inf if info_metric in ("ip", "cosine") else np.inf
        return {**body, "distances": D, "ids": ids}

    def range_search(self, xq, radius: float, nprobe: int | None = None,
                     **params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lims, D, I)`` in the Faiss convention, as ``Index.range_search``."""
        response, raw = self._post("/range_search", xq, {"radius": radius, "nprobe": nprobe, **params})
        if raw:
            nq, n = int(response.headers["x-distann-nq"]), int(response.headers["x-distann-results"])
            buf = response.content
            lims = np.frombuffer(buf, "<i8", nq + 1)
            D = np.frombuffer(buf, "<f4", n, offset=8 * (nq + 1))
            I = np.frombuffer(buf, "<i8", n, offset=8 * (nq + 1) + 4 * n)
            return lims, D, I
        body = response.json()
        sizes = [len(r) for r in body["ids"]]
        lims = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=lims[1:])
        D = np.array([v for row in body["distances"] for v in row], np.float32)
        I = np.array([v for row in body["ids"] for v in row], np.int64)
        return lims, D, I

    def _metric(self) -> str:
        if not hasattr(self, "_metric_cache"):
            self._metric_cache = self.info()["metric"]
        return self._metric_cache

    def health(self) -> dict[str, Any]:
        return self._check(self._send("GET", "/health")).json()

    def info(self) -> dict[str, Any]:
        return self._check(self._send("GET", "/info")).json()

    def reload(self) -> dict[str, Any]:
        return self._check(self._send("POST", "/reload")).json()
