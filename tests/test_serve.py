"""The HTTP search service, on a real multi-process Dask cluster and a real uvicorn server on
loopback: answers equal local search, micro-batching, the token, bad input (4xx without
disturbing other requests), deadlines and partial results, metrics, and switching to a newly
committed generation while queries run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import distann
from distann.serve.app import ServeSettings, create_app
from distann.serve.client import SearchClient, ServiceError
from distann.serve.server import make_holder
from tests.conftest import free_port

D = 32
TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((20000, D)).astype(np.float32), rng.standard_normal((64, D)).astype(np.float32)


@pytest.fixture(scope="module")
def index_url(client, data, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("serve") / "idx.zarr")
    distann.build(data[0], url, spec="IVF64,SQ8", client=client, niter=5, shard_bytes=60000)
    return url


class Service:
    """A uvicorn server in a thread serving ``holder`` on a free loopback port."""

    def __init__(self, holder, settings: ServeSettings):
        import uvicorn

        self.holder = holder
        self.app = create_app(holder, settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the service did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.holder.close()


@pytest.fixture(scope="module")
def service(client, index_url):
    svc = Service(make_holder(index_url, client), ServeSettings(token=TOKEN, batch_wait_ms=5.0))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def expected(index_url, data):
    return distann.open_index(index_url).search(data[1], k=10, nprobe=8)


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def test_json_and_raw_answers_equal_local_search(service, data, expected):
    with SearchClient(service.url, token=TOKEN) as c:
        Dj, Ij = c.search(data[1], k=10, nprobe=8)
        c.raw_above = 0  # the same batch as a raw float32 body, answered raw
        Dr, Ir = c.search(data[1], k=10, nprobe=8)
    for Dg, Ig in ((Dj, Ij), (Dr, Ir)):  # each shard scans only its queries: the kernel's query
        np.testing.assert_array_equal(Ig, expected[1])  # blocking can round a last bit differently
        np.testing.assert_allclose(Dg, expected[0], rtol=1e-6)


def test_range_search_and_filter_equal_local(service, index_url, data):
    local = distann.open_index(index_url)
    lims0, D0, I0 = local.range_search(data[1][:16], 22.0, nprobe=8)
    with SearchClient(service.url, token=TOKEN) as c:
        for raw_above in (10**9, 0):
            c.raw_above = raw_above
            lims, Dr, Ir = c.range_search(data[1][:16], 22.0, nprobe=8)
            np.testing.assert_array_equal(lims, lims0)
            np.testing.assert_array_equal(Ir, I0)
            np.testing.assert_allclose(Dr, D0, rtol=1e-6)
        allowed = np.arange(0, 20000, 7)
        Df, If = c.search(data[1][:8], k=10, nprobe=8, ids_allowed=allowed)
    D1, I1 = local.search(data[1][:8], k=10, nprobe=8, ids_allowed=allowed)
    np.testing.assert_array_equal(If, I1)
    assert np.isin(If[If >= 0], allowed).all()


def test_concurrent_single_queries_are_micro_batched_and_correct(service, data, expected):
    before = _metric(service, "distann_batch_requests_count"), _metric(service, "distann_batch_requests_sum")
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def one(i: int):
        try:
            with SearchClient(service.url, token=TOKEN) as c:
                for _ in range(3):
                    results[i] = c.search(data[1][i:i + 1], k=10, nprobe=8)[1][0]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(32):
        np.testing.assert_array_equal(results[i], expected[1][i])
    batches = _metric(service, "distann_batch_requests_count") - before[0]
    requests = _metric(service, "distann_batch_requests_sum") - before[1]
    assert requests == 96 and batches < requests  # several requests shared a coordinator batch


def test_micro_batching_off_runs_each_request_alone(client, index_url, data, expected):
    svc = Service(make_holder(index_url, client), ServeSettings(batch_wait_ms=0))
    try:
        def one(i):
            with SearchClient(svc.url) as c:
                np.testing.assert_array_equal(c.search(data[1][i:i + 1], k=10, nprobe=8)[1][0], expected[1][i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _metric(svc, "distann_batch_requests_count", auth=False) == 8
        assert _metric(svc, "distann_batch_requests_sum", auth=False) == 8
    finally:
        svc.stop()


def test_token_is_required_on_every_endpoint(service):
    for method, path in (("GET", "/health"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("POST", "/search"), ("POST", "/reload")):
        assert httpx.request(method, service.url + path).status_code == 401, path
        wrong = httpx.request(method, service.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    assert httpx.get(service.url + "/health", headers=_auth()).status_code == 200
    with pytest.raises(ServiceError, match="401"):
        SearchClient(service.url, token="nope").health()


def test_health_info_openapi_and_metrics(service, index_url):
    h = httpx.get(service.url + "/health?ready=1", headers=_auth()).json()
    assert h["status"] == "ok" and h["shards_resident"] == h["shards"] > 1 and h["workers"] == 2
    info = httpx.get(service.url + "/info", headers=_auth()).json()
    assert info["url"] == index_url and info["spec"] == "IVF64,SQ8" and info["service"]["token"] == "set"
    spec = httpx.get(service.url + "/openapi.json", headers=_auth()).json()
    assert {"/search", "/range_search", "/health", "/info", "/metrics", "/reload"} <= set(spec["paths"])
    assert "application/octet-stream" in spec["paths"]["/search"]["post"]["requestBody"]["content"]
    with SearchClient(service.url, token=TOKEN) as c:
        c.search(np.zeros((1, D), np.float32), k=3, nprobe=4)
    text = httpx.get(service.url + "/metrics", headers=_auth()).text
    for name in ('distann_requests_total{endpoint="search",status="200"}', "distann_request_seconds_bucket",
                 "distann_batch_queries_bucket", "distann_shard_scan_seconds_bucket",
                 "distann_shard_worker_seconds_total{shard=", "distann_shards_resident", "distann_generation 1.0"):
        assert name in text, name


BAD = [
    (b"{not json", "application/json", 422, "JSON"),
    (json.dumps({"vectors": [[0.0] * (D - 1)]}).encode(), "application/json", 422, "vectors"),
    (b'{"vectors": [[NaN' + b", 0.0" * (D - 1) + b"]]}", "application/json", 422, "NaN"),
    (json.dumps({"vectors": [[0.0] * D], "k": 5000}).encode(), "application/json", 422, "max-k"),
    (json.dumps({"vectors": [[0.0] * D], "k": 0}).encode(), "application/json", 422, "k"),
    (json.dumps({"vectors": [[0.0] * D], "nprobe": 65}).encode(), "application/json", 422, "nprobe"),
    (json.dumps({"vectors": [[0.0] * D], "colour": "red"}).encode(), "application/json", 422, "colour"),
    (json.dumps({"vectors": [[0.0] * D, [0.0] * 3]}).encode(), "application/json", 422, "vectors"),
    (json.dumps({"vectors": []}).encode(), "application/json", 422, "vectors"),
    (b"\x00" * (4 * D + 1), "application/octet-stream", 422, "float32"),
    (b"<xml/>", "text/xml", 415, "Content-Type"),
]


def test_bad_requests_get_4xx_and_do_not_disturb_others(service, data, expected):
    stop = threading.Event()
    wrong: list = []

    def good_stream():
        with SearchClient(service.url, token=TOKEN) as c:
            while not stop.is_set():
                I = c.search(data[1][:4], k=10, nprobe=8)[1]
                if not np.array_equal(I, expected[1][:4]):
                    wrong.append(I)

    t = threading.Thread(target=good_stream)
    t.start()
    try:
        for body, ctype, status, word in BAD:
            r = httpx.post(service.url + "/search", content=body, headers={**_auth(), "Content-Type": ctype})
            assert r.status_code == status, (body[:40], r.text)
            assert word.lower() in r.json()["error"]["message"].lower(), r.text
        big = httpx.post(service.url + "/search", content=b"0" * (65 << 20),
                         headers={**_auth(), "Content-Type": "application/json"})
        assert big.status_code == 413 and "max-body-bytes" in big.json()["error"]["message"]
        r = httpx.post(service.url + "/range_search", json={"vectors": [[0.0] * D], "radius": -1.0}, headers=_auth())
        assert r.status_code == 422 and "radius" in r.text
    finally:
        stop.set()
        t.join()
    assert not wrong
    assert httpx.get(service.url + "/health", headers=_auth()).json()["status"] == "ok"


def test_deadline_error_or_partial_results(service, data):
    with SearchClient(service.url, token=TOKEN) as c:
        with pytest.raises(ServiceError) as err:
            c.search(data[1], k=10, nprobe=8, timeout_ms=0.001)
        assert err.value.status == 504 and err.value.body["error"]["type"] == "deadline_exceeded"
        out = c.search_result(data[1], k=10, nprobe=8, timeout_ms=0.001, allow_partial=True)
    assert out["coverage"] < 1.0 and out["missing_shards"]
    assert (out["ids"] == -1).any()  # what did not answer is padding, and said so


def test_reload_while_queries_run_never_mixes_generations(client, data, tmp_path):
    url = str(tmp_path / "gen.zarr")
    xq = data[1][:8]
    distann.build(data[0], url, spec="IVF32,Flat", client=client, niter=5, shard_bytes=200_000)
    expect = {1: distann.open_index(url).search(xq, k=10, nprobe=4)}
    svc = Service(make_holder(url, client, replicas=2), ServeSettings(batch_wait_ms=1.0))
    seen: list = []
    errors: list = []
    stop = threading.Event()

    def stream():
        with SearchClient(svc.url) as c:
            while not stop.is_set():
                try:
                    out = c.search_result(xq, k=10, nprobe=4)
                    seen.append((out["generation"], out["ids"], out["distances"]))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        # a different index under the same URL: generation 2 (the service still answers from 1)
        distann.build(data[0][::-1].copy(), url, spec="IVF16,Flat", client=client, niter=5, overwrite=True,
                      shard_bytes=200_000)
        expect[2] = distann.open_index(url).search(xq, k=10, nprobe=4)
        assert os.path.isdir(os.path.join(url, "g000001"))  # served: kept
        with SearchClient(svc.url) as c:
            assert c.reload() == {"generation": 2, "previous": 1, "reloaded": True}
            assert c.reload()["reloaded"] is False
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert not errors
        gens = [g for g, _, _ in seen]
        assert set(gens) == {1, 2} and gens.index(2) > 0
        for g, I, Dg in seen:  # micro-batches mix the threads' queries: the Flat kernel's query
            np.testing.assert_array_equal(I, expect[g][1])  # blocking may round the last bit differently
            np.testing.assert_allclose(Dg, expect[g][0], rtol=1e-6)
        health = SearchClient(svc.url).health()
        assert health["generation"] == 2 and health["shards_resident"] == health["shards"]
    finally:
        svc.stop()


def test_replicas_stay_on_distinct_workers_while_workers_are_killed_in_turn(data, tmp_path):
    """replicas=2 on a real scheduler and two nanny-managed worker processes, queries streaming:
    a worker is SIGKILLed, then (once its nanny restarted it) the other one. The scheduler
    recomputes the first lost copies on the survivor, next to their other copies; the service
    must spread them onto the restarted worker again, or the second kill takes every copy of
    every shard at once. No request fails, every answer equals local search."""
    from tests.proc_cluster import Scheduler, Workers, wait_until

    url = str(tmp_path / "kill.zarr")
    xq = data[1][:8]
    logs = tmp_path / "logs"
    logs.mkdir()
    scheduler = Scheduler(logs)
    workers = svc = None
    try:
        workers = Workers(scheduler.address, logs)
        c = workers.client
        distann.build(data[0], url, spec="IVF32,Flat", client=c, niter=4, shard_bytes=400_000)
        want = distann.open_index(url).search(xq, k=10, nprobe=8)
        svc = Service(make_holder(url, c, replicas=2), ServeSettings(batch_wait_ms=1.0))
        index = svc.holder.current
        n = len(index.manifest.shards)

        def spread():
            h = index.health()  # also where the service spreads co-located copies
            placement = index.placement()
            return h["copies_resident"] == 2 * n and all(len(w) == 2 for w in placement.values()) and placement

        assert n >= 3 and spread()
        answers, errors, stop = [], [], threading.Event()

        def stream():
            with SearchClient(svc.url, timeout=120) as sc:
                while not stop.is_set():
                    try:
                        answers.append(sc.search(xq, k=10, nprobe=8)[1])
                    except BaseException as exc:  # noqa: BLE001
                        errors.append(exc)

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            first, second = sorted(workers.pids().items())
            for victim, pid in (first, second):
                count = len(answers)
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: victim not in c.scheduler_info()["workers"], 60, f"{victim} gone")
                wait_until(lambda: len(c.scheduler_info()["workers"]) == 2, 120, "the nanny restarted it")
                placement = wait_until(spread, 60, "both copies of every shard on distinct workers again")
                assert victim not in {w for ws in placement.values() for w in ws}
                wait_until(lambda: len(answers) > count + 8, 60, "answers after the kill")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert len(answers) > 16
        for I in answers:
            np.testing.assert_array_equal(I, want[1])
    finally:
        if svc is not None:
            svc.stop()
        if workers is not None:
            workers.close()
        scheduler.close()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process ``pid`` and its children."""
    import psutil

    proc = psutil.Process(pid)
    out = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return out


