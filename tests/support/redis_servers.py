"""Private Redis deployments for the tests: a three-node Redis Cluster, and a master with a replica watched by a
Sentinel.

Real `redis-server` processes (a sentinel is `redis-server sentinel.conf --sentinel`) on ports the OS reports free,
without persistence, in a temporary directory of their own; every wait polls with a deadline (`eventually`), none
sleeps. Used by tests/quotas/store/ (docs/quotas.md, "Redis Cluster" and "Redis Sentinel").
"""

import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.servers import free_port
from tests.support.gateways import eventually

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"
MASTER_NAME = "mymaster"


def available() -> bool:
    """Whether redis-server and redis-cli are installed (the tests that need them skip otherwise, outside CI)."""
    return os.access(REDIS_SERVER, os.X_OK) and os.access(REDIS_CLI, os.X_OK)


def quick_client(port) -> redis.Redis:
    """A client that gives up quickly: the helpers poll, so one slow answer must not eat the deadline."""
    return redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def ask(port, call):
    """`call(client)` on the server on `port`; None if it does not answer."""
    client = quick_client(port)
    try:
        return call(client)
    except redis.RedisError:
        return None
    finally:
        client.close()


class RedisProcess:
    """One redis-server (or sentinel) process; its log is kept in `directory` for a failing test to show."""

    def __init__(self, directory, name, port=None):
        self.directory = Path(directory)
        self.name = name
        self.port = port or free_port()
        self.process = None
        self.log = self.directory / f"{name}.log"

    def start(self, *arguments):
        self.process = subprocess.Popen(
            [REDIS_SERVER, *arguments, "--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
             "--logfile", str(self.log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(self.answers, timeout=10)

    def answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
        return ask(self.port, lambda c: c.ping()) is True

    def tail(self, lines=30):
        return "\n".join(self.log.read_text().splitlines()[-lines:]) if self.log.exists() else ""

    def info(self, section):
        return ask(self.port, lambda c: c.info(section)) or {}

    def kill(self):
        """SIGKILL, like a crash: nothing is written, every connection is closed by the kernel."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self):
        self.kill()


def data_node_arguments(*extra):
    """A data node without persistence (nothing survives a kill: the tests count on what replication kept)."""
    return ["--save", "", "--appendonly", "no", *extra]


class Cluster:
    """Three masters, no replicas, the 16,384 slots split between them by `redis-cli --cluster create`."""

    def __init__(self, directory, size=3):
        self.nodes = [RedisProcess(directory, f"cluster-{i}") for i in range(size)]

    @property
    def url(self):
        """A node of the cluster, as an operator names it in REDIS_URL (with REDIS_CLUSTER=1)."""
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    def start(self):
        for node in self.nodes:
            # The cluster bus on a port of its own (the default, port + 10000, may be taken or out of range).
            node.start(*data_node_arguments("--cluster-enabled", "yes", "--cluster-config-file",
                                            f"nodes-{node.port}.conf", "--cluster-port", str(free_port()),
                                            "--cluster-node-timeout", "2000"))
        create = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert create.returncode == 0, create.stdout + create.stderr
        eventually(self.ready, timeout=20)

    def ready(self):
        """Every node says cluster_state:ok and knows all the others."""
        for node in self.nodes:
            state = ask(node.port, lambda c: c.execute_command("CLUSTER INFO")) or {}
            if state.get("cluster_state") != "ok" or int(state.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
        return True

    def owner(self, slot):
        """The node that serves `slot`."""
        for start, end, (host, port, *_), *_ in ask(self.nodes[0].port, lambda c: c.execute_command("CLUSTER SLOTS")):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == port)
        raise AssertionError(f"slot {slot} is not served")

    def move_slot(self, slot, target):
        """Move `slot` and its keys to `target`, as a resharding does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE):
        afterwards the old owner answers MOVED for it."""
        source = self.owner(slot)
        source_id, target_id = (ask(n.port, lambda c: c.execute_command("CLUSTER MYID")) for n in (source, target))
        assert ask(target.port, lambda c: c.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id))
        assert ask(source.port, lambda c: c.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id))
        keys = ask(source.port, lambda c: c.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000))
        if keys:
            assert ask(source.port, lambda c: c.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS",
                                                                  *keys))
        for node in self.nodes:
            assert ask(node.port, lambda c: c.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id))
        eventually(lambda: self.ready() and self.owner(slot) is target, timeout=10)

    def flush(self):
        """Empty every node (each keeps its cache of loaded scripts)."""
        for node in self.nodes:
            assert ask(node.port, lambda c: c.flushall()) is True

    def stop(self):
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, its replica, and one Sentinel (quorum 1) that fails over within seconds of the master's death: the
    smallest real setup in which the master's address changes under the store.

    `down_after_ms` not much shorter: after the switch the sentinel's own link to the new master takes up to about a
    second to come up, and with a shorter limit it declared the new master down as well (300 ms: it did, for half a
    second, in which clients were told there was no master)."""

    def __init__(self, directory, down_after_ms=1500, failover_timeout_ms=3000):
        self.directory = Path(directory)
        self.master = RedisProcess(directory, "master")
        self.replica = RedisProcess(directory, "replica")
        self.sentinel = RedisProcess(directory, "sentinel")
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def url(self):
        """REDIS_URL with REDIS_SENTINELS: the host names the master group (django-redis's convention)."""
        return f"redis://{MASTER_NAME}/0"

    @property
    def sentinels(self):
        return [(HOST, self.sentinel.port)]

    @property
    def sentinels_setting(self):
        """REDIS_SENTINELS as an operator writes it."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinels)

    def start(self):
        # The replica's first sync at once (a diskless sync waits 5 s for more replicas by default).
        self.master.start(*data_node_arguments("--repl-diskless-sync-delay", "0"))
        self.replica.start(*data_node_arguments("--replicaof", HOST, str(self.master.port)))
        eventually(self.replicating, timeout=10)
        # Started once the replica is online: the sentinel's first INFO of the master then lists it (it would learn
        # of a later one only at its next INFO, up to 10 s on).
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join([
            f"sentinel monitor {MASTER_NAME} {HOST} {self.master.port} 1",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
        self.sentinel.start(str(config), "--sentinel")
        eventually(self.watching, timeout=10)

    def replicating(self):
        """The replica is online and has everything the master wrote."""
        master = self.master.info("replication")
        replica = self.replica.info("replication")
        online = master.get("connected_slaves") == 1 and replica.get("master_link_status") == "up"
        return online and master.get("master_repl_offset") == replica.get("slave_repl_offset")

    def watching(self):
        """The sentinel monitors the master and knows its replica as a healthy one."""
        replicas = ask(self.sentinel.port, lambda c: c.sentinel_slaves(MASTER_NAME)) or []
        return self.master_port() == self.master.port and any(
            r["port"] == self.replica.port and not (r["is_sdown"] or r["is_disconnected"]) for r in replicas)

    def master_state(self):
        """The master as the sentinel describes it to clients (SENTINEL MASTERS: what redis-py asks), or {}."""
        return (ask(self.sentinel.port, lambda c: c.sentinel_masters()) or {}).get(MASTER_NAME, {})

    def master_port(self):
        return self.master_state().get("port")

    def failed_over(self):
        """The sentinel tells clients the replica is the master, up (as redis-py checks), and the replica says it is
        one. (SENTINEL GET-MASTER-ADDR-BY-NAME names the new master a little earlier than SENTINEL MASTERS does.)"""
        state = self.master_state()
        up = state.get("is_master") and not (state.get("is_sdown") or state.get("is_odown"))
        return bool(up and state["port"] == self.replica.port
                    and self.replica.info("replication").get("role") == "master")

    def stop(self):
        for process in (self.sentinel, self.replica, self.master):
            process.stop()


@contextmanager
def running(deployment_class, **options):
    """Start a deployment in a temporary directory; stop every process it started, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="sluice-redis-") as directory:
        deployment = deployment_class(directory, **options)
        try:
            deployment.start()
            yield deployment
        finally:
            deployment.stop()
