"""deploy/compose.ha.yaml, the HA profile (a replica and three Sentinels beside compose.yaml's Redis):
the override against the compose-spec schema and the rules every compose service keeps, its Redis
settings agreeing with compose.yaml's and with the service's, and its two scripts
(deploy/redis-ha/node.sh, sentinel.sh) run for real on loopback: a master killed with -9 is
replaced by the replica, and comes back through node.sh as the new master's replica. And the
Kubernetes pods wait for as many replicas as the bundled single Redis has: none."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml
from testkit.paths import ROOT
from testkit.redis_ha import wait_until

from strokes.service.cli.serve import free_port
from strokes.service.queue.client import RedisMode, parse_redis_url
from strokes.service.shared.settings import Settings

DEPLOY = ROOT / "deploy"
COMPOSE, COMPOSE_HA = DEPLOY / "compose.yaml", DEPLOY / "compose.ha.yaml"
NODE_SH, SENTINEL_SH = DEPLOY / "redis-ha" / "node.sh", DEPLOY / "redis-ha" / "sentinel.sh"
BIN = Path(sys.executable).parent
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_ha_override_matches_the_compose_schema_and_keeps_the_compose_rules():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_HA)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    base, ha = _load(COMPOSE)["services"], _load(COMPOSE_HA)["services"]
    assert set(ha) == {"redis", "redis-replica", *SENTINELS, "api", "worker"}
    for name, service in ha.items():
        merged_health = service.get("healthcheck") or base.get(name, {}).get("healthcheck")
        assert merged_health and merged_health["test"][0] in ("CMD", "CMD-SHELL"), (
            f"{name} has no healthcheck"
        )
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in ha or dep in base, f"{name} depends on unknown {dep}"
            assert spec == {"condition": "service_healthy"}, (name, dep)
    for name in ("api", "worker"):
        assert set(ha[name]["depends_on"]) == set(SENTINELS)  # besides compose.yaml's redis
    text = COMPOSE_HA.read_text()
    for var, op, message in re.findall(r"\$\{([A-Z0-9_]+)(:?[-?+]?)([^}]*)\}", text):
        if var == "REDIS_PASSWORD":
            assert op == ":?" and message.strip(), "the password must stop `up` when missing"


def test_the_replica_runs_with_the_masters_flags_and_the_nodes_enforce_what_the_service_waits_for():
    base, doc = _load(COMPOSE), _load(COMPOSE_HA)
    ha = doc["services"]
    assert ha["redis-replica"]["command"] == base["services"]["redis"]["command"]  # it may become the master
    assert ha["redis-replica"]["image"] == base["services"]["redis"]["image"]
    for name in ("redis", "redis-replica"):
        assert ha[name]["entrypoint"] == ["/bin/sh", "/ha/node.sh", "docker-entrypoint.sh"]
        assert "./redis-ha:/ha:ro" in ha[name]["volumes"]
        assert ha[name]["environment"]["NODE_NAME"] == name
    assert ha["redis-replica"]["environment"]["INITIAL_MASTER_HOST"] == "redis"
    # min-replicas-to-write on the nodes is the count the service waits for
    nodes_min = ha["redis"]["environment"]["MIN_REPLICAS"]
    for name in ("api", "worker"):
        env = ha[name]["environment"]
        assert env["STROKES_REDIS_MIN_REPLICAS"] == nodes_min == "${REDIS_MIN_REPLICAS:-1}"
        fields = set(Settings.model_fields)
        assert {k.removeprefix("STROKES_").lower() for k in env} <= fields
        url = env["STROKES_REDIS_URL"].replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw")
        target = parse_redis_url(url)
        assert (
            target.mode == RedisMode.sentinel
            and target.master_name == ha["redis"]["environment"]["MASTER_NAME"]
        )
        assert [h for h, _ in target.nodes] == list(SENTINELS) and target.sentinel_password == "pw"
    sentinels = ha["redis"]["environment"]["SENTINELS"].split()
    assert sentinels == [f"{name}:26379" for name in SENTINELS]
    for name in SENTINELS:
        env = ha[name]["environment"]
        assert env["ANNOUNCE_NAME"] == name and env["SENTINEL_PORT"] == "26379"
        assert f"{name}-data:/data" in ha[name]["volumes"] and env["CONFIG"].startswith("/data/")
        assert int(env["QUORUM"]) == len(SENTINELS) // 2 + 1
    assert {f"{name}-data" for name in SENTINELS} | {"redis-replica-data"} <= set(doc["volumes"])


@pytest.mark.slow
def test_the_scripts_bring_a_killed_master_back_as_the_new_masters_replica(tmp_path):
    assert shutil.which("redis-server") and shutil.which("redis-cli")
    password = "s3cret"
    nodes = {"a": free_port(), "b": free_port()}
    sentinels = [free_port() for _ in range(3)]
    common = {
        "PATH": os.environ["PATH"],
        "REDIS_PASSWORD": password,
        "REDISCLI_AUTH": password,
        "MASTER_NAME": "strokes",
        "SENTINELS": " ".join(f"127.0.0.1:{p}" for p in sentinels),
        "INITIAL_MASTER_HOST": "127.0.0.1",
        "INITIAL_MASTER_PORT": str(nodes["a"]),
        "MIN_REPLICAS": "1",
    }
    procs: dict[str, subprocess.Popen] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def node(name: str) -> None:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
        args += ["--dir", str(folder), "--requirepass", password, "--repl-diskless-sync-delay", "0"]
        env = {**common, "NODE_NAME": "127.0.0.1", "NODE_PORT": str(nodes[name])}
        with open(logs / f"{name}.log", "ab") as out:
            procs[name] = subprocess.Popen(["sh", str(NODE_SH), *args], env=env, stdout=out, stderr=out)

    def client(port: int) -> redis.Redis:
        return redis.Redis(port=port, password=password, socket_timeout=2, socket_connect_timeout=1)

    def role(name: str) -> dict:
        with client(nodes[name]) as c:
            return c.info("replication")

    def named(port: int) -> str:
        with client(port) as c:
            host, master_port = c.sentinel_get_master_addr_by_name("strokes")
            return f"{host.decode() if isinstance(host, bytes) else host}:{master_port}"

    try:
        node("a")  # no Sentinel answers: the initial master
        wait_until(lambda: role("a")["role"] == "master", 10, "a as the master")
        node("b")  # no Sentinel answers: a's replica
        wait_until(lambda: role("b").get("master_link_status") == "up", 10, "b replicating a")
        for i, port in enumerate(sentinels):
            env = {
                **common,
                "CONFIG": str(tmp_path / f"sentinel{i}" / "sentinel.conf"),
                "SENTINEL_PORT": str(port),
                "ANNOUNCE_NAME": "127.0.0.1",
                "BIND": "127.0.0.1",
                "QUORUM": "2",
                "DOWN_AFTER_MS": "1000",
                "FAILOVER_TIMEOUT_MS": "3000",
            }
            with open(logs / f"sentinel{i}.log", "ab") as out:
                procs[f"s{i}"] = subprocess.Popen(
                    ["sh", str(SENTINEL_SH), "redis-server"], env=env, stdout=out, stderr=out
                )

        def watching() -> bool:
            for port in sentinels:
                with client(port) as c:
                    state = c.sentinel_master("strokes")
                    replicas = c.sentinel_slaves("strokes")
                if state["num-other-sentinels"] < 2 or not replicas or replicas[0]["is_sdown"]:
                    return False
            return True

        wait_until(watching, 30, "the Sentinels to know each other and the replica", interval=0.1)
        with client(nodes["b"]) as c:
            assert c.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}

        procs["a"].send_signal(signal.SIGKILL)  # kill -9 of the master
        procs["a"].wait()
        promoted = f"127.0.0.1:{nodes['b']}"
        wait_until(lambda: all(named(p) == promoted for p in sentinels), 30, "the Sentinels to promote b")
        wait_until(lambda: role("b")["role"] == "master", 10, "b as the master")

        node("a")  # what `restart: unless-stopped` does: node.sh asks the Sentinels first
        wait_until(
            lambda: (
                role("a").get("master_port") == nodes["b"] and role("a").get("master_link_status") == "up"
            ),
            30,
            "a back as b's replica",
        )
        assert f"starts as the replica of {promoted}" in (logs / "a.log").read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_kubernetes_pods_wait_for_as_many_replicas_as_the_bundled_redis_has():
    """redis.yaml is one instance: no replica to wait for, and no min-replicas-to-write on it."""
    for name in ("api.yaml", "worker.yaml"):
        doc = next(
            d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d["kind"] == "Deployment"
        )
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["STROKES_REDIS_MIN_REPLICAS"] == "0", name
    redis_doc = next(
        d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text())
        if d["kind"] == "StatefulSet"
    )
    assert redis_doc["spec"]["replicas"] == 1
    args = redis_doc["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--min-replicas-to-write" not in args and "--replicaof" not in args
