"""Host logic: the pure `decide` of actors/host.py and the HostShell around it.

Given a host's state (its log), when a command arrives, then these events are appended
(or this refusal comes back), and the FakeDriver's storage and domains look like this.
Shells run on the virtual-time loop (vmresize.sim.vclock), over MemoryLogs.
Nova bug classes have regression tests named after them (`test_nova_*`).
"""
from __future__ import annotations

import asyncio
import functools

import msgspec
import pytest

from strategies import MEDIUM, SMALL, TINY
from vmresize.protocol import commands as c
from vmresize.protocol.commands import Rejected
from vmresize.actors.host import Effect, HostPolicy, decide, probe_name
from vmresize.actors.shell import HostEventLog, HostShell
from vmresize.sim.vclock import run
from vmresize.drivers.fake import FakeDriver, FakeStorage, Fault, FaultPlan, HostCrashed
from vmresize.events import schema as ev
from vmresize.events.log import MemoryLog
from vmresize.events.schema import RUNNING, SHUTDOWN, MigrationSpec, Resources
from vmresize.projections import check
from vmresize.projections.fold import Projection, fold, merge_logs

CAPACITY = Resources(8, 8192, 200)
LIMIT = Resources(16, 8192, 200)
U, M = "u", "m"


def virtual(test):
    """Run an async test on a fresh virtual-time loop."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return run(test(*args, **kwargs))
    return wrapper


def types(envs) -> list[str]:
    return [type(e.event).__name__ for e in envs]


# --------------------------------------------------------------------------- a tiny cluster

class Node:
    """One host: its log and driver outlive its shell, as on a real machine."""

    def __init__(self, name: str, storage: FakeStorage | None = None,
                 faults: list[Fault] = (), limit: Resources = LIMIT,
                 overhead: Resources = ev.ZERO, seed: int = 0):
        self.name = name
        self.raw = MemoryLog()
        self.policy = HostPolicy(name=name, limit=limit, overhead=overhead)
        self.driver = FakeDriver(name, CAPACITY, storage=storage,
                                 faults=FaultPlan(seed=seed, exact=list(faults)))
        self.shell: HostShell | None = None

    async def start(self) -> HostShell:
        log = HostEventLog(self.raw, self.name, lambda: asyncio.get_running_loop().time())
        self.shell = HostShell(self.policy, log, self.driver, capacity=CAPACITY)
        await self.shell.start()
        return self.shell

    def envelopes(self):
        return list(self.shell.log.replay())

    def events(self):
        return [env.event for env in self.envelopes()]

    @property
    def state(self) -> Projection:
        return self.shell.state

    def allocations(self) -> dict:
        return dict(self.state.ledgers[self.name].allocations)


class Pair:
    """Hosts `a` (source) and `b` (destination) and a controller-like driver of commands
    that hands each host the instance version it expects."""

    def __init__(self, shared: bool = False, a_faults=(), b_faults=(),
                 b_limit: Resources = LIMIT, seed: int = 0):
        storage_a = FakeStorage()
        storage_b = storage_a if shared else FakeStorage()
        self.a = Node("a", storage_a, a_faults, seed=seed)
        self.b = Node("b", storage_b, b_faults, limit=b_limit, seed=seed)
        self.nodes = {"a": self.a, "b": self.b}
        self.specs: dict[str, MigrationSpec] = {}
        self.disks: dict[str, tuple] = {}
        self.shared: dict[str, bool] = {}

    async def start(self) -> "Pair":
        await self.a.start()
        await self.b.start()
        return self

    def version(self, uuid: str = U) -> int:
        known = [n.state.instances[uuid].version for n in self.nodes.values()
                 if uuid in n.state.instances]
        return max(known, default=0)

    def logs(self) -> dict:
        return {name: n.envelopes() for name, n in self.nodes.items()}

    def audit(self):
        return check(self.logs())

    def view(self) -> Projection:
        """The cluster's state from both logs (a host sees only its own events)."""
        return fold(merge_logs(self.logs()))

    # -- commands

    def spawn_cmd(self, flavor=TINY, stopped=False, uuid=U, cid="spawn"):
        return c.Spawn(command_id=cid, instance_uuid=uuid, instance_version=0,
                       name=f"vm-{uuid}", flavor=flavor, stopped=stopped)

    async def boot(self, flavor=TINY, stopped=False, uuid=U):
        reply = await self.a.shell.handle(self.spawn_cmd(flavor, stopped, uuid))
        assert reply.ok, reply.reason
        return reply

    def prep_cmd(self, new=SMALL, dest="b", mid=M, uuid=U, allow_same_host=False):
        inst = self.a.state.instances[uuid]
        spec = MigrationSpec(name=inst.name, source="a", dest=dest, old_flavor=inst.flavor,
                             new_flavor=new, old_resources=inst.resources,
                             new_resources=new.resources(),
                             migration_type="resize" if new != inst.flavor else "migration",
                             vm_state="active" if inst.vm_state == "active" else "stopped")
        return c.PrepResize(command_id=f"{mid}:prep", instance_uuid=uuid,
                            instance_version=self.version(uuid), migration_id=mid,
                            spec=spec, allow_same_host=allow_same_host)

    async def prep(self, new=SMALL, dest="b", mid=M, uuid=U, allow_same_host=False):
        reply = await self.nodes[dest].shell.handle(
            self.prep_cmd(new, dest, mid, uuid, allow_same_host))
        claimed = next((e.event for e in reply.events if isinstance(e.event, ev.Claimed)),
                       None)
        if claimed is not None:
            self.specs[mid] = claimed.spec
        return reply

    def resize_cmd(self, mid=M, uuid=U, spec=None):
        return c.ResizeInstance(command_id=f"{mid}:resize", instance_uuid=uuid,
                                instance_version=self.version(uuid), migration_id=mid,
                                spec=spec or self.specs[mid], probe=probe_name(mid))

    async def resize(self, mid=M, uuid=U, spec=None):
        reply = await self.a.shell.handle(self.resize_cmd(mid, uuid, spec))
        last = reply.events[-1].event if reply.events else None
        if isinstance(last, ev.DiskMigrated):
            self.disks[mid], self.shared[mid] = last.disks, last.shared_storage
        return reply

    def dest_of(self, mid) -> Node:
        return self.nodes[self.specs[mid].dest]

    def finish_cmd(self, mid=M, uuid=U):
        return c.FinishResize(command_id=f"{mid}:finish", instance_uuid=uuid,
                              instance_version=self.version(uuid), migration_id=mid,
                              disks=self.disks.get(mid, ()),
                              shared_storage=self.shared.get(mid, False))

    async def finish(self, mid=M, uuid=U):
        return await self.dest_of(mid).shell.handle(self.finish_cmd(mid, uuid))

    def confirm_cmd(self, mid=M, uuid=U):
        return c.ConfirmResize(command_id=f"{mid}:confirm", instance_uuid=uuid,
                               instance_version=self.version(uuid), migration_id=mid,
                               shared_storage=self.shared.get(mid, False))

    async def confirm(self, mid=M, uuid=U):
        return await self.a.shell.handle(self.confirm_cmd(mid, uuid))

    def revert_cmd(self, mid=M, uuid=U):
        return c.RevertResize(command_id=f"{mid}:revert", instance_uuid=uuid,
                              instance_version=self.version(uuid), migration_id=mid,
                              shared_storage=self.shared.get(mid, False))

    async def revert(self, mid=M, uuid=U):
        return await self.dest_of(mid).shell.handle(self.revert_cmd(mid, uuid))

    def finish_revert_cmd(self, mid=M, uuid=U):
        return c.FinishRevertResize(command_id=f"{mid}:finish-revert", instance_uuid=uuid,
                                    instance_version=self.version(uuid), migration_id=mid)

    async def finish_revert(self, mid=M, uuid=U):
        return await self.a.shell.handle(self.finish_revert_cmd(mid, uuid))

    async def release(self, role="dest", mid=M, uuid=U, remove_disks=False):
        node = self.dest_of(mid) if role == "dest" else self.a
        return await node.shell.handle(c.ReleaseClaim(
            command_id=f"{mid}:release-{role}", instance_uuid=uuid,
            instance_version=self.version(uuid), migration_id=mid, role=role,
            reason="compensation", remove_disks=remove_disks))

    async def restore(self, mid=M, uuid=U):
        return await self.a.shell.handle(c.RestoreSource(
            command_id=f"{mid}:restore", instance_uuid=uuid,
            instance_version=self.version(uuid), migration_id=mid))

    async def to_finished(self, new=SMALL, stopped=False):
        await self.boot(stopped=stopped)
        assert (await self.prep(new)).ok
        assert (await self.resize()).ok
        assert (await self.finish()).ok


