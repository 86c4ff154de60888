"""The Controller over real HostShells and FakeDrivers, joined by a tiny in-process
transport, on the virtual-time loop.

Given a cluster, when an operator boots, resizes, confirms or reverts, then the
migration and instance views say so, every ledger holds exactly what it should, and the
auditor finds nothing wrong.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import tempfile

import pytest

import strategies as s
from vmresize.config import load, parse
from vmresize.actors import controller as controller_module
from vmresize.actors.controller import Controller, HostEntry, OperationError
from vmresize.actors.planner import End, Send, plan
from vmresize.config import Options
from vmresize.events.schema import Resources
from vmresize.protocol import commands as c
from vmresize.actors.host import HostPolicy
from vmresize.actors.shell import HostEventLog, HostShell
from vmresize.sim.vclock import run
from vmresize.drivers.fake import FakeDriver, FakeStorage, Fault, FaultPlan, Latency
from vmresize.events import schema as ev
from vmresize.events.codec import decode_controller
from vmresize.events.log import MemoryLog
from vmresize.projections import check
from vmresize.projections.fold import fold, merge_logs

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

FOUR_HOSTS = """
options: {allow_resize_to_same_host: false, max_attempts: 3, step_timeout_s: 60}
allocation_ratios: {vcpus: 16.0, memory_mb: 1.5, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 512, disk_gb: 0}
flavors:
  m1.tiny:   {vcpus: 1, memory_mb: 512,  root_gb: 1}
  m1.small:  {vcpus: 1, memory_mb: 2048, root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096, root_gb: 40}
hosts:
  - {name: h1, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: h2, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: h3, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: h4, vcpus: 8, memory_mb: 16384, disk_gb: 400}
