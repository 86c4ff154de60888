"""The hypervisor driver contract every driver implements, and its exception tree.

Every method is a coroutine and idempotent: called again after a crash at any point it
converges to the same end state (a second `spawn` of a spawned instance does nothing, a
second `confirm_migration` after the `_resize` directory is gone does nothing). The host
shell calls a driver only between an intent event and its outcome event.

Exceptions (all raised by drivers, turned into `Failed` events by the host shell only):

    DriverError                  any failure of the hypervisor or its disks
    ├── DriverTimeout            a step took longer than `step_timeout_s`
    ├── InstanceNotFound         the hypervisor does not know the instance
    ├── InstanceNotRunning       reboot of an instance that is stopped
    └── DiskError                qemu-img, a full disk, a missing or corrupt image,
                                 a transport checksum that kept failing
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import msgspec

from vmresize.events.schema import DiskInfo, Flavor, Resources


class DriverError(Exception):
    """A driver step failed; `str()` carries the cause (stderr of a tool, libvirt's text)."""


class DriverTimeout(DriverError):
    pass


class InstanceNotFound(DriverError):
    pass


class InstanceNotRunning(DriverError):
    pass


class DiskError(DriverError):
    pass


class InstanceSpec(msgspec.Struct, frozen=True):
    """What a driver needs to know of an instance to build its domain and disks."""
    uuid: str
    name: str
    flavor: Flavor
    image: str = ""          # base image path (libvirt); empty: a blank disk


@runtime_checkable
class DiskSink(Protocol):
    """Where the source sends disk files that must reach the destination host.

    `send_file` streams one local file to `rel_path` under the destination's instances
    path (for example `<uuid>/disk`); it returns only when the destination holds the
    whole file under its final name. Only needed when storage is not shared.
    """

    async def send_file(self, src_path: str, rel_path: str) -> int: ...


class Driver(Protocol):
    """One compute host's hypervisor. `name` is the host's name."""

    name: str

    def capacity(self) -> Resources:
        """What the hypervisor offers, before allocation ratios and reserved."""

    def overhead(self, flavor: Flavor) -> Resources:
        """Extra resources an instance of this flavor costs on this host."""

    async def spawn(self, instance: InstanceSpec, power_on: bool) -> tuple[DiskInfo, ...]:
        ...

    async def power_on(self, uuid: str) -> None:
        """Boot the defined domain from the same disks. Running already is fine."""

    async def power_off(self, uuid: str, timeout_s: float = 60.0) -> None:
        """Ask the guest to shut down (ACPI), wait up to `timeout_s` for it to stop, then
        force it off. Stopped already is fine; the domain stays defined."""

    async def reboot(self, uuid: str, hard: bool, timeout_s: float = 60.0) -> None:
        """Restart a running instance on the same disks. Soft: the guest shuts down
        cleanly and boots again, and one that has not stopped within `timeout_s` is
        rebooted hard. Hard: forced off and on at once. A stopped instance is refused
        with `InstanceNotRunning`: a reboot never starts what was stopped."""

    async def disk_info(self, uuid: str) -> tuple[DiskInfo, ...]: ...

    async def create_probe(self, probe: str) -> None:
        """Destination: create the shared-storage probe file `probe`."""

    async def probe_exists(self, probe: str) -> bool:
        """Source: does this host see the destination's probe file?"""

    async def remove_probe(self, probe: str) -> None: ...

    async def migrate_disk_and_power_off(self, instance: InstanceSpec, new_flavor: Flavor,
                                         shared_storage: bool,
                                         sink: DiskSink | None) -> tuple[DiskInfo, ...]:
        """Source: power off, rename the instance dir to `<dir>_resize`, flatten and
        send (or, on shared storage, leave) the disks. Whether the new flavor may have
        smaller disks is the protocol's rule, decided before this is called."""

    async def finish_migration(self, instance: InstanceSpec, disks: tuple[DiskInfo, ...],
                               shared_storage: bool, power_on: bool) -> None:
        """Destination: grow disks to `instance.flavor`, define the domain, power on
        unless the instance was stopped."""

    async def confirm_migration(self, uuid: str, shared_storage: bool) -> None:
        """Source: remove `<dir>_resize` and the source domain."""

    async def revert_migration_dest(self, uuid: str, shared_storage: bool) -> None:
        """Destination: destroy the domain; remove the disk copy unless storage is shared."""

    async def finish_revert_migration(self, instance: InstanceSpec, power_on: bool) -> None:
        """Source: rename `<dir>_resize` back, define the old domain, power on unless
        the instance was stopped."""

    async def destroy(self, uuid: str) -> None:
        """Delete the instance from this host: the domain forced off and undefined, then
        every file of it: its directory, its `_resize` directory, any disk copy (whole
        or partial). Gone already is fine."""


def check_timeout(timeout_s: float) -> float:
    """A wait bound given to a driver method: a finite number of seconds, zero or more."""
    number = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
    if not (number and 0 <= timeout_s < math.inf):
        raise ValueError(f"timeout_s must be a finite number of seconds >= 0, "
                         f"got {timeout_s!r}")
    return float(timeout_s)