# --------------------------------------------------------------------------- pure decide

POLICY = HostPolicy(name="b", limit=Resources(4, 4096, 100))
LARGE = ev.Flavor(name="m1.large", vcpus=4, memory_mb=8192, root_gb=80)


def _prep(spec_source="a", new=SMALL, version=2, allow_same_host=False, mid=M):
    spec = MigrationSpec(name="vm", source=spec_source, dest="b", old_flavor=TINY,
                         new_flavor=new, old_resources=TINY.resources(),
                         new_resources=new.resources(), migration_type="resize",
                         vm_state="active")
    return c.PrepResize(command_id="p", instance_uuid=U, instance_version=version,
                        migration_id=mid, spec=spec, allow_same_host=allow_same_host)


def test_decide_spawn_claims_and_bumps_the_version():
    cmd = c.Spawn(command_id="s", instance_uuid=U, instance_version=0, name="vm",
                  flavor=TINY)
    (started,) = decide(Projection(), POLICY, cmd)
    assert isinstance(started, ev.SpawnStarted)
    assert (started.instance_version, started.resources, started.command_id) == (
        1, TINY.resources(), "s")


def test_decide_spawn_that_does_not_fit_is_rejected():
    cmd = c.Spawn(command_id="s", instance_uuid=U, instance_version=0, name="vm",
                  flavor=LARGE)
    result = decide(Projection(), POLICY, cmd)
    # only what does not fit is named: vcpus 4 of 4 fit, as does the disk
    assert result == Rejected("b cannot hold it: memory_mb 8192 > 4096")


