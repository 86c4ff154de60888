"""The protocol on real Ray actors: end to end, a host actor killed at every step, the
controller killed mid-resize. One local Ray per module (started once, shut down in the
finaliser)."""
from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from vmresize.actors import Cluster, OperationError  # noqa: E402
from vmresize.config import parse  # noqa: E402
from vmresize.drivers.fake import Fault, FaultPlan  # noqa: E402

pytestmark = pytest.mark.ray

CONFIG = """
options: {step_timeout_s: 20}
allocation_ratios: {vcpus: 4.0, memory_mb: 1.0, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 0, disk_gb: 0}
flavors:
  m1.tiny:   {vcpus: 1, memory_mb: 512,  root_gb: 1}
  m1.small:  {vcpus: 1, memory_mb: 2048, root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096, root_gb: 40}
hosts:
  - {name: a, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: b, vcpus: 8, memory_mb: 16384, disk_gb: 400}
"""

# Every driver step of the protocol crashes its host once, before or after its effect:
# an intent without an outcome in both shapes. The restarted actor must finish it.
CRASHES = {
    "a": FaultPlan(exact=[Fault("spawn", "crash", call=2, when="after"),
                          Fault("migrate_disk_and_power_off", "crash", call=1, when="before"),
                          Fault("confirm_migration", "crash", call=1, when="after"),
                          Fault("finish_revert_migration", "crash", call=1, when="before")]),
    "b": FaultPlan(exact=[Fault("finish_migration", "crash", call=1, when="after"),
                          Fault("revert_migration_dest", "crash", call=1, when="before")]),
}


def _config(tmp: Path):
    import msgspec
    cfg = parse(CONFIG, "test")
    return msgspec.structs.replace(cfg, state_dir=str(tmp / "state"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.start(_config(tmp_path_factory.mktemp("ray")), faults=CRASHES,
                      latency_s=0.02)
    yield c
    c.stop()
    if ray.is_initialized():
        ray.shutdown()


def _no_transient(cluster):
    stuck = [i for i in cluster.instances() if i.task_state is not None]
    open_ = [m for m in cluster.migrations() if m.status not in
             ("finished", "confirmed", "reverted", "error")]
    assert not stuck and not open_, (stuck, open_)


def test_resize_confirm_with_a_crash_at_every_source_and_dest_step(cluster):
    cluster.boot("r1", "m1.small", host="a")
    mig = cluster.resize("r1", "m1.medium").wait(120)
    assert (mig.status, mig.source_compute, mig.dest_compute) == ("finished", "a", "b")
    inst = cluster.instance("r1")
    assert (inst.host, inst.flavor.name, inst.status) == ("b", "m1.medium", "VERIFY_RESIZE")
    done = cluster.confirm("r1")
    assert done.status == "confirmed"
    hosts = {h.name: h for h in cluster.hosts()}
    assert hosts["b"].memory_mb_used >= 4096 and all(h.up for h in hosts.values())
    _no_transient(cluster)


def test_spawn_crash_recovers_and_revert_with_crashes_restores_the_source(cluster):
    before = {h.name: h.memory_mb_used for h in cluster.hosts()}
    cluster.boot("r2", "m1.small", host="a")        # the 2nd spawn on a crashes
    assert cluster.instance("r2").status == "ACTIVE"
    cluster.resize("r2", "m1.medium").wait(120)
    mig = cluster.revert("r2")
    assert mig.status == "reverted"
    inst = cluster.instance("r2")
    assert (inst.host, inst.flavor.name, inst.status) == ("a", "m1.small", "ACTIVE")
    after = {h.name: h.memory_mb_used for h in cluster.hosts()}
    assert after["b"] == before["b"] and after["a"] == before["a"] + 2048
    _no_transient(cluster)


def test_cold_migration_and_refusals_hold_nothing(cluster):
    cluster.boot("r3", "m1.tiny", host="a")
    mig = cluster.migrate("r3").wait(120)
    assert mig.migration_type == "migration" and mig.new_flavor == mig.old_flavor
    cluster.confirm("r3")
    usage = [(h.name, h.memory_mb_used) for h in cluster.hosts()]
    with pytest.raises(OperationError, match="m1.nosuch"):
        cluster.resize("r3", "m1.nosuch")
    with pytest.raises(OperationError, match="no instance"):
        cluster.resize("nobody", "m1.small")
    with pytest.raises(OperationError, match="VERIFY_RESIZE"):
        cluster.confirm("r3")
    with pytest.raises(OperationError, match="shrink"):
        cluster.resize("r1", "m1.small").wait(60)      # r1 is m1.medium: a shrink
    assert [(h.name, h.memory_mb_used) for h in cluster.hosts()] == usage
    _no_transient(cluster)


def test_killed_host_and_controller_recover_mid_resize(cluster):
    cluster.boot("r4", "m1.tiny", host="b")
    handle = cluster.resize("r4", "m1.small")
    recovery_s = cluster.crash_host("b")
    assert recovery_s < 60
    cluster.crash_controller()
    mig = handle.wait(120)
    assert mig.status == "finished"
    assert cluster.confirm("r4").status == "confirmed"
    _no_transient(cluster)


def test_audit_of_the_logs_passes(cluster):
    report = cluster.audit()
    assert report.ok, report.violations
    assert report.events > 30 and report.hosts == 2
