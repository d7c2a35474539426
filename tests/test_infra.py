"""Static checks of the deployment recipes in ``infra/``: no network, container engine or cluster.

No image is built and no Compose project or Kubernetes cluster runs here, so what can go wrong
without one is checked instead:

- Kubernetes built-in kinds (the search Deployment and Service, the example Secrets): every
  document against the Kubernetes OpenAPI schemas of version ``K8S_VERSION`` that ship inside
  the ``kubernetes-validate`` package, in strict mode (an unknown or misspelt field is an error,
  as with kubectl's default field validation).
- The ``DaskCluster`` custom resource: against the ``openAPIV3Schema`` of the operator's CRD as
  shipped in the installed ``dask-kubernetes`` package (the Helm chart's ``crds/daskcluster.yaml``),
  plus a walk for fields the schema does not declare (the API server would reject or prune them);
  the scheduler and worker pod specs and the scheduler Service spec it carries are also checked
  as a Pod and a Service with ``kubernetes-validate`` (the operator copies them into Deployments
  and a Service).
- Each validator is shown to be active: deliberately broken copies are rejected.
- References between files: the Service selects the Deployment's pods and targets its port, the
  search service's ``--scheduler`` is the Service the operator names ``<cluster>-scheduler``,
  every Secret name and key used exists in ``secret.example.yaml``, whose values are placeholders.
- ``infra/compose.yaml``: one image for every service, the commands, ports published on
  127.0.0.1 only, the shared ``/data`` volume, the token taken from the host environment.
- The command lines: ``dask scheduler`` / ``dask worker`` through distributed's own command
  definitions, ``distann build`` / ``distann serve`` through ``distann.cli.build_parser``.
- The health probe (Compose healthcheck, Kubernetes exec probes) run against a loopback HTTP
  server that requires the token.
- ``infra/docker/Dockerfile``: base image, non-root user, extras that exist, exposed ports.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"

#: Kubernetes version whose schemas the manifests are validated against (bundled in kubernetes-validate)
K8S_VERSION = "1.30.0"

BUILTIN_MANIFESTS = ["search-deployment.yaml", "search-service.yaml", "secret.example.yaml"]
HEALTH_URL = "http://127.0.0.1:8000/health"
#: what each probe asks: readiness waits for every shard to be resident, liveness only for an answer
PROBE_PATHS = {"compose healthcheck": "/health?ready=1", "startupProbe": "/health?ready=1",
               "readinessProbe": "/health?ready=1", "livenessProbe": "/health"}


# --------------------------------------------------------------------------- loading

def load_all(name: str) -> list[dict]:
    with open(K8S / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(name: str) -> dict:
    (doc,) = load_all(name)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(INFRA / "compose.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load_one("search-deployment.yaml")


@pytest.fixture(scope="module")
def service() -> dict:
    return load_one("search-service.yaml")


@pytest.fixture(scope="module")
def daskcluster() -> dict:
    return load_one("daskcluster.yaml")


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in load_all("secret.example.yaml")}


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    """``openAPIV3Schema`` of the DaskCluster CRD shipped in the installed dask-kubernetes."""
    dist = importlib.metadata.distribution("dask-kubernetes")
    paths = [p for p in dist.files or [] if str(p).endswith("crds/daskcluster.yaml")]
    assert paths, "dask-kubernetes ships no crds/daskcluster.yaml (the Helm chart's CRD)"
    with open(dist.locate_file(paths[0])) as f:
        crd = yaml.safe_load(f)
    assert crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def serve_argv(deployment: dict) -> list[str]:
    """The search container's command line, ``$(POD_NAMESPACE)`` expanded as the kubelet would."""
    c = container(deployment)
    env = {e["name"] for e in c["env"]}
    argv = [a.replace("$(POD_NAMESPACE)", "default") for a in c.get("command", []) + c["args"]]
    assert all("$(" not in a for a in argv), f"unexpanded variable in {argv}"
    assert "POD_NAMESPACE" in env
    return argv


def option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} given {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# --------------------------------------------------------------------------- Kubernetes: built-in kinds

@pytest.mark.parametrize("name", BUILTIN_MANIFESTS)
def test_builtin_manifests_match_kubernetes_schemas(name):
    docs = load_all(name)
    assert docs
    for doc in docs:
        version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert version == "1.30"


def test_schemas_ship_with_kubernetes_validate():
    """The schemas are package data (no download at test time) and K8S_VERSION is among them."""
    assert Version(kubernetes_validate.latest_version()) >= Version(K8S_VERSION)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "NoSuchKind"}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["replicas as a string", "misspelt field", "port as a string"])