def test_decide_prep_claims_with_overhead_and_probe():
    policy = msgspec.structs.replace(POLICY, overhead=Resources(0, 64, 0))
    (claimed,) = decide(Projection(), policy, _prep())
    assert isinstance(claimed, ev.Claimed)
    assert claimed.instance_version == 3
    assert claimed.spec.new_resources == SMALL.resources(Resources(0, 64, 0))
    assert claimed.probe == probe_name(M)


def test_decide_prep_that_does_not_fit_is_claim_rejected_without_a_version():
    (rejected,) = decide(Projection(), POLICY, _prep(new=LARGE))
    assert isinstance(rejected, ev.ClaimRejected)
    assert not isinstance(rejected, ev.InstanceEvent)
    assert "cannot hold" in rejected.reason and rejected.dest == "b"


def test_decide_prep_same_host_not_allowed():
    (rejected,) = decide(Projection(), POLICY, _prep(spec_source="b"))
    assert isinstance(rejected, ev.ClaimRejected) and "same host" in rejected.reason


def test_decide_prep_same_host_needs_old_and_new_together():
    # Given b holds the instance's old flavor (3 GB of 4 GB)
    big_old = ev.Flavor(name="old", vcpus=1, memory_mb=3072, root_gb=1)
    state = fold([ev.Envelope("b", 0, 0.0, ev.HostConfigured(
                     driver="x", capacity=POLICY.limit, limit=POLICY.limit)),
                  ev.Envelope("b", 1, 0.0, ev.SpawnStarted(
                      instance_uuid=U, instance_version=1, name="vm", flavor=big_old,
                      resources=big_old.resources()))])
    # When it must also hold a 2 GB flavor, then the claim is refused
    (rejected,) = decide(state, POLICY, _prep(spec_source="b", version=1,
                                              allow_same_host=True))
    assert isinstance(rejected, ev.ClaimRejected) and "memory_mb 5120 > 4096" in rejected.reason
    # and a 512 MB flavor fits beside it
    (claimed,) = decide(state, POLICY, _prep(spec_source="b", new=TINY, version=1,
                                             allow_same_host=True))
    assert isinstance(claimed, ev.Claimed)


def test_decide_refuses_a_stale_instance_version():
    state = fold([ev.Envelope("b", 0, 0.0, ev.SpawnStarted(
        instance_uuid=U, instance_version=5, name="vm", flavor=TINY,
        resources=TINY.resources()))])
    result = decide(state, POLICY, _prep(version=4))
    assert isinstance(result, Rejected) and "version 5" in result.reason


def test_decide_finish_of_an_unknown_migration_is_rejected():
    cmd = c.FinishResize(command_id="f", instance_uuid=U, instance_version=5,
                         migration_id="nope")
    result = decide(Projection(), POLICY, cmd)
    assert isinstance(result, Rejected) and "unknown" in result.reason


def test_decide_resize_instance_refuses_a_disk_shrink_with_a_rollback():
    state = fold([ev.Envelope("b", 0, 0.0, ev.SpawnStarted(
        instance_uuid=U, instance_version=1, name="vm", flavor=SMALL,
        resources=SMALL.resources())),
        ev.Envelope("b", 1, 0.0, ev.Spawned(instance_uuid=U, instance_version=2))])
    spec = MigrationSpec(name="vm", source="b", dest="c", old_flavor=SMALL, new_flavor=TINY,
                         old_resources=SMALL.resources(), new_resources=TINY.resources(),
                         migration_type="resize", vm_state="active")
    cmd = c.ResizeInstance(command_id="r", instance_uuid=U, instance_version=2,
                           migration_id=M, spec=spec)
    (failed,) = decide(state, POLICY, cmd)
    assert isinstance(failed, ev.Failed)
    assert (failed.step, failed.rolled_back, failed.instance_version) == (
        "resize_instance", True, 3)
    building = fold(state_envs := [ev.Envelope("b", 0, 0.0, ev.SpawnStarted(
        instance_uuid=U, instance_version=1, name="vm", flavor=SMALL,
        resources=SMALL.resources()))])
    assert state_envs and "building" in decide(building, POLICY, cmd).reason
    assert "shrink" in failed.reason


