"""FakeDriver specifics: what it records for a simulator (data loss), its fault plan and
its saved state. The behaviour it shares with the libvirt driver is in
test_driver_contract.py."""
from __future__ import annotations

import asyncio

import pytest

from vmresize.drivers.base import DriverError, InstanceSpec
from vmresize.drivers.fake import FakeDriver, Fault, FaultPlan, HostCrashed
from vmresize.events.schema import RUNNING, Flavor, Resources

UUID = "3c2b1a09-8f7e-4d6c-9b5a-4f3e2d1c0b9a"
CAP = Resources(vcpus=16, memory_mb=32768, disk_gb=500)
BIG = Flavor("m1.big", vcpus=2, memory_mb=1024, root_gb=4, ephemeral_gb=2, swap_mb=2048)
SMALLER_ROOT = Flavor("m1.r", vcpus=2, memory_mb=1024, root_gb=3, ephemeral_gb=2)
NO_EPHEMERAL = Flavor("m1.e", vcpus=2, memory_mb=1024, root_gb=4, ephemeral_gb=0,
                      swap_mb=1024)
BIGGER = Flavor("m1.bigger", vcpus=4, memory_mb=2048, root_gb=8, ephemeral_gb=4)


def spec(flavor: Flavor) -> InstanceSpec:
    return InstanceSpec(uuid=UUID, name="vm-1", flavor=flavor)


def run(coro):
    return asyncio.run(coro)


async def resize(src: FakeDriver, dst: FakeDriver, old: Flavor, new: Flavor,
                 times: int = 1) -> None:
    disks = await src.migrate_disk_and_power_off(spec(old), new, False, None)
    for _ in range(times):
        await dst.finish_migration(spec(new), disks, False, True)


# --------------------------------------------------------------------------- data loss

@pytest.mark.parametrize("new, lost", [
    (SMALLER_ROOT, ["disk shrunk from 4 to 3 GiB"]),
    (NO_EPHEMERAL, ["disk.local shrunk from 2 to 0 GiB"]),
], ids=["root", "ephemeral"])
def test_a_shrink_placed_by_finish_is_recorded_as_data_loss(new, lost):
    a, b = FakeDriver("a", CAP), FakeDriver("b", CAP)
    run(a.spawn(spec(BIG), True))
    run(resize(a, b, BIG, new, times=2))             # a retried finish records it once
    assert b.data_loss == [f"b: instance vm-1 ({UUID}) {line}" for line in lost]
    assert a.data_loss == []
    placed = {d.name: d.virtual_gb for d in run(b.disk_info(UUID))}
    assert placed == {n: gb for n, gb in (("disk", new.root_gb),
                                          ("disk.local", new.ephemeral_gb),
                                          ("disk.swap", -(-new.swap_mb // 1024))) if gb}


def test_a_shrink_on_shared_storage_is_recorded_too():
    a = FakeDriver("a", CAP)
    run(a.spawn(spec(BIG), True))
    disks = run(a.migrate_disk_and_power_off(spec(BIG), SMALLER_ROOT, True, None))
    run(a.finish_migration(spec(SMALLER_ROOT), disks, True, True))
    assert a.data_loss == [f"a: instance vm-1 ({UUID}) disk shrunk from 4 to 3 GiB"]


def test_growing_and_a_smaller_swap_lose_nothing():
    a, b = FakeDriver("a", CAP), FakeDriver("b", CAP)
    run(a.spawn(spec(BIG), True))
    run(resize(a, b, BIG, BIGGER))                   # swap 2 GiB -> none: scratch space
    assert b.data_loss == []
    assert {d.name: d.virtual_gb for d in run(b.disk_info(UUID))} == {"disk": 8,
                                                                     "disk.local": 4}


def test_data_loss_survives_a_restart(tmp_path):
    path = str(tmp_path / "b.json")
    a, b = FakeDriver("a", CAP), FakeDriver("b", CAP, state_path=path)
    run(a.spawn(spec(BIG), True))
    run(resize(a, b, BIG, SMALLER_ROOT))
    again = FakeDriver("b", CAP, state_path=path)
    assert again.data_loss == b.data_loss and len(again.data_loss) == 1


# --------------------------------------------------------------------------- faults and state

def test_the_fault_plan_covers_reboot(tmp_path):
    path = str(tmp_path / "a.json")
    plan = FaultPlan(exact=[Fault("reboot", "fail", call=1),
                            Fault("reboot", "crash", call=2, when="before"),
                            Fault("reboot", "crash", call=3, when="after")])
    a = FakeDriver("a", CAP, faults=plan, state_path=path)
    run(a.spawn(spec(BIG), True))
    with pytest.raises(DriverError, match="injected failure in reboot"):
        run(a.reboot(UUID, hard=False))
    with pytest.raises(HostCrashed):
        run(a.reboot(UUID, hard=False))
    assert a.domains[UUID].boots == 1, "neither the failure nor the early crash rebooted"
    with pytest.raises(HostCrashed):
        run(a.reboot(UUID, hard=True))
    # The restarted host finds the reboot done, and the fired faults do not fire again.
    again = FakeDriver("a", CAP, faults=plan, state_path=path)
    assert (again.domains[UUID].boots, again.domains[UUID].power_state) == (2, RUNNING)
    run(again.reboot(UUID, hard=True))
    assert again.domains[UUID].boots == 3
    assert a.injected == {"fail": 1, "crash": 2}


@pytest.mark.parametrize("fields, field", [
    (dict(step="rebot", action="fail"), "Fault.step"),
    (dict(step="reboot", action="explode"), "Fault.action"),
    (dict(step="reboot", action="crash", when="during"), "Fault.when"),
    (dict(step="reboot", action="fail", call=0), "Fault.call"),
])
def test_a_bad_fault_names_its_field(fields, field):
    with pytest.raises(ValueError, match=field):
        Fault(**fields)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True])
def test_a_bad_timeout_names_its_field(bad):
    a = FakeDriver("a", CAP)
    run(a.spawn(spec(BIG), True))
    with pytest.raises(ValueError, match="timeout_s"):
        run(a.power_off(UUID, timeout_s=bad))
    with pytest.raises(ValueError, match="timeout_s"):
        run(a.reboot(UUID, hard=False, timeout_s=bad))
    assert a.domains[UUID].power_state == RUNNING and a.domains[UUID].boots == 1