"""


def virtual(test):
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return run(test(*args, **kwargs))
    return wrapper


class LocalTransport:
    """The narrow transport boundary, in process: a call is a method call."""

    def __init__(self, shells: dict[str, HostShell]):
        self.shells = shells
        self.calls = 0

    async def call(self, host, cmd, timeout_s):
        self.calls += 1
        return await self.shells[host].handle(cmd)

    async def events_since(self, host, offset, timeout_s, limit=None):
        return list(itertools.islice(self.shells[host].log.replay(offset), limit))


class Rig:
    """A cluster: one shell + FakeDriver + MemoryLog per host, a controller log."""

    def __init__(self, cfg=None, faults: dict | None = None, latency: dict | None = None,
                 controller_class=Controller, shared: tuple = (),
                 host_limits: dict | None = None, **options):
        self.cfg = cfg or load(ROOT / "cluster.yaml")
        # A host that knows it holds less than the controller believes (a stale view).
        self.host_limits = host_limits or {}
        self.options = Options(**{"max_attempts": self.cfg.options.max_attempts,
                                  "retry_backoff_s": 0.1, **options})
        self.raw = {h.name: MemoryLog() for h in self.cfg.hosts}
        pools = {h.name: FakeStorage() for h in self.cfg.hosts}
        for group in shared:                # hosts of a group share one storage pool
            for name in group:
                pools[name] = pools[group[0]]
        self.drivers = {h.name: FakeDriver(h.name, h.capacity, storage=pools[h.name],
                                           faults=FaultPlan(exact=(faults or {}).get(h.name, [])),
                                           latency=(latency or {}).get(h.name, Latency()))
                        for h in self.cfg.hosts}
        self.shells: dict[str, HostShell] = {}
        self.transport = LocalTransport(self.shells)
        self.controller_log = MemoryLog()
        self.controller_class = controller_class
        self.ids = itertools.count(1)
        self.ctl: Controller | None = None

    def clock(self) -> float:
        return 1_767_225_600.0 + asyncio.get_running_loop().time()

    def new_id(self) -> str:
        return f"00000000-0000-4000-8000-{next(self.ids):012d}"

    async def start_host(self, name: str) -> HostShell:
        h = self.cfg.host(name)
        limit = self.host_limits.get(name, self.cfg.limit(h))
        shell = HostShell(HostPolicy(name=name, limit=limit),
                          HostEventLog(self.raw[name], name, self.clock), self.drivers[name],
                          capacity=h.capacity, step_timeout_s=self.cfg.options.step_timeout_s)
        await shell.start()
        self.shells[name] = shell
        return shell

    def new_controller(self, cls=None) -> Controller:
        return (cls or self.controller_class)(
            log=self.controller_log, transport=self.transport,
            hosts=[HostEntry(h.name, h.driver, h.capacity, self.cfg.limit(h))
                   for h in self.cfg.hosts],
            flavors=self.cfg.all_flavors(), options=self.options, clock=self.clock,
            sleep=asyncio.sleep, new_id=self.new_id)

    async def start(self) -> Controller:
        for h in self.cfg.hosts:
            await self.start_host(h.name)
        self.ctl = self.new_controller()
        await self.ctl.start()
        return self.ctl

    # -- what the hosts say, not what the controller believes

    def logs(self) -> dict:
        return {name: list(shell.log.replay()) for name, shell in self.shells.items()}

    def audit(self):
        return check(self.logs())

    def view(self):
        return fold(merge_logs(self.logs()))

    def allocations(self) -> dict[str, dict]:
        p = self.view()
        return {h: dict(p.ledgers[h].allocations) for h in self.shells if
                p.ledgers[h].allocations}

    def controller_events(self) -> list:
        return [decode_controller(payload).event for _, payload in
                self.controller_log.read(0)]


def four_hosts(**options) -> dict:
    return dict(cfg=parse(FOUR_HOSTS), **options)


# --------------------------------------------------------------------------- happy paths

@virtual
async def test_boot():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    assert (inst.name, inst.flavor.name, inst.status, inst.version) == (
        "vm1", "m1.small", "ACTIVE", 2)
    assert rig.allocations() == {inst.host: {f"i:{inst.uuid}": inst.flavor.resources()}}
    used = {h.name: h.memory_mb_used for h in ctl.host_infos()}
    assert used[inst.host] == 2048 and sum(used.values()) == 2048
    assert rig.audit().ok


@virtual
async def test_boot_stopped_on_a_chosen_host():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.tiny", host="compute-2", stopped=True)
    assert (inst.host, inst.status, inst.power_state) == ("compute-2", "SHUTOFF", ev.SHUTDOWN)


@virtual
async def test_resize_reaches_verify_resize():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    assert (mig.status, mig.migration_type) == ("finished", "resize")
    assert (mig.source_compute, mig.old_flavor.name, mig.new_flavor.name) == (
        inst.host, "m1.small", "m1.medium")
    assert mig.dest_compute != inst.host
    now = ctl.instance_by_name("vm1")
    assert (now.status, now.host, now.flavor.name) == ("VERIFY_RESIZE", mig.dest_compute,
                                                      "m1.medium")
    assert rig.allocations() == {
        inst.host: {f"m:{mig.id}:old": inst.flavor.resources()},
        mig.dest_compute: {f"i:{inst.uuid}": now.flavor.resources()}}
    report = rig.audit()
    assert report.ok and report.open_migrations == 1


@virtual
async def test_confirm():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    done = await ctl.confirm("vm1")
    assert (done.id, done.status) == (mig.id, "confirmed")
    now = ctl.instance_by_name("vm1")
    assert (now.status, now.host, now.flavor.name) == ("ACTIVE", mig.dest_compute, "m1.medium")
    assert rig.allocations() == {mig.dest_compute: {f"i:{inst.uuid}": now.flavor.resources()}}
    assert f"{inst.uuid}_resize" not in rig.drivers[inst.host].storage.dirs
    report = rig.audit()
    assert report.ok and report.open_migrations == 0


@virtual
async def test_revert():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", stopped=True)
    mig = await ctl.resize("vm1", "m1.medium")
    done = await ctl.revert("vm1")
    assert (done.id, done.status) == (mig.id, "reverted")
    now = ctl.instance_by_name("vm1")
    assert (now.status, now.host, now.flavor.name) == ("SHUTOFF", inst.host, "m1.small")
    assert rig.allocations() == {inst.host: {f"i:{inst.uuid}": inst.flavor.resources()}}
    assert rig.drivers[inst.host].domains[inst.uuid].power_state == ev.SHUTDOWN
    assert rig.audit().ok


@virtual
async def test_cold_migration():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", None)
    assert (mig.migration_type, mig.old_flavor, mig.new_flavor) == (
        "migration", inst.flavor, inst.flavor)
    await ctl.confirm("vm1")
    now = ctl.instance_by_name("vm1")
    assert now.host != inst.host and now.flavor == inst.flavor
    assert rig.audit().ok


@virtual
async def test_disk_shrink_is_refused_and_holds_nothing():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    with pytest.raises(OperationError, match="shrink"):
        await ctl.resize("vm1", "m1.tiny")
    assert rig.allocations() == {inst.host: {f"i:{inst.uuid}": inst.flavor.resources()}}
    assert ctl.instance_by_name("vm1").status == "ACTIVE"
    report = rig.audit()
    assert report.ok and report.open_migrations == 0


# --------------------------------------------------------------------------- scheduling

TOO_SMALL = Resources(1, 1024, 10)      # a destination that refuses m1.medium


@virtual
async def test_reschedule_on_claim_rejected():
    rig = Rig(**four_hosts(host_limits={"h2": TOO_SMALL, "h3": TOO_SMALL}))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    mig = await ctl.resize("vm1", "m1.medium")
    assert (mig.status, mig.source_compute, mig.dest_compute) == ("finished", "h1", "h4")
    chosen = [e.dest for e in rig.controller_events() if isinstance(e, ev.DestinationChosen)]
    assert chosen == ["h2", "h3", "h4"]
    rejected = [env.event for h in ("h2", "h3") for env in rig.logs()[h]
                if isinstance(env.event, ev.ClaimRejected)]
    assert [e.migration_id for e in rejected] == [mig.id, mig.id]
    assert rig.allocations() == {"h1": {f"m:{mig.id}:old": inst.flavor.resources()},
                                 "h4": {f"i:{inst.uuid}": mig.new_flavor.resources()}}


@virtual
async def test_no_valid_host_after_max_attempts_holds_nothing():
    rig = Rig(**four_hosts(host_limits={"h2": TOO_SMALL, "h3": TOO_SMALL}, max_attempts=2))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    with pytest.raises(OperationError, match="no valid host.*2 attempt"):
        await ctl.resize("vm1", "m1.medium")
    assert rig.allocations() == {"h1": {f"i:{inst.uuid}": inst.flavor.resources()}}
    (mig,) = ctl.migrations()
    assert mig.status == "error" and mig.final
    now = ctl.instance_by_name("vm1")
    assert (now.status, now.task_state, now.host) == ("ACTIVE", None, "h1")
    assert rig.audit().ok


@virtual
async def test_no_valid_host_when_nothing_fits():
    cfg = parse(FOUR_HOSTS.replace("m1.medium: {vcpus: 2, memory_mb: 4096",
                                   "m1.medium: {vcpus: 2, memory_mb: 40960"))
    rig = Rig(cfg=cfg)
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    with pytest.raises(OperationError, match="no valid host"):
        await ctl.resize("vm1", "m1.medium")
    assert rig.allocations() == {inst.host: {f"i:{inst.uuid}": inst.flavor.resources()}}


@virtual
async def test_resize_to_a_chosen_host():
    rig = Rig(**four_hosts())
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small", host="h1")
    mig = await ctl.resize("vm1", "m1.medium", host="h3")
    assert mig.dest_compute == "h3"


# --------------------------------------------------------------------------- refusals

@virtual
async def test_refused_operations_raise_operation_error():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    before = rig.allocations()
    with pytest.raises(OperationError, match="no instance named 'ghost'"):
        await ctl.resize("ghost", "m1.medium")
    with pytest.raises(OperationError, match="unknown flavor 'm1.huge'"):
        await ctl.resize("vm1", "m1.huge")
    with pytest.raises(OperationError, match="unknown host"):
        await ctl.resize("vm1", "m1.medium", host="nowhere")
    with pytest.raises(OperationError, match="VERIFY_RESIZE"):
        await ctl.confirm("vm1")
    with pytest.raises(OperationError, match="VERIFY_RESIZE"):
        await ctl.revert("vm1")
    with pytest.raises(OperationError, match="already exists"):
        await ctl.boot("vm1", "m1.tiny")
    with pytest.raises(OperationError, match="unknown flavor"):
        await ctl.boot("vm2", "m1.huge")
    assert rig.allocations() == before


@virtual
async def test_same_host_resize_refused_when_not_allowed():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    with pytest.raises(OperationError, match="same host"):
        await ctl.resize("vm1", "m1.medium", host=inst.host)


@virtual
async def test_resize_while_resizing_is_refused():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    pending = await ctl.resize("vm1", "m1.medium", wait=False)
    assert pending.status == "pre-migrating"
    with pytest.raises(OperationError, match="already in migration"):
        await ctl.resize("vm1", "m1.medium")
    done = await ctl.wait_migration(pending.id)
    assert done.status == "finished"
    with pytest.raises(OperationError):           # finished, waiting for confirm/revert
        await ctl.resize("vm1", "m1.small")


@virtual
async def test_same_request_id_is_one_migration():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    first = await ctl.resize("vm1", "m1.medium", request_id="req-1")
    again = await ctl.resize("vm1", "m1.medium", request_id="req-1")
    assert first.id == again.id
    assert len(ctl.migrations()) == 1
    requested = [e for e in rig.controller_events() if isinstance(e, ev.ResizeRequested)]
    assert len(requested) == 1
    claims = [env for envs in rig.logs().values() for env in envs
              if isinstance(env.event, ev.Claimed)]
    assert len(claims) == 1


@virtual
async def test_same_boot_request_id_is_one_instance():
    rig = Rig()
    ctl = await rig.start()
    one = await ctl.boot("vm1", "m1.small", request_id="b-1")
    two = await ctl.boot("vm1", "m1.small", request_id="b-1")
    assert one.uuid == two.uuid and len(ctl.instances()) == 1


# --------------------------------------------------------------------------- time

@virtual
async def test_auto_confirm_after_the_window():
    rig = Rig(resize_confirm_window_s=30)
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    await asyncio.sleep(20)
    assert ctl.migration(mig.id).status == "finished"
    await asyncio.sleep(20)
    assert ctl.migration(mig.id).status == "confirmed"
    assert ctl.instance_by_name("vm1").status == "ACTIVE"
    assert rig.audit().ok


@virtual
async def test_no_auto_confirm_when_the_window_is_zero():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    await asyncio.sleep(10_000)
    assert ctl.migration(mig.id).status == "finished"


# --------------------------------------------------------------------------- restart

@virtual
async def test_controller_restart_resumes_an_in_flight_migration():
    # Given a migration whose source is busy moving disks (10 virtual seconds a step)
    rig = Rig(**four_hosts(latency={"h1": Latency(base_s=10.0)}))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    pending = await ctl.resize("vm1", "m1.medium", wait=False)
    await asyncio.sleep(15)
    assert ctl.migration(pending.id).status in ("pre-migrating", "migrating")
    # When the controller dies (its tasks vanish) and a new one starts on its log
    for task in ctl.tasks.values():
        task.cancel()
    await asyncio.sleep(0)
    ctl2 = rig.new_controller()
    await ctl2.start()
    # Then it drives the same migration to its end
    done = await ctl2.wait_migration(pending.id)
    assert (done.id, done.status) == (pending.id, "finished")
    assert ctl2.instance_by_name("vm1").status == "VERIFY_RESIZE"
    await ctl2.confirm("vm1")
    assert rig.allocations() == {done.dest_compute: {f"i:{inst.uuid}":
                                                     done.new_flavor.resources()}}
    ended = [e for e in rig.controller_events() if isinstance(e, ev.RequestEnded)
             and e.migration_id == pending.id]
    assert len(ended) == 2          # the resize and the confirm request
    report = rig.audit()
    assert report.ok and report.open_migrations == 0


@pytest.mark.parametrize("page", [3, 5000])
def test_restarted_controller_sees_the_same_views(page, monkeypatch):
    monkeypatch.setattr(controller_module, "PAGE_EVENTS", page)
    _restarted_controller_sees_the_same_views()


@virtual
async def _restarted_controller_sees_the_same_views():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    await ctl.boot("vm2", "m1.tiny", stopped=True)
    await ctl.resize("vm1", "m1.medium")
    ctl2 = rig.new_controller()
    await ctl2.start()
    assert ctl2.instances() == ctl.instances()
    assert ctl2.migrations() == ctl.migrations()
    assert [h.memory_mb_used for h in ctl2.host_infos()] == [
        h.memory_mb_used for h in ctl.host_infos()]
    assert ctl2.view.events == ctl.view.events > 3


# --------------------------------------------------------------------------- broken on purpose

def _plan_without_compensation(ctx, r):
    action = plan(ctx, r)
    if isinstance(action, Send) and isinstance(action.cmd, (c.ReleaseClaim,
                                                            c.RestoreSource)):
        return End(False, f"failed, compensation skipped: {ctx.view.migrations[r.migration_id].reason}")
    return action


class NoCompensation(Controller):
    """A broken controller: after a failure it lets go of nothing."""
    plan = staticmethod(_plan_without_compensation)


@virtual
async def test_broken_controller_leaves_a_migration_that_never_ends():
    rig = Rig(controller_class=NoCompensation)
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    with pytest.raises(OperationError, match="shrink"):
        await ctl.resize("vm1", "m1.tiny")
    (mig,) = ctl.migrations()
    assert mig.status == "error" and not mig.final
    report = rig.audit()
    assert report.open_migrations == 1
    assert rig.allocations()[mig.dest_compute] == {f"m:{mig.id}:new":
                                                   mig.new_flavor.resources()}
    assert inst.host != mig.dest_compute


def test_simulator_liveness_catches_the_broken_controller():
    from vmresize.sim.simulator import SimConfig, Simulator
    seeds = []
    for seed in range(5):
        with tempfile.TemporaryDirectory() as tmp:
            result = Simulator(s.cluster(), SimConfig(seed=seed, hosts=3, instances=6,
                                                      operations=20),
                               f"{tmp}/state", controller_class=NoCompensation).run()
        if any(v.startswith("liveness") for v in result.violation_list):
            seeds.append(seed)
    assert seeds, "no seed among 0..4 showed the stuck migration"


# --------------------------------------------------------------------------- bugs

@virtual
async def test_concurrent_confirm_and_revert_one_is_refused():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    await ctl.resize("vm1", "m1.medium")
    results = await asyncio.gather(ctl.confirm("vm1"), ctl.revert("vm1"),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, OperationError)]
    assert len(refused) == 1, results
    started = {type(env.event).__name__ for envs in rig.logs().values() for env in envs
               if isinstance(env.event, (ev.ConfirmStarted, ev.RevertStarted))}
    assert len(started) == 1, f"both hosts acted: {started}"
    report = rig.audit()
    assert report.ok, report.violations
    assert report.open_migrations == 0


@virtual
async def test_revert_during_auto_confirm_is_refused():
    rig = Rig(resize_confirm_window_s=30,
              latency={h: Latency(base_s=5.0) for h in ("compute-1", "compute-2",
                                                        "compute-3")})
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    await asyncio.sleep(mig.updated_at + 30 - rig.clock() + 1)   # auto-confirm running
    with pytest.raises(OperationError):
        await ctl.revert("vm1")
    await asyncio.sleep(60)
    reverts = [env for envs in rig.logs().values() for env in envs
               if isinstance(env.event, ev.RevertStarted)]
    assert reverts == [], "the destination reverted what the source confirmed"
    report = rig.audit()
    assert report.ok, report.violations


@virtual
async def test_failed_finish_whose_rollback_fails_leaves_no_disk_copy():
    rig = Rig(**four_hosts(faults={"h2": [Fault("finish_migration", "fail"),
                                          Fault("revert_migration_dest", "fail")]}))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    with pytest.raises(OperationError):
        await ctl.resize("vm1", "m1.medium", host="h2")
    assert ctl.instance_by_name("vm1").host == "h1"
    assert rig.allocations() == {"h1": {f"i:{inst.uuid}": inst.flavor.resources()}}
    report = rig.audit()
    assert report.ok, report.violations
    assert inst.uuid not in rig.drivers["h2"].storage.dirs


@virtual
async def test_an_abandoned_revert_leaves_the_instance_in_error_and_refuses_a_resize():
    """The destination's revert cleanup fails every try and is abandoned: the source
    takes the instance back, but the destination may still hold a copy of it, so the
    instance is in error and a new resize or migration (which could land on that copy)
    is refused with its state named, without a command reaching any host."""
    fails = [Fault("revert_migration_dest", "fail", call=n) for n in range(1, 4)]
    rig = Rig(**four_hosts(faults={"h2": fails}, cleanup_attempts=3))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.tiny", host="h1")
    mig = await ctl.resize("vm1", "m1.small", host="h2")
    with pytest.raises(OperationError):
        await ctl.revert("vm1")
    failed = [env.event for env in rig.logs()["h2"] if isinstance(env.event, ev.Failed)]
    assert [(f.step, f.closes) for f in failed] == [("revert", f"{mig.id}:revert")]
    now = ctl.instance_by_name("vm1")
    assert (now.host, now.flavor.name, now.vm_state) == ("h1", "m1.tiny", "error")
    assert rig.view().instances[inst.uuid].vm_state == "error"     # what the logs say
    assert inst.uuid in rig.drivers["h2"].storage.dirs       # the copy left behind
    calls = rig.transport.calls
    for flavor, host in (("m1.small", "h2"), (None, "h2"), (None, None)):
        with pytest.raises(OperationError, match="while it is error"):
            await ctl.resize("vm1", flavor, host=host)
    assert rig.transport.calls == calls
    assert rig.drivers["h2"].data_loss == []
    await ctl.act("vm1", "delete")                  # what an operator can still do
    assert rig.view().instances[inst.uuid].deleted


@virtual
async def test_shared_storage_is_found_by_the_probe():
    rig = Rig(**four_hosts(shared=[("h1", "h2")]))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    mig = await ctl.resize("vm1", "m1.medium", host="h2")
    assert mig.shared_storage
    await ctl.revert("vm1")
    assert rig.drivers["h1"].storage.dirs == {inst.uuid: {"disk": 20}}
    assert rig.audit().ok


@virtual
async def test_failed_probe_on_shared_storage_keeps_the_instance_disks():
    rig = Rig(**four_hosts(shared=[("h1", "h2")],
                           faults={"h1": [Fault("probe_exists", "fail")]}))
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    with pytest.raises(OperationError, match="probe_exists"):
        await ctl.resize("vm1", "m1.medium", host="h2")
    now = ctl.instance_by_name("vm1")
    assert (now.host, now.status) == ("h1", "ACTIVE")
    assert rig.drivers["h1"].domains[inst.uuid].power_state == ev.RUNNING
    assert inst.uuid in rig.drivers["h1"].storage.dirs, "the instance's disks are gone"