# --------------------------------------------------------------------------- shell: each command

@virtual
async def test_spawn_emits_spawn_started_then_spawned():
    p = await Pair().start()
    reply = await p.boot()
    assert reply.ok and types(reply.events) == ["SpawnStarted", "Spawned"]
    assert [e.event.instance_version for e in reply.events] == [1, 2]
    assert p.a.driver.domains[U].power_state == RUNNING
    assert U in p.a.driver.storage.dirs
    assert p.a.allocations() == {"i:u": TINY.resources()}
    assert types(p.a.envelopes()) == ["HostConfigured", "SpawnStarted", "Spawned"]


@virtual
async def test_spawn_stopped_stays_off():
    p = await Pair().start()
    reply = await p.boot(stopped=True)
    assert reply.events[-1].event.power_state == SHUTDOWN
    assert p.a.driver.domains[U].power_state == SHUTDOWN
    assert p.a.state.instances[U].status == "SHUTOFF"


@virtual
async def test_spawn_failure_releases_the_instance():
    p = await Pair(a_faults=[Fault("spawn", "fail")]).start()
    reply = await p.a.shell.handle(p.spawn_cmd())
    assert not reply.ok and types(reply.events) == ["SpawnStarted", "SpawnFailed"]
    assert p.a.allocations() == {}
    assert U not in p.a.driver.domains


@virtual
async def test_prep_resize_claims_and_creates_the_probe():
    p = await Pair().start()
    await p.boot()
    reply = await p.prep()
    assert reply.ok and types(reply.events) == ["Claimed", "ProbeCreated"]
    claimed = reply.events[0].event
    assert claimed.probe == probe_name(M) and claimed.instance_version == 3
    assert claimed.probe_pending     # the intent is durable before the probe exists
    assert probe_name(M) in p.b.driver.storage.probes
    assert p.b.allocations() == {"m:m:new": SMALL.resources()}
    assert p.b.state.migrations[M].status == "pre-migrating"


@virtual
async def test_prep_resize_that_does_not_fit_is_claim_rejected():
    p = await Pair(b_limit=Resources(16, 1024, 200)).start()
    await p.boot()
    reply = await p.prep(new=SMALL)
    assert not reply.ok and types(reply.events) == ["ClaimRejected"]
    assert "memory_mb" in reply.reason
    assert p.b.allocations() == {}
    assert M not in p.b.state.migrations
    assert p.b.driver.storage.probes == []


@virtual
async def test_prep_resize_to_the_same_host_when_not_allowed_is_claim_rejected():
    p = await Pair().start()
    await p.boot()
    reply = await p.prep(dest="a")
    assert not reply.ok and types(reply.events) == ["ClaimRejected"]
    assert "same host" in reply.reason
    assert p.a.allocations() == {"i:u": TINY.resources()}


@virtual
async def test_prep_resize_to_the_same_host_must_fit_old_and_new_together():
    # Given `a` holds a 4 GB instance of its 8 GB
    p = await Pair().start()
    await p.boot(flavor=MEDIUM)
    big = ev.Flavor(name="big", vcpus=2, memory_mb=6144, root_gb=40)
    # When it must claim 6 GB more on itself, then it refuses
    reply = await p.prep(new=big, dest="a", allow_same_host=True)
    assert not reply.ok and "memory_mb 10240 > 8192" in reply.reason
    assert p.a.allocations() == {"i:u": MEDIUM.resources()}


@virtual
async def test_same_host_resize_round_trip():
    p = await Pair().start()
    await p.boot()
    reply = await p.prep(dest="a", allow_same_host=True)
    assert reply.ok
    assert p.a.allocations() == {"i:u": TINY.resources(), "m:m:new": SMALL.resources()}
    resize = await p.resize()
    assert types(resize.events) == ["MigrationStarted", "DiskMigrated"]
    assert resize.events[-1].event.shared_storage is True
    assert (await p.finish()).ok
    assert (await p.confirm()).ok
    assert p.a.allocations() == {"i:u": SMALL.resources()}
    inst = p.a.state.instances[U]
    assert (inst.host, inst.flavor, inst.status) == ("a", SMALL, "ACTIVE")
    assert U + "_resize" not in p.a.driver.storage.dirs
    assert p.audit().ok


@pytest.mark.parametrize("shared", [False, True])
@virtual
async def test_resize_instance_powers_off_and_moves_the_disks(shared):
    p = await Pair(shared=shared).start()
    await p.boot()
    await p.prep()
    reply = await p.resize()
    assert reply.ok and types(reply.events) == ["MigrationStarted", "DiskMigrated"]
    disk_migrated = reply.events[-1].event
    assert disk_migrated.shared_storage is shared     # found by the probe, not configured
    assert [d.name for d in disk_migrated.disks] == ["disk"]
    assert U + "_resize" in p.a.driver.storage.dirs
    assert p.a.driver.domains[U].power_state == SHUTDOWN
    assert p.a.allocations() == {"m:m:old": TINY.resources()}
    assert p.a.state.migrations[M].status == "post-migrating"