def test_cli_serve_https_on_loopback_by_default_and_query(index_url, data, expected, tmp_path):
    """``distann serve`` with no --host, over TLS (a certificate made here): it and its embedded
    cluster (scheduler, dashboard, nanny, worker) listen on loopback only; ``distann query`` with
    the CA answers as local search, without it the certificate is refused."""
    trustme = pytest.importorskip("trustme")
    ca, cert = trustme.CA(), None
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))  # key and chain in one file
    port = free_port()
    env = {**os.environ, "DISTANN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "distann.cli", "serve", index_url, "--workers", "1",
                             "--port", str(port), "--batch-wait-ms", "1", "--tls-cert", str(tmp_path / "server.pem"),
                             "--tls-key", str(tmp_path / "server.pem")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", headers=_auth(), verify=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        listening = _listening(proc.pid)
        assert ("127.0.0.1", port) in listening
        assert len(listening) >= 4 and {ip for ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", headers=_auth())
        np.save(tmp_path / "q.npy", data[1])
        out = tmp_path / "r.npz"
        query = [sys.executable, "-m", "distann.cli", "query", url, str(tmp_path / "q.npy"), "--out", str(out),
                 "--k", "10", "--nprobe", "8"]
        run = subprocess.run([*query, "--tls-ca", str(tmp_path / "ca.pem")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(np.load(out)["I"], expected[1])
        untrusted = subprocess.run(query, env=env, capture_output=True, text=True, timeout=120)
        assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        denied = subprocess.run([*query, "--tls-ca", str(tmp_path / "ca.pem"), "--token", "wrong"],
                                capture_output=True, text=True, timeout=120)
        assert denied.returncode == 2 and "401" in denied.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent/idx.zarr"], "no committed index"),
    (["serve", "{index}", "--scheduler", "tcp://127.0.0.1:9"], "tcp://127.0.0.1:9"),
    (["serve", "{index}", "--port", "70000"], "--port"),
    (["serve", "{index}", "--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["serve", "{index}", "--tls-cert", "{index}/manifest.json"], "--tls-key"),
    (["serve", "{index}", "--tls-cert", "{tmp}/none.pem", "--tls-key", "{tmp}/none.pem"], "--tls-cert"),
    (["serve", "{index}", "--rate-limit", "lots"], "--rate-limit"),
    (["query", "https://127.0.0.1:9", "{index}", "--out", "{tmp}/r.npz", "--tls-ca", "{tmp}/none.pem"], "--tls-ca"),
    (["query", "https://127.0.0.1:9", "{index}", "--out", "{tmp}/r.npz", "--tls-ca", "{index}/manifest.json"],
     "--tls-ca"),  # a file, but no PEM
    (["query", "ftp://x", "{index}", "--out", "{tmp}/r.npz"], "URL"),
    (["query", "http://127.0.0.1:9", "{index}", "--out", "{tmp}/r.npz"], "running distann serve"),
])
def test_cli_bad_input_is_a_clear_error(args, message, index_url, tmp_path):
    argv = [a.format(index=index_url, tmp=tmp_path) for a in args]
    run = subprocess.run([sys.executable, "-m", "distann.cli", *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DASK_DISTANN__CLUSTER__CONNECT_TIMEOUT": "2"})
    assert run.returncode == 2, run.stderr
    assert message in run.stderr


def _metric(svc: Service, name: str, auth: bool = True) -> float:
    text = httpx.get(svc.url + "/metrics", headers=_auth() if auth else {}).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
