"""Security of the search service and of the Dask cluster, on real components: uvicorn servers on
loopback (HTTPS with a certificate made here by trustme), the session's multi-process Dask
cluster, and a Dask cluster whose scheduler, worker and client speak only TLS.

Covered: HTTPS search equal to local search, plain HTTP and untrusting clients refused, TLS
options validated before start; the bearer token on every endpoint against missing, wrong,
prefix, longer and malformed tokens; the per-client rate limit (429 + Retry-After) and the body
size limit (413, declared and streamed); foreign formats refused and nothing unpickled; Dask TLS
with ``require_encryption`` (plain TCP and clients without the certificates refused), from the
API and from the command line."""

from __future__ import annotations

import base64
import json
import os
import pickle
import ssl
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import distann
from distann.errors import ValidationError
from distann.serve.app import ServeSettings
from distann.serve.client import SearchClient, ServiceError, ServiceUnreachableError
from distann.serve.server import check_tls, make_holder, make_server
from tests.conftest import free_port

trustme = pytest.importorskip("trustme")

D = 16
TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(12)
    return rng.standard_normal((4000, D)).astype(np.float32), rng.standard_normal((16, D)).astype(np.float32)


@pytest.fixture(scope="module")
def index_url(client, data, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("sec") / "idx.zarr")
    distann.build(data[0], url, spec="IVF16,Flat", client=client, niter=4, shard_bytes=40_000)
    return url


@pytest.fixture(scope="module")
def expected(index_url, data):
    return distann.open_index(index_url).search(data[1], k=5, nprobe=4)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA made for this test and a server certificate it signed for 127.0.0.1 / localhost (PEM files)."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    with open(paths["cert"], "wb") as f:  # the chain: leaf first
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    other = trustme.CA().issue_cert("127.0.0.1")  # a valid certificate of another CA: its key does not match
    paths["other_key"] = root / "other-key.pem"
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["other_ca"] = root / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return {k: str(v) for k, v in paths.items()}


class Service:
    """``distann serve``'s uvicorn server (make_server) in a thread on a free loopback port."""

    def __init__(self, holder, settings: ServeSettings, **tls):
        self.holder = holder
        self.port = free_port()
        self.server = make_server(holder, settings, "127.0.0.1", self.port, **tls)
        self.url = f"{self.server.scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the service did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.holder.close()


@pytest.fixture
def service(client, index_url, request):
    """A service with the settings of the test's ``settings`` marker argument (a dict)."""
    kw = getattr(request, "param", {})
    svc = Service(make_holder(index_url, client), ServeSettings(**kw.get("settings", {})), **kw.get("tls", {}))
    try:
        yield svc
    finally:
        svc.stop()


# --------------------------------------------------------------------------- TLS of the HTTP service

def test_https_search_equals_local_and_untrusted_or_plain_clients_are_refused(client, index_url, pki, data,
                                                                              expected):
    svc = Service(make_holder(index_url, client), ServeSettings(token=TOKEN),
                  tls_cert=pki["cert"], tls_key=pki["key"])
    try:
        assert svc.url.startswith("https://")
        with SearchClient(svc.url, token=TOKEN, verify=pki["ca"]) as c:
            Dh, Ih = c.search(data[1], k=5, nprobe=4)
            assert c.health()["status"] == "ok"
        np.testing.assert_array_equal(Ih, expected[1])
        np.testing.assert_allclose(Dh, expected[0], rtol=1e-6)
        context = ssl.create_default_context(cafile=pki["ca"])  # an SSLContext is taken as it is
        with SearchClient(svc.url, token=TOKEN, verify=context) as c:
            np.testing.assert_array_equal(c.search(data[1][:2], k=5, nprobe=4)[1], expected[1][:2])
        # the system's CAs, and another CA, do not vouch for this certificate: no request is sent
        for verify in (True, pki["other_ca"]):
            with SearchClient(svc.url, token=TOKEN, verify=verify) as c, \
                    pytest.raises(ServiceUnreachableError, match="CERTIFICATE_VERIFY_FAILED"):
                c.health()
        # plain HTTP to the TLS port gets no HTTP answer at all
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{svc.port}/health", headers={"Authorization": f"Bearer {TOKEN}"})
        # the service goes on answering after the refused handshakes
        with SearchClient(svc.url, token=TOKEN, verify=pki["ca"]) as c:
            assert c.health()["status"] == "ok"
    finally:
        svc.stop()