@virtual
async def test_resize_instance_disk_shrink_fails_holding_nothing_new():
    p = await Pair().start()
    await p.boot(flavor=SMALL)
    await p.prep(new=TINY)
    reply = await p.resize()
    assert not reply.ok and types(reply.events) == ["Failed"]
    failed = reply.events[0].event
    assert (failed.step, failed.rolled_back) == ("resize_instance", True)
    # nothing happened to the instance on the source
    assert p.a.allocations() == {"i:u": SMALL.resources()}
    assert p.a.driver.domains[U].power_state == RUNNING
    assert U in p.a.driver.storage.dirs and U + "_resize" not in p.a.driver.storage.dirs
    assert p.a.state.instances[U].status == "ACTIVE"


@pytest.mark.parametrize("stopped", [False, True])
@virtual
async def test_finish_resize_powers_on_unless_stopped(stopped):
    p = await Pair().start()
    await p.boot(stopped=stopped)
    await p.prep()
    await p.resize()
    reply = await p.finish()
    assert reply.ok and types(reply.events) == ["FinishStarted", "Finished"]
    power = SHUTDOWN if stopped else RUNNING
    assert reply.events[-1].event.power_state == power
    assert p.b.driver.domains[U].power_state == power
    assert p.b.driver.domains[U].flavor == SMALL
    assert p.b.driver.storage.dirs[U] == {"disk": SMALL.root_gb}
    assert probe_name(M) not in p.b.driver.storage.probes
    assert p.b.allocations() == {"i:u": SMALL.resources()}
    assert p.b.state.instances[U].status == "VERIFY_RESIZE"


@virtual
async def test_confirm_releases_the_source_and_removes_the_resize_dir():
    p = await Pair().start()
    await p.to_finished()
    reply = await p.confirm()
    assert reply.ok and types(reply.events) == ["ConfirmStarted", "Confirmed"]
    assert p.a.allocations() == {}
    assert U + "_resize" not in p.a.driver.storage.dirs
    assert U not in p.a.driver.domains
    assert p.a.state.migrations[M].status == "confirmed"
    assert p.audit().ok


@virtual
async def test_revert_then_finish_revert_brings_the_instance_home():
    p = await Pair().start()
    await p.to_finished()
    reply = await p.revert()
    assert reply.ok and types(reply.events) == ["RevertStarted", "DestReverted"]
    assert p.b.allocations() == {}
    assert U not in p.b.driver.domains and U not in p.b.driver.storage.dirs
    reply = await p.finish_revert()
    assert reply.ok and types(reply.events) == ["RevertFinishStarted", "Reverted"]
    assert reply.events[-1].event.power_state == RUNNING
    assert p.a.allocations() == {"i:u": TINY.resources()}
    assert p.a.driver.storage.dirs[U] == {"disk": TINY.root_gb}
    assert U + "_resize" not in p.a.driver.storage.dirs
    assert p.a.driver.domains[U].power_state == RUNNING
    inst = p.a.state.instances[U]
    assert (inst.host, inst.flavor, inst.status, inst.version) == ("a", TINY, "ACTIVE", 12)
    assert p.audit().ok


@virtual
async def test_decide_refuses_to_power_an_instance_that_runs_on_another_host():
    """The state of a, where the instance runs idle, decided on as host b."""
    p = await Pair().start()
    await p.boot()
    assert p.a.state.instances[U].host == "a"
    for cmd in (c.StopInstance, c.RebootInstance, c.DeleteInstance):
        here = cmd(command_id="x", instance_uuid=U, instance_version=p.version())
        assert not isinstance(decide(p.a.state, msgspec.structs.replace(POLICY, name="a"),
                                     here), Rejected)
        for other in ("b", "A"):        # names that sort after and before "a"
            elsewhere = decide(p.a.state, msgspec.structs.replace(POLICY, name=other), here)
            assert isinstance(elsewhere, Rejected) and other in elsewhere.reason, \
                (cmd.__name__, other)


@virtual
async def test_an_abandoned_confirm_closes_its_intent_and_leaves_the_instance_in_error():
    p = await Pair(a_faults=[Fault("confirm_migration", "fail")]).start()
    await p.to_finished()
    reply = await p.confirm()
    assert not reply.ok and reply.retryable and types(reply.events) == ["ConfirmStarted"]
    confirm_id = reply.events[0].event.command_id
    reply = await p.a.shell.handle(c.AbandonStep(
        command_id=confirm_id + ":abandon", instance_uuid=U, instance_version=p.version(),
        migration_id=M, step="confirm", reason="kept failing", abandons=confirm_id))
    assert not reply.ok and types(reply.events) == ["Failed"]   # logged, as a failure
    failed = reply.events[0].event
    assert (failed.step, failed.rolled_back, failed.closes) == ("confirm", False, confirm_id)
    assert confirm_id not in p.a.shell.open_intents
    assert p.view().instances[U].vm_state == "error"