def test_broken_deployment_is_rejected(deployment, breakage):
    broken = copy.deepcopy(deployment)
    if breakage == "replicas as a string":
        broken["spec"]["replicas"] = "1"
    elif breakage == "misspelt field":
        container(broken)["imagePulPolicy"] = container(broken).pop("imagePullPolicy")
    else:
        container(broken)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- Kubernetes: the DaskCluster

def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths of mapping keys the structural schema does not declare (jsonschema allows them)."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += undeclared_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += undeclared_fields(item, extra, f"{path}.{key}")
            elif props is not None and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return found


def crd_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{p}: not in the CRD schema" for p in undeclared_fields(doc, schema)]


def test_daskcluster_matches_operator_crd(daskcluster, crd_schema):
    assert daskcluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert daskcluster["kind"] == "DaskCluster"
    assert crd_errors(daskcluster, crd_schema) == []


@pytest.mark.parametrize("breakage", ["replicas as a string", "integer targetPort", "misspelt field",
                                      "no scheduler service"])
def test_broken_daskcluster_is_rejected(daskcluster, crd_schema, breakage):
    broken = copy.deepcopy(daskcluster)
    spec = broken["spec"]
    if breakage == "replicas as a string":
        spec["worker"]["replicas"] = "2"
    elif breakage == "integer targetPort":  # the CRD types targetPort as a string
        spec["scheduler"]["service"]["ports"][0]["targetPort"] = 8786
    elif breakage == "misspelt field":
        spec["workers"] = spec.pop("worker")
    else:
        del spec["scheduler"]["service"]
    assert crd_errors(broken, crd_schema)


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_pod_specs_are_valid_pods(daskcluster, role):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"distann-{role}"},
           "spec": daskcluster["spec"][role]["spec"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_daskcluster_scheduler_service_is_a_valid_service(daskcluster):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "distann-scheduler"},
           "spec": daskcluster["spec"]["scheduler"]["service"]}
    kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


