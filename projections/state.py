"""The states the projections build: instances, migrations, host ledgers.

All frozen. These are also the views the CLI and the Python API hand out. They are
`gc=False` (left out of the cycle collector): they hold only strings, numbers, frozen
values and, for a ledger, a dict of those, so they cannot form a cycle, and a projection
of a long history holds hundreds of thousands of them.
"""
from __future__ import annotations

import msgspec

from vmresize.events.schema import Flavor, Resources, ZERO
from vmresize.protocol.states import MigrationStatus, TaskState, VmState

MS = MigrationStatus


class Instance(msgspec.Struct, frozen=True, gc=False):
    uuid: str
    name: str
    host: str
    flavor: Flavor
    vm_state: str
    task_state: str | None
    power_state: int
    version: int
    resources: Resources = ZERO
    migration_id: str = ""
    deleted: bool = False

    @property
    def status(self) -> str:
        return server_status(self)


def server_status(inst: Instance) -> str:
    """Nova's server status from vm_state and task_state."""
    if inst.deleted:
        return "DELETED"
    status = _TASK_STATUS.get(inst.task_state)
    if status is not None and inst.vm_state != VmState.ERROR:
        return status
    return _VM_STATUS.get(inst.vm_state, inst.vm_state.upper())


_VM_STATUS = {VmState.ACTIVE: "ACTIVE", VmState.STOPPED: "SHUTOFF",
              VmState.RESIZED: "VERIFY_RESIZE", VmState.BUILDING: "BUILD",
              VmState.ERROR: "ERROR", VmState.DELETED: "DELETED"}
# Task states that show as their own status (Nova's _STATE_MAP).
_TASK_STATUS = {TaskState.RESIZE_PREP: "RESIZE", TaskState.RESIZE_MIGRATING: "RESIZE",
                TaskState.RESIZE_MIGRATED: "RESIZE", TaskState.RESIZE_FINISH: "RESIZE",
                TaskState.RESIZE_REVERTING: "REVERT_RESIZE",
                TaskState.REBOOTING: "REBOOT", TaskState.REBOOTING_HARD: "HARD_REBOOT"}


class Migration(msgspec.Struct, frozen=True, gc=False):
    id: str
    instance_uuid: str
    source_compute: str
    dest_compute: str
    status: str
    migration_type: str
    old_flavor: Flavor
    new_flavor: Flavor
    created_at: float
    updated_at: float
    old_resources: Resources = ZERO
    new_resources: Resources = ZERO
    vm_state: str = "active"           # the instance's vm_state before the migration
    shared_storage: bool = False
    disk_migrated: bool = False        # the disks left the source
    resize_dir: bool = False           # a `<uuid>_resize` dir exists on the source
    dest_copy: bool = False            # a destination copy exists that is not the instance's
    source_started: bool = False       # the source moved its allocation to the migration
    source_settled: bool = False       # the source holds nothing for the migration any more
    dest_settled: bool = False         # neither does the destination
    dest_reverted: bool = False        # the destination released the instance (revert)
    claim_ready: bool = True           # the destination's claim step (probe) is done
    failed_step: str = ""
    reason: str = ""
    version: int = 0                   # instance version of the last event applied

    @property
    def final(self) -> bool:
        """Ended, compensations included: nothing more will happen to it."""
        return migration_final(self)


def migration_final(m) -> bool:
    """`Migration.final`, for a migration or the fold's mutable record of one."""
    if m.status in (MS.CONFIRMED, MS.REVERTED):
        return True
    return (m.status == MS.ERROR and m.dest_settled
            and (m.source_settled or not m.source_started))


class Ledger(msgspec.Struct, frozen=True, gc=False):
    """One host's allocations by key (see events.schema) and their sum."""
    host: str
    allocations: dict[str, Resources] = {}
    used: Resources = ZERO
    capacity: Resources = ZERO
    limit: Resources = ZERO
    driver: str = ""


def instance_key(uuid: str) -> str:
    return "i:" + uuid


def claim_key(migration_id: str) -> str:
    return "m:" + migration_id + ":new"


def source_key(migration_id: str) -> str:
    return "m:" + migration_id + ":old"