def test_tls_options_are_checked_before_start(pki, tmp_path):
    assert check_tls(None, None) is False
    assert check_tls(pki["cert"], pki["key"]) is True
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [((pki["cert"], None), "tls_key", "both"),
             ((None, pki["key"]), "tls_cert", "both"),
             ((str(tmp_path / "missing.pem"), pki["key"]), "tls_cert", "existing"),
             ((pki["cert"], str(tmp_path / "missing.pem")), "tls_key", "existing"),
             ((str(garbage), pki["key"]), "tls_cert", "PEM"),
             ((pki["cert"], str(garbage)), "tls_key", "PEM"),
             ((pki["cert"], pki["other_key"]), "tls_key", "matching")]
    for (cert, key), param, word in cases:
        with pytest.raises(ValidationError) as err:
            check_tls(cert, key)
        assert err.value.param == param and word in str(err.value), (cert, key, str(err.value))
    with pytest.raises(ValidationError, match="verify"):
        SearchClient("https://127.0.0.1:1", verify=str(tmp_path / "missing.pem"))


# --------------------------------------------------------------------------- bearer token

ENDPOINTS = [("GET", "/health"), ("GET", "/health?ready=1"), ("GET", "/info"), ("GET", "/metrics"),
             ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("POST", "/search"),
             ("POST", "/range_search"), ("POST", "/reload")]


