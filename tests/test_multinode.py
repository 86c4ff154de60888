"""vmresize on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
host actors pinned to nodes by their custom resources, and resizes that survive the
loss of the source's or the destination's node mid-step once a node with the same
resource comes back.
One Ray cluster per module, shut down in the finaliser."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from polling import poll  # noqa: E402

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

import msgspec  # noqa: E402

from vmresize.actors import Cluster  # noqa: E402
from vmresize.config import parse  # noqa: E402
from vmresize.actors.runtime import HOST_PREFIX  # noqa: E402

pytestmark = pytest.mark.ray

CONFIG = """
options: {step_timeout_s: 10}
allocation_ratios: {vcpus: 4.0, memory_mb: 1.0, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 0, disk_gb: 0}
flavors:
  m1.small:  {vcpus: 1, memory_mb: 2048, root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096, root_gb: 40}
hosts:
  - {name: ha, vcpus: 8, memory_mb: 16384, disk_gb: 400, resources: {node-a: 1}}
  - {name: hb, vcpus: 8, memory_mb: 16384, disk_gb: 400, resources: {node-b: 1}}
"""

# A node killed without a goodbye is noticed by the GCS's health checks; Ray's defaults
# (3 s x 5 misses) would spend most of this module waiting for that.
HEAD = {"num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0,
                           "health_check_period_ms": 1000,
                           "health_check_timeout_ms": 2000,
                           "health_check_failure_threshold": 4}}
LATENCY_S = 0.5      # each fake driver step: long enough to kill a node in the middle


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _children(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _ppid(int(entry.name)) == parent:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class MultiNode:
    def __init__(self, tmp: Path):
        self.ray_cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=HEAD)
        self.nodes = {"node-a": self.ray_cluster.add_node(num_cpus=1,
                                                          resources={"node-a": 10}),
                      "node-b": self.ray_cluster.add_node(num_cpus=1,
                                                          resources={"node-b": 10})}
        self.ray_cluster.wait_for_nodes()
        cfg = msgspec.structs.replace(parse(CONFIG, "multinode"),
                                      state_dir=str(tmp / "state"))
        self.cluster = Cluster.start(cfg, ray_address=self.ray_cluster.address,
                                     latency_s=LATENCY_S)

    def crash_node(self, resource: str) -> None:
        """Kill the node holding `resource` at this instant, as a machine crash would.

        `remove_node` kills the raylet and its agents but not the workers, which notice
        only later and meanwhile finish what they were doing; so every process of the
        node is frozen first (SIGSTOP), then the node removed, then its workers killed.
        """
        node = self.nodes.pop(resource)
        raylet = node.all_processes["raylet"][0].process.pid
        workers = _children(raylet)
        for pid in (raylet, *workers):
            _signal(pid, signal.SIGSTOP)
        self.ray_cluster.remove_node(node, allow_graceful=False)
        for pid in workers:
            _signal(pid, signal.SIGKILL)

    def add_node(self, resource: str) -> None:
        self.nodes[resource] = self.ray_cluster.add_node(num_cpus=1,
                                                         resources={resource: 10})

    def node_of(self, pid: int) -> str:
        """Which node runs this worker process: Ray workers are children of their
        node's raylet, so the parent pid names the node."""
        ppid = _ppid(pid)
        raylets = {"head": self.ray_cluster.head_node, **self.nodes}
        for name, node in raylets.items():
            if node.all_processes["raylet"][0].process.pid == ppid:
                return name
        return f"unknown (parent {ppid})"

    def host_pid(self, host: str, timeout_s: float = 60) -> int:
        handle = ray.get_actor(HOST_PREFIX + host, namespace=self.cluster.namespace)
        return ray.get(handle.ready.remote(), timeout=timeout_s)["pid"]

    def shutdown(self) -> None:
        try:
            self.cluster.stop()
        finally:
            if ray.is_initialized():
                ray.shutdown()
            self.ray_cluster.shutdown()


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    mn = None
    try:
        mn = MultiNode(tmp_path_factory.mktemp("multinode"))
        yield mn
    finally:
        if mn is not None:
            mn.shutdown()


def _poll(fn, timeout_s: float, interval_s: float = 0.05):
    return poll(fn, timeout_s, interval_s)


def _no_transient(cluster):
    stuck = [i for i in cluster.instances() if i.task_state is not None]
    open_ = [m for m in cluster.migrations() if m.status not in
             ("finished", "confirmed", "reverted", "error")]
    assert not stuck and not open_, (stuck, open_)


def test_host_actors_run_on_the_nodes_their_resources_name(multinode):
    placed = {h: multinode.node_of(multinode.host_pid(h)) for h in ("ha", "hb")}
    assert placed == {"ha": "node-a", "hb": "node-b"}


def _types(host_handle, migration_id: str) -> list[str]:
    return [type(env.event).__name__ for env in ray.get(host_handle.events_since.remote(0))
            if getattr(env.event, "migration_id", "") == migration_id]


# (instance, node to crash, its host, the intent the crash interrupts, its outcome)
CRASHES = [pytest.param("vm-d", "node-b", "hb", "FinishStarted", "Finished", id="dest"),
           pytest.param("vm-s", "node-a", "ha", "MigrationStarted", "DiskMigrated",
                        id="source")]


@pytest.mark.parametrize("name, node, host, intent, outcome", CRASHES)
def test_resize_survives_the_loss_of_a_node_mid_step(multinode, name, node, host, intent,
                                                      outcome):
    cluster = multinode.cluster
    cluster.boot(name, "m1.small", host="ha")
    handle = cluster.resize(name, "m1.medium", host="hb")
    assert (handle.first.source_compute, handle.first.status) == ("ha", "pre-migrating")
    actor = ray.get_actor(HOST_PREFIX + host, namespace=cluster.namespace)
    old_pid = multinode.host_pid(host)
    controller_node = multinode.node_of(ray.get(cluster.controller.ready.remote())["pid"])

    # The host has logged the intent of its step and is in the driver call (LATENCY_S):
    # the node dies between intent and outcome. The controller, which Ray places on any
    # node, may die with it; both must recover.
    seen = _poll(lambda: (t := _types(actor, handle.id)) and t[-1] in (intent, outcome)
                 and t, timeout_s=60)
    assert seen[-1] == intent, f"{seen}: {outcome} before {node} could be killed"
    multinode.crash_node(node)
    multinode.add_node(node)

    mig = handle.wait(90)
    assert (mig.status, mig.source_compute, mig.dest_compute) == ("finished", "ha", "hb"), \
        (mig, f"the controller ran on {controller_node}")
    info = ray.get(actor.ready.remote(), timeout=60)
    assert info["pid"] != old_pid and multinode.node_of(info["pid"]) == node
    assert info["recovered"] == 1          # it resumed the step the crash interrupted
    assert _types(actor, mig.id).count(outcome) == 1
    inst = cluster.instance(name)
    assert (inst.host, inst.flavor.name, inst.status, inst.power_state) == \
        ("hb", "m1.medium", "VERIFY_RESIZE", 1)

    assert cluster.confirm(name).status == "confirmed"
    _no_transient(cluster)
    hosts = {h.name: h for h in cluster.hosts()}
    assert all(h.up for h in hosts.values())
    for h in hosts.values():
        held = sum(i.flavor.memory_mb for i in cluster.instances() if i.host == h.name)
        assert h.memory_mb_used == held, h


def test_audit_of_the_logs_passes(multinode):
    report = multinode.cluster.audit()
    assert report.ok, report.violations
    assert report.hosts == 2 and report.open_migrations == 0
