"""FakeDriver: an in-memory hypervisor with the same contract as the libvirt driver.

It models what matters to the resize protocol: domains (flavor, power state), instance
directories and their disks on a storage pool (`FakeStorage`; two drivers that share one
pool share storage, so the probe finds it), the `<uuid>_resize` directory, and probe
files. Every method is idempotent and decides from the state it finds, never from a
flag saying "already done". A seeded `FaultPlan` makes any step fail, hang or crash the
host, by probability or at an exact call; a latency model makes steps take time on
whatever clock `sleep` runs on (virtual in the simulator, real on Ray).

A disk that `finish_migration` places smaller than it was is data the guest lost: the
fake does as it is told and records it in `data_loss`, for a simulator to report as a
violation (the protocol must refuse a shrink before any driver sees it).

With `state_path` the pool and domains are saved to that file after every change, so a
host process that is killed and restarted finds its "hypervisor" as it left it.
"""
from __future__ import annotations

import asyncio
import os
import random
from typing import Awaitable, Callable

import msgspec

from vmresize.drivers.base import (DriverError, InstanceNotFound, InstanceNotRunning,
                                   InstanceSpec, check_timeout)
from vmresize.events.schema import RUNNING, SHUTDOWN, DiskInfo, Flavor, Resources, ZERO

STEPS = ("spawn", "power_on", "power_off", "reboot", "create_probe", "probe_exists",
         "migrate_disk_and_power_off", "finish_migration", "confirm_migration",
         "revert_migration_dest", "finish_revert_migration", "destroy")

FAIL, HANG, CRASH = "fail", "hang", "crash"
WHEN = ("", "before", "after")


class HostCrashed(BaseException):
    """Raised by the default crash hook: the host process is gone. A BaseException so
    that no `except Exception` in the shell mistakes it for a step failure."""


class Fault(msgspec.Struct, frozen=True):
    step: str          # a name from STEPS
    action: str        # fail | hang | crash
    call: int = 1      # the n-th call of that step on this driver (1-based)
    when: str = ""     # crash: "before" or "after" the step's effect; "" = either

    def __post_init__(self) -> None:
        for field, value, allowed in (("step", self.step, STEPS),
                                      ("action", self.action, (FAIL, HANG, CRASH)),
                                      ("when", self.when, WHEN)):
            if value not in allowed:
                names = ", ".join(map(repr, allowed))
                raise ValueError(f"Fault.{field} must be one of {names}, got {value!r}")
        if self.call < 1:
            raise ValueError(f"Fault.call must be 1 or more (the n-th call), got {self.call}")


class FaultPlan(msgspec.Struct):
    """Which driver calls go wrong. Probabilities apply to every step; `exact` faults
    fire once, at the n-th call of their step."""
    seed: int = 0
    fail_p: float = 0.0
    hang_p: float = 0.0
    crash_p: float = 0.0
    exact: list[Fault] = []

    def heal(self) -> None:
        self.fail_p = self.hang_p = self.crash_p = 0.0
        self.exact = []


class Latency(msgspec.Struct, frozen=True):
    base_s: float = 0.0
    jitter_s: float = 0.0


class FakeStorage(msgspec.Struct):
    """A storage pool: instance directories (name -> {disk name: virtual GiB}) and probes."""
    dirs: dict[str, dict[str, int]] = {}
    probes: list[str] = []


class FakeDomain(msgspec.Struct):
    flavor: Flavor
    power_state: int = SHUTDOWN
    resize_source: bool = False    # left behind by migrate_disk_and_power_off
    boots: int = 0                 # times started (power on, reboot): a reboot shows


def _new_domain(flavor: Flavor, power_on: bool) -> FakeDomain:
    return FakeDomain(flavor, RUNNING if power_on else SHUTDOWN, boots=int(power_on))


class _Saved(msgspec.Struct):
    storage: FakeStorage
    domains: dict[str, FakeDomain]
    calls: dict[str, int] = {}      # calls per step, so an exact fault fires only once
    data_loss: list[str] = []