@virtual
async def test_release_claim_on_the_destination():
    p = await Pair().start()
    await p.boot()
    await p.prep()
    reply = await p.release("dest")
    assert reply.ok and types(reply.events) == ["ReleaseStarted", "ClaimReleased"]
    released = reply.events[-1].event
    assert (released.role, released.disks_removed) == ("dest", False)   # none were asked
    assert p.b.allocations() == {}
    assert p.b.driver.storage.probes == []
    again = await p.b.shell.handle(c.ReleaseClaim(
        command_id="other", instance_uuid=U, instance_version=p.version(),
        migration_id=M, role="dest"))
    assert not again.ok and again.events == [] and "no claim" in again.reason


@virtual
async def test_finish_failure_then_restore_source():
    p = await Pair(b_faults=[Fault("finish_migration", "fail")]).start()
    await p.boot()
    await p.prep()
    await p.resize()
    reply = await p.finish()
    assert not reply.ok and types(reply.events) == ["FinishStarted", "Failed"]
    failed = reply.events[-1].event
    assert (failed.step, failed.rolled_back) == ("finish", True)
    assert p.b.allocations() == {}
    assert U not in p.b.driver.storage.dirs
    reply = await p.restore()
    assert reply.ok and types(reply.events) == ["RestoreStarted", "SourceRestored"]
    assert reply.events[-1].event.power_state == RUNNING
    assert p.a.allocations() == {"i:u": TINY.resources()}
    assert U in p.a.driver.storage.dirs and U + "_resize" not in p.a.driver.storage.dirs
    assert p.a.driver.domains[U].power_state == RUNNING
    assert p.a.state.instances[U].status == "ACTIVE"
    report = p.audit()
    assert report.ok and report.open_migrations == 0


@virtual
async def test_driver_failure_in_migrate_rolls_back_to_the_source():
    p = await Pair(a_faults=[Fault("migrate_disk_and_power_off", "fail")]).start()
    await p.boot()
    await p.prep()
    reply = await p.resize()
    assert not reply.ok and types(reply.events) == ["MigrationStarted", "Failed"]
    failed = reply.events[-1].event
    assert (failed.step, failed.rolled_back) == ("migrate", True)
    assert failed.power_state == RUNNING
    inst = p.a.state.instances[U]
    assert (inst.host, inst.flavor, inst.vm_state, inst.task_state) == ("a", TINY, "active",
                                                                         None)
    assert p.a.allocations() == {"i:u": TINY.resources()}
    assert p.a.driver.domains[U].power_state == RUNNING
    assert U in p.a.driver.storage.dirs
    assert failed.dest_copy, "the disks may have reached b: it must be told to drop them"
    source = await p.release("source")      # the failed step let go already
    assert not source.ok and source.events == [] and "role 'source'" in source.reason
    await p.release("dest", remove_disks=True)
    report = p.audit()
    assert report.ok and report.open_migrations == 0


# --------------------------------------------------------------------------- idempotence

@virtual
async def test_repeated_command_is_answered_from_the_log():
    p = await Pair().start()
    first = await p.boot()
    length = len(p.a.envelopes())
    again = await p.a.shell.handle(p.spawn_cmd())
    assert again == first
    assert len(p.a.envelopes()) == length
    assert p.a.driver._calls["spawn"] == 1


@virtual
async def test_concurrent_duplicates_run_once():
    p = await Pair().start()
    p.a.driver.latency = msgspec.structs.replace(p.a.driver.latency, base_s=5.0)
    cmd = p.spawn_cmd()
    one, two = await asyncio.gather(p.a.shell.handle(cmd), p.a.shell.handle(cmd))
    assert one == two and one.ok
    assert types(p.a.envelopes()) == ["HostConfigured", "SpawnStarted", "Spawned"]
    assert p.a.driver._calls["spawn"] == 1


@virtual
async def test_repeated_resize_is_not_executed_twice():
    p = await Pair().start()
    await p.boot()
    await p.prep()
    cmd = p.resize_cmd()
    first = await p.a.shell.handle(cmd)
    again = await p.a.shell.handle(cmd)
    assert again == first and types(first.events) == ["MigrationStarted", "DiskMigrated"]
    assert p.a.driver._calls["migrate_disk_and_power_off"] == 1