def test_daskcluster_layout(daskcluster):
    name = daskcluster["metadata"]["name"]
    worker, scheduler = daskcluster["spec"]["worker"], daskcluster["spec"]["scheduler"]
    assert worker["replicas"] == 2
    (w,) = worker["spec"]["containers"]
    assert w["args"][:2] == ["dask", "worker"]
    assert option(w["args"], "--name") == "$(DASK_WORKER_NAME)"   # set by the operator
    assert option(w["args"], "--nthreads") == "1"
    assert {e["name"]: e["value"] for e in w["env"]} == {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    (s,) = scheduler["spec"]["containers"]
    assert s["args"][:2] == ["dask", "scheduler"]
    assert {p["name"]: p["containerPort"] for p in s["ports"]} == {"tcp-comm": 8786, "http-dashboard": 8787}
    svc = scheduler["service"]
    assert svc["type"] == "ClusterIP"                               # never outside the cluster
    assert svc["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["ports"]} == {
        "tcp-comm": (8786, "tcp-comm"), "http-dashboard": (8787, "http-dashboard")}
    for c in (w, s):
        assert c["image"] == "distann:latest"


# --------------------------------------------------------------------------- Kubernetes: references

def test_search_deployment(deployment, daskcluster):
    argv = serve_argv(deployment)
    assert argv[:2] == ["distann", "serve"]
    assert argv[2].startswith("s3://")
    # the operator names the scheduler's Service <cluster name>-scheduler
    assert option(argv, "--scheduler") == \
        f"tcp://{daskcluster['metadata']['name']}-scheduler.default.svc.cluster.local:8786"
    assert option(argv, "--host") == "0.0.0.0"
    assert option(argv, "--replicas") == "2"
    c = container(deployment)
    assert [p["containerPort"] for p in c["ports"]] == [int(option(argv, "--port"))]
    assert c["image"] == daskcluster["spec"]["worker"]["spec"]["containers"][0]["image"]
    token = [e for e in c["env"] if e["name"] == "DISTANN_TOKEN"]
    assert token and "secretKeyRef" in token[0]["valueFrom"] and "value" not in token[0]
    assert set(c["resources"]) == {"requests", "limits"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert HEALTH_URL in " ".join(c[probe]["exec"]["command"])
    template = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template.items()


def test_service_selects_the_search_pods(service, deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert port["port"] == 8000 and named[port["targetPort"]] == 8000


def secret_uses(doc) -> list[tuple[str, str | None]]:
    """(Secret name, key or None for every key) of each secretRef / secretKeyRef in a manifest."""
    found = []
    if isinstance(doc, dict):
        if "secretKeyRef" in doc:
            found.append((doc["secretKeyRef"]["name"], doc["secretKeyRef"]["key"]))
        if "secretRef" in doc:
            found.append((doc["secretRef"]["name"], None))
        for value in doc.values():
            found += secret_uses(value)
    elif isinstance(doc, list):
        for value in doc:
            found += secret_uses(value)
    return found


def test_referenced_secrets_exist_in_the_example(deployment, daskcluster, secrets):
    uses = secret_uses(deployment) + secret_uses(daskcluster)
    assert ("distann-search", "token") in uses
    for name, key in uses:
        assert name in secrets, f"Secret {name} is used but not in secret.example.yaml"
        if key is not None:
            assert key in secrets[name]["stringData"]


def test_example_secrets_hold_placeholders_only(secrets):
    for secret in secrets.values():
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            if key != "AWS_DEFAULT_REGION":
                assert "REPLACE-ME" in value, f"{secret['metadata']['name']}.{key} looks like a real value"


def test_every_manifest_is_validated_here():
    """A new file in infra/k8s/ needs its checks here (the hand-rolled dask-cluster.yaml is gone)."""
    assert {p.name for p in K8S.iterdir()} == set(BUILTIN_MANIFESTS) | {"daskcluster.yaml"}


# --------------------------------------------------------------------------- Compose

def test_compose_services_share_one_image(compose):
    assert set(compose["services"]) == {"scheduler", "worker", "search", "build"}
    for name, svc in compose["services"].items():
        assert svc["image"] == "distann:latest", name
        assert (INFRA / svc["build"]["context"]).resolve() == ROOT, name
        assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile", name
    assert (ROOT / "infra/docker/Dockerfile").is_file()


def test_compose_commands(compose):
    services = compose["services"]
    assert services["scheduler"]["command"] == ["dask", "scheduler", "--host", "0.0.0.0"]
    worker = services["worker"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert option(worker["command"], "--nthreads") == "1"
    assert worker["deploy"]["replicas"] == 2
    assert worker["environment"] == {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    search = services["search"]["command"]
    assert search[:3] == ["distann", "serve", "/data/index"]
    assert option(search, "--scheduler") == "tcp://scheduler:8786"
    assert option(search, "--host") == "0.0.0.0" and option(search, "--port") == "8000"
    build = services["build"]
    assert build["profiles"] == ["build"]
    assert build["command"][:4] == ["distann", "build", "/data/vectors.npy", search[2]]  # the index it serves
    assert option(build["command"], "--scheduler") == "tcp://scheduler:8786"


def test_compose_publishes_on_loopback_only(compose):
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port}"
            published[name] = published.get(name, []) + [port]
    assert published == {"scheduler": ["127.0.0.1:8787:8787"], "search": ["127.0.0.1:8000:8000"]}


def test_compose_data_volume_is_shared(compose):
    assert "data" in compose["volumes"]  # a named volume, not a host path
    for name in ("worker", "search", "build"):
        assert "data:/data" in compose["services"][name]["volumes"], name
    assert "volumes" not in compose["services"]["scheduler"]  # the scheduler reads no data


def test_compose_token_from_host_environment(compose):
    env = compose["services"]["search"]["environment"]
    assert re.fullmatch(r"\$\{DISTANN_TOKEN:\?[^}]+\}", env["DISTANN_TOKEN"])
    assert "--token" not in compose["services"]["search"]["command"]  # not visible in `ps`
    health = compose["services"]["search"]["healthcheck"]["test"]
    assert health[0] == "CMD" and HEALTH_URL in health[-1] and "DISTANN_TOKEN" in health[-1]


# --------------------------------------------------------------------------- command lines

def dask_command(argv: list[str]):
    """Parse ``dask scheduler|worker ARGS`` with distributed's own click command, without running it."""
    assert argv[0] == "dask"
    (entry,) = [e for e in importlib.metadata.entry_points(group="dask_cli") if e.name == argv[1]]
    return entry.load().make_context(f"dask {argv[1]}", list(argv[2:])).params


def test_dask_command_lines_parse(compose, daskcluster):
    sched = dask_command(compose["services"]["scheduler"]["command"])
    assert sched["host"] == "0.0.0.0" and sched["preload_argv"] == ()
    worker = dask_command(compose["services"]["worker"]["command"])
    assert (worker["scheduler"], worker["nthreads"], worker["memory_limit"]) == ("tcp://scheduler:8786", 1, "4GiB")
    assert int(worker["n_workers"]) == 1 and worker["preload_argv"] == ()  # unknown options land there
    (w,) = daskcluster["spec"]["worker"]["spec"]["containers"]
    worker = dask_command([a.replace("$(DASK_WORKER_NAME)", "distann-default-worker-0") for a in w["args"]])
    assert (worker["nthreads"], worker["dashboard_address"], worker["preload_argv"]) == (1, "8788", ())
    assert worker["scheduler"] is None  # taken from DASK_SCHEDULER_ADDRESS, set by the operator
    (s,) = daskcluster["spec"]["scheduler"]["spec"]["containers"]
    assert dask_command(s["args"])["preload_argv"] == ()


def test_dask_command_parser_rejects_bad_values():
    with pytest.raises(click.BadParameter, match="integer"):
        dask_command(["dask", "worker", "tcp://scheduler:8786", "--nthreads", "one"])
    with pytest.raises(click.NoSuchOption):
        dask_command(["dask", "worker", "tcp://scheduler:8786", "--nthread", "1"])
    # without a scheduler address, a stray option would be taken for one: hence `scheduler is None` above
    assert dask_command(["dask", "worker", "--nthread"])["scheduler"] == "--nthread"


def distann_parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "distann"
    from distann.cli import build_parser

    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"distann's parser rejects {shlex.join(argv)}")


def subcommands() -> set[str]:
    from distann.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_build_command_line_parses(compose):
    ns = distann_parse(compose["services"]["build"]["command"])
    assert (ns.command, ns.index, ns.spec, ns.scheduler) == ("build", "/data/index", "IVF1024,Flat",
                                                             "tcp://scheduler:8786")


def test_serve_command_lines_parse(compose, deployment):
    assert {"serve", "query"} <= subcommands()
    for argv in (compose["services"]["search"]["command"], serve_argv(deployment)):
        ns = distann_parse(argv)
        assert ns.command == "serve"
        assert ns.scheduler == option(argv, "--scheduler")
        assert (ns.host, int(ns.port), int(ns.replicas)) == ("0.0.0.0", 8000, 2)


def test_readme_distann_commands_parse():
    """The ``distann ...`` lines of infra/README.md's code blocks are accepted by the parser."""
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines if line.startswith("distann ")]
    assert {argv[1] for argv in commands} >= {"query"}
    for argv in commands:
        ns = distann_parse(argv)
        if ns.command == "query":
            assert ns.url == "http://127.0.0.1:8000" and ns.token


# --------------------------------------------------------------------------- health probe

@pytest.fixture
def health_server():
    """A loopback HTTP server whose /health answers 200 only with ``Authorization: Bearer s3cret``
    (like ``distann serve --token s3cret``), recording the path and header of each request."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.path.startswith("/health") and self.headers.get("Authorization") == "Bearer s3cret"
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def probe_commands(compose, deployment) -> dict[str, list[str]]:
    probes = {"compose healthcheck": compose["services"]["search"]["healthcheck"]["test"][1:]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        probes[probe] = container(deployment)[probe]["exec"]["command"]
    return probes


def test_health_probes_send_the_token(compose, deployment, health_server):
    url, seen = health_server
    for name, argv in probe_commands(compose, deployment).items():
        assert argv[0] == "python", name
        assert HEALTH_URL in argv[-1], name
        cmd = [sys.executable] + [a.replace("http://127.0.0.1:8000", url) for a in argv[1:]]
        for token, healthy in (("s3cret", True), ("wrong", False)):
            seen.clear()
            env = {**os.environ, "DISTANN_TOKEN": token}
            rc = subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=30).returncode
            assert (rc == 0) == healthy, f"{name} with token {token!r}: exit status {rc}"
            assert seen == [(PROBE_PATHS[name], f"Bearer {token}")], name


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "docker/Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile():
    inst = dockerfile_instructions()
    assert inst[0] == ("FROM", "python:3.11-slim")
    assert [v for k, v in inst if k == "FROM"] == ["python:3.11-slim"]  # one stage, one image
    users = [v for k, v in inst if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert {p for k, v in inst if k == "EXPOSE" for p in v.split()} >= {"8786", "8787", "8000"}
    assert [v for k, v in inst if k == "CMD"] == ['["distann", "--help"]']
    assert not [k for k, _ in inst if k == "ENTRYPOINT"]  # `dask ...` and `distann ...` both run as given
    copied = {v.split()[0] for k, v in inst if k == "COPY"}
    assert {"pyproject.toml", "distann"} <= copied


def test_dockerfile_extras_exist():
    inst = dockerfile_instructions()
    (extras,) = [v.split("=", 1)[1] for k, v in inst if k == "ARG" and v.startswith("EXTRAS=")]
    assert any(k == "RUN" and 'pip install' in v and '".[${EXTRAS}]"' in v for k, v in inst)
    assert set(extras.split(",")) == {"serve", "s3"}
    with open(ROOT / "pyproject.toml", "rb") as f:
        known = set(tomllib.load(f)["project"]["optional-dependencies"])
    assert {"serve", "s3"} <= known