def _disks_for(flavor: Flavor) -> dict[str, int]:
    disks = {"disk": flavor.root_gb}
    if flavor.ephemeral_gb:
        disks["disk.local"] = flavor.ephemeral_gb
    if flavor.swap_mb:
        disks["disk.swap"] = -(-flavor.swap_mb // 1024)
    return disks


# Disks whose content is the guest's data (swap is scratch: shrinking it loses nothing).
DATA_DISKS = ("disk", "disk.local")


def _info(disks: dict[str, int], folder: str) -> tuple[DiskInfo, ...]:
    return tuple(DiskInfo(name=n, virtual_gb=gb, path=f"{folder}/{n}")
                 for n, gb in sorted(disks.items()))


class FakeDriver:
    def __init__(self, name: str, capacity: Resources, *, overhead: Resources = ZERO,
                 storage: FakeStorage | None = None, faults: FaultPlan | None = None,
                 latency: Latency = Latency(), sleep: Callable[[float], Awaitable] = None,
                 on_crash: Callable[[], None] | None = None, state_path: str | None = None,
                 rng: random.Random | None = None):
        self.name = name
        self._capacity = capacity
        self._overhead = overhead
        self.faults = faults or FaultPlan()
        self.latency = latency
        self._sleep = sleep or asyncio.sleep
        self._on_crash = on_crash or self._raise_crash
        self._state_path = state_path
        self._rng = rng or random.Random(self.faults.seed)
        self.injected: dict[str, int] = {}
        saved = self._load()
        self.storage = storage if storage is not None else saved.storage
        self.domains: dict[str, FakeDomain] = saved.domains
        self._calls = dict(saved.calls)
        self.data_loss: list[str] = list(saved.data_loss)

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _raise_crash() -> None:
        raise HostCrashed()

    def _load(self) -> _Saved:
        if self._state_path and os.path.exists(self._state_path):
            with open(self._state_path, "rb") as f:
                return msgspec.json.decode(f.read(), type=_Saved)
        return _Saved(storage=FakeStorage(), domains={})

    def _save(self) -> None:
        if not self._state_path:
            return
        # Write, then rename: a killed host process (the crash this models) finds the
        # old state or the new one, never half of one. No fsync: the page cache outlives
        # the process, and this is a fake hypervisor, not the log.
        tmp = self._state_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(_Saved(self.storage, self.domains, self._calls,
                                               self.data_loss)))
        os.replace(tmp, self._state_path)

    def _fault_for(self, step: str) -> str | None:
        n = self._calls[step] = self._calls.get(step, 0) + 1
        for fault in self.faults.exact:
            if fault.step == step and fault.call == n:
                self._save()     # a restarted host must not fire it again
                return fault.action + (":" + fault.when if fault.when else "")
        plan = self.faults
        if not (plan.fail_p or plan.hang_p or plan.crash_p):
            return None
        roll = self._rng.random()
        for action, p in ((FAIL, plan.fail_p), (HANG, plan.hang_p), (CRASH, plan.crash_p)):
            if roll < p:
                return action
            roll -= p
        return None

    async def _step(self, step: str) -> bool:
        """Apply latency and the fault plan before a step's effect. Returns whether a
        crash should follow the effect (a crash either before or after it)."""
        action = self._fault_for(step)
        if self.latency.base_s or self.latency.jitter_s:
            await self._sleep(self.latency.base_s + self._rng.random() * self.latency.jitter_s)
        if action is None:
            return False
        kind = action.partition(":")[0]
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if action == FAIL:
            raise DriverError(f"{self.name}: injected failure in {step}")
        if action == HANG:
            await self._sleep(10 ** 9)
            return False
        when = action.partition(":")[2] or ("before" if self._rng.random() < 0.5 else "after")
        if when == "before":
            self._on_crash()
            return False
        return True

    def _finish(self, crash_after: bool) -> None:
        self._save()
        if crash_after:
            self._on_crash()

    # ------------------------------------------------------------------ resources

    def capacity(self) -> Resources:
        return self._capacity

    def overhead(self, flavor: Flavor) -> Resources:
        return self._overhead

    # ------------------------------------------------------------------ lifecycle

    async def spawn(self, instance: InstanceSpec, power_on: bool) -> tuple[DiskInfo, ...]:
        crash = await self._step("spawn")
        dirs = self.storage.dirs
        if instance.uuid not in dirs:
            dirs[instance.uuid] = _disks_for(instance.flavor)
        if instance.uuid not in self.domains:
            self.domains[instance.uuid] = _new_domain(instance.flavor, power_on)
        self._finish(crash)
        return _info(dirs[instance.uuid], instance.uuid)

    async def power_on(self, uuid: str) -> None:
        crash = await self._step("power_on")
        domain = self._domain(uuid)
        if domain.power_state != RUNNING:
            domain.power_state = RUNNING
            domain.boots += 1
        self._finish(crash)

    async def power_off(self, uuid: str, timeout_s: float = 60.0) -> None:
        check_timeout(timeout_s)
        crash = await self._step("power_off")
        self._domain(uuid).power_state = SHUTDOWN
        self._finish(crash)

    async def reboot(self, uuid: str, hard: bool, timeout_s: float = 60.0) -> None:
        """Soft or hard is one step here: the fake guest always obeys."""
        check_timeout(timeout_s)
        crash = await self._step("reboot")
        domain = self._domain(uuid)
        if domain.power_state != RUNNING:
            raise InstanceNotRunning(f"{self.name}: instance {uuid} is not running, "
                                     f"refusing to reboot it")
        domain.boots += 1
        self._finish(crash)

    def _domain(self, uuid: str) -> FakeDomain:
        try:
            return self.domains[uuid]
        except KeyError:
            raise InstanceNotFound(f"{self.name}: no domain {uuid}") from None

    async def disk_info(self, uuid: str) -> tuple[DiskInfo, ...]:
        for folder in (uuid, uuid + "_resize"):
            if folder in self.storage.dirs:
                return _info(self.storage.dirs[folder], folder)
        raise InstanceNotFound(f"{self.name}: no disks for {uuid}")

    async def destroy(self, uuid: str) -> None:
        crash = await self._step("destroy")
        self.domains.pop(uuid, None)
        self.storage.dirs.pop(uuid, None)
        self.storage.dirs.pop(uuid + "_resize", None)
        self._finish(crash)

    # ------------------------------------------------------------------ shared storage probe

    async def create_probe(self, probe: str) -> None:
        crash = await self._step("create_probe")
        if probe not in self.storage.probes:
            self.storage.probes.append(probe)
        self._finish(crash)

    async def probe_exists(self, probe: str) -> bool:
        await self._step("probe_exists")
        return probe in self.storage.probes

    async def remove_probe(self, probe: str) -> None:
        if probe in self.storage.probes:
            self.storage.probes.remove(probe)
            self._save()

    # ------------------------------------------------------------------ resize, source side

    async def migrate_disk_and_power_off(self, instance, new_flavor, shared_storage, sink):
        crash = await self._step("migrate_disk_and_power_off")
        uuid, dirs = instance.uuid, self.storage.dirs
        resize_dir = uuid + "_resize"
        if resize_dir not in dirs:
            if uuid not in dirs:
                raise InstanceNotFound(f"{self.name}: no disks for {uuid}")
            dirs[resize_dir] = dirs.pop(uuid)
        domain = self.domains.get(uuid)
        if domain is not None and not domain.resize_source:
            domain.power_state = SHUTDOWN
            domain.resize_source = True
        self._finish(crash)
        return _info(dirs[resize_dir], resize_dir)

    async def confirm_migration(self, uuid: str, shared_storage: bool) -> None:
        crash = await self._step("confirm_migration")
        self.storage.dirs.pop(uuid + "_resize", None)
        domain = self.domains.get(uuid)
        if domain is not None and domain.resize_source:
            del self.domains[uuid]
        self._finish(crash)

    async def finish_revert_migration(self, instance: InstanceSpec, power_on: bool) -> None:
        crash = await self._step("finish_revert_migration")
        uuid, dirs = instance.uuid, self.storage.dirs
        if uuid + "_resize" in dirs:
            dirs.pop(uuid, None)
            dirs[uuid] = dirs.pop(uuid + "_resize")
        if uuid not in dirs:
            raise InstanceNotFound(f"{self.name}: neither {uuid} nor its _resize dir exist")
        domain = self.domains.get(uuid)
        if domain is None or domain.resize_source or domain.flavor != instance.flavor:
            self.domains[uuid] = _new_domain(instance.flavor, power_on)
        self._finish(crash)

    # ------------------------------------------------------------------ resize, destination side

    async def finish_migration(self, instance: InstanceSpec, disks: tuple[DiskInfo, ...],
                               shared_storage: bool, power_on: bool) -> None:
        crash = await self._step("finish_migration")
        uuid, dirs = instance.uuid, self.storage.dirs
        if uuid not in dirs:
            dirs[uuid] = {d.name: d.virtual_gb for d in disks}
        self._place_disks(instance, dirs[uuid])
        domain = self.domains.get(uuid)
        if domain is None or domain.resize_source:
            self.domains[uuid] = _new_domain(instance.flavor, power_on)
        self._finish(crash)

    def _place_disks(self, instance: InstanceSpec, have: dict[str, int]) -> None:
        """Give every disk the size `instance.flavor` asks for, as told. A retried call
        finds them placed already, so a loss is recorded once."""
        want = _disks_for(instance.flavor)
        for name in sorted(set(have) | set(want)):
            old_gb, new_gb = have.get(name, 0), want.get(name, 0)
            if new_gb < old_gb and name in DATA_DISKS:
                self.data_loss.append(
                    f"{self.name}: instance {instance.name} ({instance.uuid}) {name} "
                    f"shrunk from {old_gb} to {new_gb} GiB")
            if new_gb:
                have[name] = new_gb
            else:
                del have[name]

    async def revert_migration_dest(self, uuid: str, shared_storage: bool) -> None:
        crash = await self._step("revert_migration_dest")
        domain = self.domains.get(uuid)
        if domain is not None and not domain.resize_source:
            del self.domains[uuid]
        if uuid + "_resize" in self.storage.dirs or not shared_storage:
            # Shared storage keeps the copy only when nothing else would restore it.
            self.storage.dirs.pop(uuid, None)
        self._finish(crash)