@virtual
async def test_stale_instance_version_is_refused_without_an_event():
    p = await Pair().start()
    await p.boot()
    length = len(p.a.envelopes())
    cmd = msgspec.structs.replace(p.spawn_cmd(), command_id="other")   # version 0 < 2
    reply = await p.a.shell.handle(cmd)
    assert not reply.ok and reply.events == [] and "version 2" in reply.reason
    await p.prep()
    stale = msgspec.structs.replace(p.resize_cmd(), instance_version=1)
    reply = await p.a.shell.handle(stale)
    assert not reply.ok and reply.events == [] and not reply.retryable
    assert len(p.a.envelopes()) == length
    assert "migrate_disk_and_power_off" not in p.a.driver._calls


@virtual
async def test_command_in_the_wrong_state_is_rejected():
    p = await Pair().start()
    await p.boot()
    await p.prep()
    reply = await p.b.shell.handle(p.revert_cmd())     # not finished yet
    assert not reply.ok and reply.events == [] and "pre-migrating" in reply.reason


# --------------------------------------------------------------------------- crash recovery

async def _crash(node: Node, cmd) -> None:
    """Send `cmd`; the driver crashes the host mid-step; the shell is gone."""
    with pytest.raises(HostCrashed):
        await node.shell.handle(cmd)
    node.shell = None


async def _restart_and_join(node: Node, cmd):
    shell = await node.start()
    assert shell.recovered == 1
    return await shell.handle(cmd)     # joins the recovery of the same command


# (intent, its outcome, the step whose driver call crashes, host, how to get there)
RECOVERY = [
    ("SpawnStarted", "Spawned", "spawn", "a", "boot"),
    ("MigrationStarted", "DiskMigrated", "migrate_disk_and_power_off", "a", "resize"),
    ("FinishStarted", "Finished", "finish_migration", "b", "finish"),
    ("ConfirmStarted", "Confirmed", "confirm_migration", "a", "confirm"),
    ("RevertStarted", "DestReverted", "revert_migration_dest", "b", "revert"),
    ("RevertFinishStarted", "Reverted", "finish_revert_migration", "a", "finish_revert"),
]


async def _drive_to(p: Pair, step: str):
    """Run the protocol up to `step` and return the command of that step."""
    if step == "boot":
        return p.spawn_cmd()
    await p.boot()
    await p.prep()
    if step == "resize":
        return p.resize_cmd()
    await p.resize()
    if step == "finish":
        return p.finish_cmd()
    await p.finish()
    if step == "confirm":
        return p.confirm_cmd()
    if step == "revert":
        return p.revert_cmd()
    await p.revert()
    return p.finish_revert_cmd()


async def _complete(p: Pair, step: str) -> None:
    """Take the migration to its end after the recovered step."""
    if step in ("boot",):
        return
    if step == "resize":
        await p.finish()
    if step in ("resize", "finish"):
        await p.confirm()
    if step == "revert":
        await p.finish_revert()


# seed 0: the fake crashes after the step's effect; seed 1: before it
@pytest.mark.parametrize("seed", [0, 1], ids=["after-effect", "before-effect"])
@pytest.mark.parametrize("intent,outcome,driver_step,host,step", RECOVERY,
                         ids=[r[0] for r in RECOVERY])
@virtual
async def test_nova_instance_stuck_after_crash_in(intent, outcome, driver_step, host, step,
                                                  seed):
    # Given a host that crashed inside the driver call of `intent`
    faults = [Fault(driver_step, "crash")]
    p = Pair(a_faults=faults if host == "a" else (), b_faults=faults if host == "b" else (),
             seed=seed)
    await p.start()
    cmd = await _drive_to(p, step)
    node = p.nodes[host]
    await _crash(node, cmd)
    # its log ends right after the intent
    last = HostEventLog(node.raw, host, lambda: 0.0)
    assert types(list(last.replay()))[-1] == intent
    # When it restarts, then recovery appends the outcome
    reply = await _restart_and_join(node, cmd)
    assert reply.ok, reply.reason
    assert types(reply.events) == [intent, outcome]
    assert types(node.envelopes())[-2:] == [intent, outcome]
    assert node.shell.open_intents == {}
    # and the protocol ends with nothing leaked, nothing stuck
    await _complete(p, step)
    report = p.audit()
    assert report.ok, report.violations
    assert report.open_migrations == 0
    for inst in p.view().instances.values():
        assert inst.task_state is None, inst


@virtual
async def test_recovery_after_restart_runs_without_being_asked():
    p = Pair(a_faults=[Fault("spawn", "crash")])
    await p.start()
    await _crash(p.a, p.spawn_cmd())
    shell = await p.a.start()
    for _ in range(5):
        await asyncio.sleep(0)
    assert types(p.a.envelopes())[-2:] == ["SpawnStarted", "Spawned"]
    assert shell.open_intents == {}


