"""Redis topologies on loopback for the failover and cluster tests: servers (a master and its
replicas, with AOF like the service's own), Redis Sentinel (`redis-server --sentinel`) watching
them, and a Redis Cluster made by `redis-cli --cluster create`. Every wait is on a condition the
servers report (a replica's link up, the Sentinels knowing each other, a new master named), never
on a sleep. Each process is stopped by `stop()`; the fixtures that make them call it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from strokes.service.cli.serve import free_port

MASTER_NAME = "strokes"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `predicate` (Redis errors count as "not yet") until it returns something true."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (redis.RedisError, OSError) as exc:
            value, last = None, exc
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Server:
    """A redis-server child on a free loopback port: AOF fsynced every second, no eviction (as
    `strokes serve`'s private Redis), plus `options` (replicaof, min-replicas-to-write, ...)."""

    def __init__(self, folder: Path, options: dict[str, str] | None = None, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "dir": str(folder),
            "maxmemory-policy": "noeviction",
            "repl-diskless-sync-delay": "0",  # a replica syncs at once (the default waits 5 s for others)
            **(options or {}),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def start(self, extra_args: list[str] | None = None) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [arg for name, value in self.options.items() for arg in (f"--{name}", value)]
        self.proc = subprocess.Popen(
            [exe, *args, *(extra_args or [])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.ping, 10, f"redis-server on {self.port}")

    def ping(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"redis-server on {self.port} is not running")
        with self.client() as client:
            return bool(client.ping())

    def info(self, section: str) -> dict:
        with self.client() as client:
            return client.info(section)

    def cluster_ok(self) -> bool:
        with self.client() as client:
            return client.cluster("info")["cluster_state"] == "ok"

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing (a replica that lags)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: no shutdown, no last fsync."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Sentinel:
    """One `redis-server --sentinel` watching MASTER_NAME, with short timeouts (a master silent for
    `down_after_ms` is down; a failover is retried after `failover_timeout_ms`)."""

    def __init__(
        self, folder: Path, master: Server, quorum: int, down_after_ms: int, failover_timeout_ms: int
    ):
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "sentinel.conf"  # Sentinel rewrites it: its own file
        self.config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {folder}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} {quorum}",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
                    f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [exe, str(self.config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.ping, 10, f"sentinel on {self.port}")

    def ping(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def master(self) -> dict:
        with self.client() as client:
            return client.sentinel_master(MASTER_NAME)

    def replicas(self) -> list[dict]:
        with self.client() as client:
            return client.sentinel_slaves(MASTER_NAME)

    def master_address(self) -> str:
        state = self.master()
        return f"{state['ip']}:{state['port']}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class SentinelRedis:
    """A master, `replicas` replicas and `sentinels` Sentinels on loopback, started and ready: the
    replicas' links up, every Sentinel knowing the replicas and the other Sentinels (so that a
    failover can be voted). `options` go to every server (a replica may become the master).
    With sentinels=0 it is a master and its replicas alone."""

    def __init__(
        self,
        folder: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        options: dict[str, str] | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ):
        self.master = Server(folder / "node0", options)
        self.servers = [self.master]
        self.servers += [
            Server(folder / f"node{i + 1}", {**(options or {}), "replicaof": f"127.0.0.1 {self.master.port}"})
            for i in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            Sentinel(folder / f"sentinel{i}", self.master, quorum, down_after_ms, failover_timeout_ms)
            for i in range(sentinels)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelRedis:
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_settled(self.master)
        return self

    def server_at(self, address: str) -> Server:
        return next(s for s in self.servers if s.address == address)

    def current_master(self) -> Server:
        """The server every running Sentinel names as the master (they agree)."""
        named = {s.master_address() for s in self.sentinels if s.proc is not None}
        assert len(named) == 1, f"the Sentinels disagree: {named}"
        return self.server_at(named.pop())

    def wait_settled(self, master: Server, timeout: float = 30) -> None:
        """Until `master` is the master every Sentinel names, each of the other running servers is
        its replica with the link up, and every Sentinel knows them and the other Sentinels."""
        replicas = [s for s in self.servers if s is not master and s.proc is not None]

        def settled() -> bool:
            info = master.info("replication")
            if info["role"] != "master" or info["connected_slaves"] < len(replicas):
                return False
            if any(info[f"slave{i}"]["state"] != "online" for i in range(info["connected_slaves"])):
                return False
            with master.client() as client:  # and they acknowledge at once (no sync still settling)
                if replicas and client.execute_command("WAIT", len(replicas), 100) < len(replicas):
                    return False
            for replica in replicas:
                # a replica rewrites its AOF after a sync, and may stall its acknowledgements then
                persistence = replica.info("persistence")
                if persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]:
                    return False
                info = replica.info("replication")
                if info.get("master_port") != master.port or info.get("master_link_status") != "up":
                    return False
            for sentinel in self.sentinels:
                state = sentinel.master()
                if (
                    f"{state['ip']}:{state['port']}" != master.address
                    or state["is_odown"]
                    or state["is_sdown"]
                ):
                    return False
                if state["num-other-sentinels"] < len(self.sentinels) - 1:
                    return False
                known = sentinel.replicas()
                good = {f"{r['ip']}:{r['port']}" for r in known if not (r["is_sdown"] or r["is_odown"])}
                if not {r.address for r in replicas} <= good:
                    return False
            return True

        wait_until(settled, timeout, f"the Sentinels to settle on {master.address}", interval=0.1)

    def wait_caught_up(self, master: Server | None = None, timeout: float = 10) -> None:
        """Until every running replica has applied everything `master` (the first one) has written."""
        master = master or self.master
        replicas = [s for s in self.servers if s is not master and s.proc is not None]

        def caught_up() -> bool:
            offset = master.info("replication")["master_repl_offset"]
            return all(r.info("replication")["slave_repl_offset"] >= offset for r in replicas)

        wait_until(caught_up, timeout, "the replicas to catch up")

    def wait_new_master(self, old: Server, timeout: float = 30) -> Server:
        """Until every Sentinel names a master other than `old`: that server."""

        def moved() -> Server | None:
            named = {s.master_address() for s in self.sentinels}
            if len(named) == 1 and old.address not in named:
                server = self.server_at(named.pop())
                return server if server.info("replication")["role"] == "master" else None
            return None

        return wait_until(moved, timeout, f"a master other than {old.address}", interval=0.05)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import socket

    for _ in range(1000):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterRedis:
    """A Redis Cluster of `nodes` masters (no replicas) on loopback, its slots assigned by
    `redis-cli --cluster create`."""

    def __init__(self, folder: Path, nodes: int = 3):
        self.servers = [
            Server(
                folder / f"cluster{i}",
                {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": "2000",
                    "appendonly": "no",  # the cluster test is about key routing, not durability
                },
                port=cluster_port(),
            )
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(s.address for s in self.servers)

    def start(self) -> ClusterRedis:
        for server in self.servers:
            server.start()
        exe = shutil.which("redis-cli")
        assert exe, "redis-cli is not installed"
        subprocess.run(
            [exe, "--cluster", "create", *(s.address for s in self.servers), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        wait_until(
            lambda: all(s.cluster_ok() for s in self.servers), 30, "the cluster to be ok on every node"
        )
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
