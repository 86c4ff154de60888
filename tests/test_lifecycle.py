"""The rest of the lifecycle (stop, start, reboot, delete) through the controller, the
host shells and FakeDrivers, on the virtual-time loop.

Given an instance in some state, when an operator stops, starts, reboots or deletes it,
then the events say so, the views say so, nothing stays held on any host (ledgers,
domains, disks, `_resize` directories) and the auditor finds nothing wrong.
"""
from __future__ import annotations

import asyncio

import pytest

from test_controller import Rig, four_hosts, virtual
from vmresize.actors.controller import OperationError
from vmresize.drivers.fake import Latency
from vmresize.events import schema as ev
from vmresize.protocol.states import RUNNING, SHUTDOWN


def host_events(rig, uuid: str) -> list[str]:
    out = []
    for envs in rig.logs().values():
        out += [(e.event.instance_version, type(e.event).__name__) for e in envs
                if getattr(e.event, "instance_uuid", "") == uuid]
    return [name for _, name in sorted(out)]


def leftovers(rig, uuid: str) -> list[str]:
    """Anything of the instance a hypervisor or a ledger still holds."""
    left = []
    for name, driver in rig.drivers.items():
        if uuid in driver.domains:
            left.append(f"{name}: domain")
        for d in driver.storage.dirs:
            if d.startswith(uuid):
                left.append(f"{name}: dir {d}")
    for host, allocs in rig.allocations().items():
        left += [f"{host}: {k}" for k in allocs if uuid in k]
    return left


@virtual
async def test_stop_start_reboot_emit_their_events_and_keep_the_ledger():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    stopped = await ctl.act("vm1", "stop")
    assert (stopped.status, stopped.power_state, stopped.task_state) == (
        "SHUTOFF", SHUTDOWN, None)
    assert rig.drivers[inst.host].domains[inst.uuid].power_state == SHUTDOWN
    started = await ctl.act("vm1", "start")
    assert (started.status, started.power_state) == ("ACTIVE", RUNNING)
    rebooted = await ctl.act("vm1", "reboot", hard=True)
    assert rebooted.status == "ACTIVE"
    assert host_events(rig, inst.uuid) == [
        "SpawnStarted", "Spawned", "PowerOffStarted", "PoweredOff", "PowerOnStarted",
        "PoweredOn", "RebootStarted", "Rebooted"]
    hard = [e.event for e in rig.logs()[inst.host] if isinstance(e.event, ev.RebootStarted)]
    assert [e.hard for e in hard] == [True]
    assert rig.allocations() == {inst.host: {f"i:{inst.uuid}": inst.flavor.resources()}}
    assert rig.audit().ok


@virtual
async def test_stop_of_a_stopped_and_start_of_a_running_instance_change_nothing():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", stopped=True)
    before = host_events(rig, inst.uuid)
    assert (await ctl.act("vm1", "stop")).status == "SHUTOFF"
    await ctl.act("vm1", "start")
    assert (await ctl.act("vm1", "start")).status == "ACTIVE"
    assert host_events(rig, inst.uuid) == before + ["PowerOnStarted", "PoweredOn"]


@virtual
async def test_refused_operations_name_the_state_and_hold_nothing():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small", stopped=True)
    with pytest.raises(OperationError, match="stopped"):
        await ctl.act("vm1", "reboot")
    await ctl.resize("vm1", "m1.medium")
    for action in ("start", "stop", "reboot"):
        with pytest.raises(OperationError, match="resized|migration"):
            await ctl.act("vm1", action)
    await ctl.act("vm1", "delete")
    with pytest.raises(OperationError, match="no instance named 'vm1'"):
        await ctl.resize("vm1", "m1.small")
    with pytest.raises(OperationError, match="no instance named 'vm1'"):
        await ctl.act("vm1", "start")
    assert rig.allocations() == {}
    assert rig.audit().ok


@virtual
async def test_a_stopped_instance_resized_stays_stopped_and_starts_with_its_new_flavor():
    rig = Rig()
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small", stopped=True)
    await ctl.resize("vm1", "m1.medium")
    await ctl.confirm("vm1")
    inst = ctl.instance_by_name("vm1")
    assert (inst.status, inst.flavor.name) == ("SHUTOFF", "m1.medium")
    started = await ctl.act("vm1", "start")
    assert (started.status, started.flavor.name, started.host) == (
        "ACTIVE", "m1.medium", inst.host)
    assert rig.drivers[inst.host].domains[inst.uuid].power_state == RUNNING
    assert rig.audit().ok


@virtual
async def test_delete_releases_everything_and_frees_the_name():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    gone = await ctl.act("vm1", "delete")
    assert gone.deleted and gone.status == "DELETED"
    assert host_events(rig, inst.uuid)[-2:] == ["DeleteStarted", "Deleted"]
    assert leftovers(rig, inst.uuid) == []
    assert [i.name for i in ctl.instances()] == []
    again = await ctl.boot("vm1", "m1.small")
    assert again.uuid != inst.uuid and ctl.instance_by_name("vm1").uuid == again.uuid
    assert rig.audit().ok


@virtual
async def test_delete_in_verify_resize_confirms_first():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium")
    await ctl.act("vm1", "delete")
    assert ctl.migration(mig.id).status == "confirmed"
    events = host_events(rig, inst.uuid)
    assert events.index("Confirmed") < events.index("DeleteStarted")
    assert leftovers(rig, inst.uuid) == []
    assert rig.audit().ok and rig.audit().open_migrations == 0


# (delay before the delete, the steps that must have run: the rollback that fits)
UNDER_WAY = [
    (0.0, ["Spawned", "DeleteStarted", "Deleted"]),                 # before any claim
    (0.02, ["ProbeCreated", "ReleaseStarted", "ClaimReleased", "DeleteStarted"]),
    (0.1, ["DiskMigrated", "ReleaseStarted", "ClaimReleased", "RestoreStarted",
           "SourceRestored", "DeleteStarted"]),                     # disks moved: restore
    (0.2, ["Finished", "ConfirmStarted", "Confirmed", "DeleteStarted"]),   # VERIFY_RESIZE
]


@pytest.mark.parametrize("delay_s,steps", UNDER_WAY)
@virtual
async def test_delete_while_a_resize_is_under_way_rolls_it_back_first(delay_s, steps):
    rig = Rig(latency={"h1": Latency(0.05, 0.0), "h2": Latency(0.05, 0.0)}, **four_hosts())
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small", host="h1")
    resize = asyncio.ensure_future(ctl.resize("vm1", "m1.medium"))
    await asyncio.sleep(delay_s)
    await ctl.act("vm1", "delete")
    try:
        await resize
    except OperationError as exc:
        assert "deleted" in str(exc)
    (mig,) = ctl.migrations()
    assert mig.final, mig
    events = host_events(rig, inst.uuid)
    assert [e for e in events if e in steps] == steps, events
    assert events[-2:] == ["DeleteStarted", "Deleted"]
    assert leftovers(rig, inst.uuid) == []
    report = rig.audit()
    assert report.ok and report.open_migrations == 0, report.violations