@virtual
async def test_restart_without_open_intents_recovers_nothing():
    p = await Pair().start()
    await p.to_finished()
    length = len(p.b.envelopes())
    shell = await p.b.start()
    assert shell.recovered == 0
    assert len(p.b.envelopes()) == length       # capacity unchanged: no HostConfigured
    assert shell.state.instances[U].status == "VERIFY_RESIZE"


# --------------------------------------------------------------------------- Nova bug classes

@virtual
async def test_nova_leaked_claim_after_failed_prep():
    # The probe cannot be created: the claim must not stay behind
    p = await Pair(b_faults=[Fault("create_probe", "fail")]).start()
    await p.boot()
    reply = await p.prep()
    assert not reply.ok and types(reply.events) == ["Claimed", "ClaimReleased"]
    assert "probe" in reply.reason
    assert p.b.allocations() == {}
    assert p.audit().ok


@virtual
async def test_nova_leaked_claim_after_refused_disk_shrink():
    p = await Pair().start()
    await p.boot(flavor=SMALL)
    await p.prep(new=TINY)
    await p.resize()
    assert p.b.allocations() == {"m:m:new": TINY.resources()}
    await p.release("dest")
    assert p.b.allocations() == {}
    report = p.audit()
    assert report.ok and report.open_migrations == 0


@pytest.mark.parametrize("shared", [False, True])
@virtual
async def test_nova_resize_dir_left_behind_after_confirm(shared):
    p = await Pair(shared=shared).start()
    await p.to_finished()
    await p.confirm()
    dirs = set(p.a.driver.storage.dirs) | set(p.b.driver.storage.dirs)
    assert dirs == {U}
    assert p.a.driver.storage.probes == [] and p.b.driver.storage.probes == []


@pytest.mark.parametrize("shared", [False, True])
@virtual
async def test_nova_resize_dir_left_behind_after_revert(shared):
    p = await Pair(shared=shared).start()
    await p.to_finished()
    await p.revert()
    await p.finish_revert()
    assert set(p.a.driver.storage.dirs) == {U}
    assert set(p.b.driver.storage.dirs) == ({U} if shared else set())
    assert p.a.driver.storage.dirs[U] == {"disk": TINY.root_gb}
    assert U not in p.b.driver.domains


@virtual
async def test_nova_stopped_instance_powered_on_after_resize():
    p = await Pair().start()
    await p.to_finished(stopped=True)
    assert p.b.driver.domains[U].power_state == SHUTDOWN
    await p.confirm()
    inst = p.view().instances[U]
    assert (inst.vm_state, inst.power_state, inst.status) == ("stopped", SHUTDOWN, "SHUTOFF")
    assert inst.host == "b" and p.b.driver.domains[U].power_state == SHUTDOWN


@virtual
async def test_nova_stopped_instance_powered_on_after_revert():
    p = await Pair().start()
    await p.to_finished(stopped=True)
    await p.revert()
    reply = await p.finish_revert()
    assert reply.events[-1].event.power_state == SHUTDOWN
    assert p.a.driver.domains[U].power_state == SHUTDOWN
    inst = p.a.state.instances[U]
    assert (inst.vm_state, inst.power_state, inst.status) == ("stopped", SHUTDOWN, "SHUTOFF")


@virtual
async def test_nova_stopped_instance_powered_on_after_failed_migrate():
    p = await Pair(a_faults=[Fault("migrate_disk_and_power_off", "fail")]).start()
    await p.boot(stopped=True)
    await p.prep()
    reply = await p.resize()
    assert reply.events[-1].event.power_state == SHUTDOWN
    assert p.a.driver.domains[U].power_state == SHUTDOWN
    assert p.a.state.instances[U].status == "SHUTOFF"


# --------------------------------------------------------------------------- extension

class _SpawnAlwaysFails(HostShell):
    async def _do_spawn(self, e):
        return Effect(error="override")


class _ReleaseRefuses(HostShell):
    async def _do_release(self, e):
        return Effect(error="override")


@pytest.mark.parametrize("shell_class,step", [(_SpawnAlwaysFails, "spawn"),
                                              (_ReleaseRefuses, "release")])
@virtual
async def test_a_shell_subclass_can_override_an_effect(shell_class, step):
    node = Node("a")
    log = HostEventLog(node.raw, "a", lambda: 0.0)
    node.shell = shell_class(node.policy, log, node.driver, capacity=CAPACITY)
    await node.shell.start()
    p = Pair()
    p.a = node
    p.nodes["a"] = node
    if step == "spawn":
        reply = await node.shell.handle(p.spawn_cmd())
        assert types(reply.events) == ["SpawnStarted", "SpawnFailed"]
    else:
        await p.b.start()
        await p.boot()
        await p.prep(dest="a", allow_same_host=True)
        p.specs[M] = msgspec.structs.replace(p.specs[M], dest="a")
        reply = await p.release("dest")
        assert not reply.ok and reply.retryable and reply.reason.endswith("override")