def _bad_authorizations() -> list[tuple[str, dict]]:
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    return [("missing", {}),
            ("empty", {"Authorization": ""}),
            ("scheme only", {"Authorization": "Bearer"}),
            ("prefix of the token", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
            ("first character only", {"Authorization": f"Bearer {TOKEN[0]}"}),
            ("token + 1 character", {"Authorization": f"Bearer {TOKEN}x"}),
            ("wrong, same length", {"Authorization": f"Bearer {'x' * len(TOKEN)}"}),
            ("last character wrong", {"Authorization": f"Bearer {TOKEN[:-1]}!"}),
            ("very long", {"Authorization": "Bearer " + "y" * 8000}),
            ("token without scheme", {"Authorization": TOKEN}),
            ("Basic scheme", {"Authorization": f"Basic {basic}"}),
            ("token twice", {"Authorization": f"Bearer {TOKEN} {TOKEN}"}),
            ("non-ASCII bytes", {"Authorization": "Bearer s3cret-tökén".encode("latin-1")}),
            ("other header", {"X-Token": TOKEN})]


@pytest.mark.parametrize("service", [{"settings": {"token": TOKEN}}], indirect=True)
def test_token_refuses_every_wrong_form_on_every_endpoint(service, data, expected):
    body = {"vectors": data[1][:2].tolist(), "k": 5, "nprobe": 4}
    with httpx.Client(base_url=service.url) as http:
        for what, headers in _bad_authorizations():
            for method, path in ENDPOINTS:
                r = http.request(method, path, headers=headers, json=body if method == "POST" else None)
                assert r.status_code == 401, (what, path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "unauthorized"
        # in the query string it is no token either
        assert http.get(f"/health?token={TOKEN}").status_code == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        for method, path in ENDPOINTS:
            if path != "/range_search":
                r = http.request(method, path, headers=right, json=body if method == "POST" else None)
                assert r.status_code == 200, (path, r.text)
        r = http.post("/range_search", headers=right, json={"vectors": body["vectors"], "radius": 10.0})
        assert r.status_code == 200
        r = http.post("/search", headers=right, json=body)
        assert r.json()["ids"] == expected[1][:2].tolist()
        # refused before the body is read: a large body with no token is not consumed into memory first
        t0 = time.perf_counter()
        r = http.post("/search", content=b"0" * (8 << 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and time.perf_counter() - t0 < 30


# --------------------------------------------------------------------------- rate and size limits

@pytest.mark.parametrize("service", [{"settings": {"rate_limit": "4/minute", "token": TOKEN}}], indirect=True)
def test_rate_limit_per_client_answers_429_with_retry_after(service):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=service.url) as a:
        assert [a.get("/health", headers=auth).status_code for _ in range(4)] == [200] * 4
        over = a.get("/health", headers=auth)
        assert over.status_code == 429
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["type"] == "rate_limited" and "--rate-limit" in over.json()["error"]["message"]
        # unauthenticated requests from a limited address are limited too (a token cannot be guessed faster)
        assert a.get("/health").status_code == 429
        assert a.post("/search", json={"vectors": [[0.0] * D]}, headers=auth).status_code == 429
    # another client address (127.0.0.2, also loopback) has its own budget
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=service.url, transport=transport) as b:
        assert b.get("/health", headers=auth).status_code == 200
        assert b.get("/metrics", headers=auth).status_code == 200
        text = b.get("/metrics", headers=auth).text
    assert 'distann_requests_total{endpoint="health",status="429"} 2.0' in text
    assert 'distann_requests_total{endpoint="search",status="429"} 1.0' in text


@pytest.mark.parametrize("service", [{"settings": {"rate_limit": "3/second"}}], indirect=True)
def test_rate_limit_window_refills(service):
    with httpx.Client(base_url=service.url) as http:
        answers = [http.get("/health") for _ in range(12)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited and int(limited[-1].headers["retry-after"]) == 1  # a one-second window
        time.sleep(1.2)
        assert http.get("/health").status_code == 200


def test_rate_limit_is_validated():
    from distann import config

    for bad in ("lots", "0/second", "10/fortnight", "", "-3/second"):
        with pytest.raises(ValidationError, match="rate_limit"):
            config.from_dict("serve", {"index": "x.zarr", "rate_limit": bad})
    job = config.from_dict("serve", {"index": "x.zarr", "rate_limit": "50/second;600/minute"})
    assert job.rate_limit == "50/second;600/minute"


@pytest.mark.parametrize("service", [{"settings": {"max_body_bytes": 4096}}], indirect=True)
def test_body_size_limit_declared_and_streamed(service):
    with httpx.Client(base_url=service.url) as http:
        ok = http.post("/search", json={"vectors": [[0.0] * D], "k": 3})
        assert ok.status_code == 200
        declared = http.post("/search", content=b"[" * 5000, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and "--max-body-bytes" in declared.json()["error"]["message"]
        assert "5000" in declared.json()["error"]["message"]

        def chunks():  # no Content-Length: chunked transfer encoding, counted while it streams
            for _ in range(10):
                yield b" " * 1000

        streamed = http.post("/search", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and "over 4096 bytes" in streamed.json()["error"]["message"]
        assert http.post("/search", json={"vectors": [[0.0] * D], "k": 3}).status_code == 200


# --------------------------------------------------------------------------- formats: nothing is unpickled

class _Trap:
    """Unpickling this creates the marker file (what an attacker's payload would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("service", [{}], indirect=True)
def test_pickles_and_foreign_formats_are_refused_and_never_unpickled(service, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)), protocol=pickle.HIGHEST_PROTOCOL)
    assert len(payload) % (4 * D)  # so that the raw path must refuse its length
    row = 4 * D
    padded = payload + b"\x00" * (row - len(payload) % row)
    cases = [("application/python-pickle", payload, 415, "content-type"),
             ("application/x-python-serialize", payload, 415, "content-type"),
             ("application/x-pickle", payload, 415, "content-type"),
             ("multipart/form-data; boundary=x", payload, 415, "content-type"),
             ("text/plain", payload, 415, "content-type"),
             ("application/octet-stream", payload, 422, "float32"),
             ("application/octet-stream", payload[:7], 422, "float32"),
             ("application/json", payload, 422, "json"),
             (None, payload, 422, "json")]
    with httpx.Client(base_url=service.url) as http:
        for ctype, body, status, word in cases:
            headers = {"Content-Type": ctype} if ctype else {}
            for path in ("/search", "/range_search?radius=1.0"):
                r = http.post(path, content=body, headers=headers)
                assert r.status_code == status, (ctype, path, r.text)
                assert word in r.json()["error"]["message"].lower(), (ctype, r.text)
        # a pickle of exactly whole rows is only ever read as float32 numbers (answered or refused as such)
        r = http.post("/search", content=padded, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 422), r.text
        assert http.get("/health").json()["status"] == "ok"
    assert not marker.exists()
    pickle.loads(payload)  # the control: this payload does act when unpickled
    assert marker.exists()


# --------------------------------------------------------------------------- Dask TLS

@pytest.fixture(scope="module")
def tls_cluster():
    """A scheduler and one worker process that speak only TLS (``require_encryption``), with a
    temporary certificate authority (distributed's ``Security.temporary()``)."""
    from distributed import Client, LocalCluster
    from distributed.security import Security

    from distann.cluster import WORKER_ENV

    security = Security.temporary()
    assert security.require_encryption
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls", security=security,
                      host="127.0.0.1", dashboard_address=None, memory_limit="2GiB", env=WORKER_ENV) as cluster, \
            Client(cluster, security=security) as c:
        yield cluster, c, security


def test_dask_tls_cluster_builds_and_searches(tls_cluster, data, tmp_path):
    cluster, c, _ = tls_cluster
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    assert all(w.startswith("tls://") for w in c.scheduler_info()["workers"])
    url = str(tmp_path / "tls.zarr")
    distann.build(data[0], url, spec="IVF16,Flat", client=c, niter=4, shard_bytes=40_000)
    local = distann.open_index(url).search(data[1], k=5, nprobe=4)
    with distann.open_index(url, client=c) as di:
        Dd, Id = di.search(data[1], k=5, nprobe=4)
    np.testing.assert_array_equal(Id, local[1])
    np.testing.assert_allclose(Dd, local[0], rtol=1e-6)


_REFUSED_CLIENTS = """
import json
import sys
from distributed import Client
from distributed.security import Security

address = sys.argv[1]
host_port = address.split("://", 1)[1]
attempts = {"plain tcp": lambda: Client(f"tcp://{host_port}", timeout=5),
            "tls without certificates": lambda: Client(address, timeout=5),
            "tls with another authority": lambda: Client(address, security=Security.temporary(), timeout=5)}
for name, connect in attempts.items():
    try:
        connect().close()
        print(json.dumps([name, "connected", False, ""]))
    except Exception as exc:
        print(json.dumps([name, type(exc).__name__, isinstance(exc, (OSError, TimeoutError)), str(exc)]))
"""


def test_dask_tls_refuses_plain_tcp_and_clients_without_certificates(tls_cluster):
    """Each refused client runs in a fresh interpreter (a Client that fails to connect can leave
    its IO loop behind in the process, and the next one then fails inside Dask for that reason,
    not for the one under test)."""
    cluster, c, _ = tls_cluster
    run = subprocess.run([sys.executable, "-c", _REFUSED_CLIENTS, cluster.scheduler_address], capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    got = {name: (kind, comm_error, msg) for name, kind, comm_error, msg in map(json.loads, run.stdout.splitlines())}
    assert got.keys() == {"plain tcp", "tls without certificates", "tls with another authority"}, run.stdout
    assert got["plain tcp"][1] and got["tls with another authority"][1], run.stdout  # OSError / TimeoutError
    assert got["tls without certificates"][0] == "TypeError" and "ssl_context" in got["tls without certificates"][2]
    assert c.submit(sum, [1, 2]).result() == 3  # the cluster still serves its own client


def test_cli_joins_a_tls_scheduler_through_dask_config(tls_cluster, data, tmp_path):
    cluster, _, security = tls_cluster
    pems = {"ca": security.tls_ca_file, "cert": security.tls_client_cert, "key": security.tls_client_key}
    for name, text in pems.items():
        (tmp_path / f"{name}.pem").write_text(text)
    np.save(tmp_path / "x.npy", data[0])
    base = {**os.environ, "DASK_DISTANN__CLUSTER__CONNECT_TIMEOUT": "10"}
    tls_env = {**base, "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
               "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tmp_path / "ca.pem"),
               "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tmp_path / "cert.pem"),
               "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tmp_path / "key.pem")}
    argv = [sys.executable, "-m", "distann.cli", "--no-progress", "build", str(tmp_path / "x.npy"),
            str(tmp_path / "cli.zarr"), "--spec", "IVF16,Flat", "--scheduler", cluster.scheduler_address]
    run = subprocess.run(argv, env=tls_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert distann.open_index(str(tmp_path / "cli.zarr")).ntotal == len(data[0])
    # without the TLS settings: one clear error naming the setting, not a traceback
    run = subprocess.run(argv[:-2] + ["--scheduler", cluster.scheduler_address, "--overwrite"], env=base,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "distributed.comm.tls.ca-file" in run.stderr and "Traceback" not in run.stderr
