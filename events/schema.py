"""The event schema: what hosts and the controller append to their logs.

Two tagged unions, one per kind of log: `HostEvent` (a compute host's log) and
`ControllerEvent` (the controller's log). Every record is an `Envelope`. Schema evolution
follows msgspec's rules: new fields go last with defaults, a field never changes type,
a tag is never reused. `SCHEMA_VERSION` is written in every envelope; a reader refuses a
version it does not know.

Host events, envelopes and the values in them are `gc=False`: frozen values built from
decoded data cannot form reference cycles, and leaving millions of them out of the cycle
collector's reach is what keeps a replay from spending most of its time in it.

Allocation keys in a host's ledger (see projections.ledger):
  "i:<uuid>"          the instance's home allocation,
  "m:<id>:new"        a migration's claim on its destination (until Finished),
  "m:<id>:old"        the source's allocation while a migration owns it.
"""
from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Resources(msgspec.Struct, frozen=True, array_like=True, gc=False):
    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(self.vcpus + other.vcpus, self.memory_mb + other.memory_mb,
                         self.disk_gb + other.disk_gb)

    def __sub__(self, other: "Resources") -> "Resources":
        return Resources(self.vcpus - other.vcpus, self.memory_mb - other.memory_mb,
                         self.disk_gb - other.disk_gb)

    def fits_in(self, limit: "Resources") -> bool:
        return (self.vcpus <= limit.vcpus and self.memory_mb <= limit.memory_mb
                and self.disk_gb <= limit.disk_gb)


ZERO = Resources()


class Flavor(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int = 0
    swap_mb: int = 0

    def resources(self, overhead: Resources = ZERO) -> Resources:
        swap_gb = -(-self.swap_mb // 1024)
        return Resources(self.vcpus, self.memory_mb,
                         self.root_gb + self.ephemeral_gb + swap_gb) + overhead


class DiskInfo(msgspec.Struct, frozen=True, gc=False):
    """One disk of an instance as the driver reports it."""
    name: str            # "disk", "disk.local", "disk.swap"
    virtual_gb: int
    path: str = ""
    format: str = "qcow2"
    backing_file: str = ""


from vmresize.protocol.states import RUNNING, SHUTDOWN  # noqa: E402  Nova's power ints


# --------------------------------------------------------------------------- host events

class HostEventBase(msgspec.Struct, frozen=True, tag_field="type", kw_only=True,
                    gc=False):
    command_id: str = ""


class InstanceEvent(HostEventBase, frozen=True, kw_only=True):
    instance_uuid: str
    instance_version: int


class MigrationEvent(InstanceEvent, frozen=True, kw_only=True):
    migration_id: str


# -- the host itself

class HostConfigured(HostEventBase, frozen=True, tag="HostConfigured", kw_only=True):
    """The host's capacity and limit (capacity x ratio - reserved), logged at its first
    start and whenever its configuration changes, so an auditor needs nothing else."""
    driver: str
    capacity: Resources
    limit: Resources


# -- instance lifecycle

class SpawnStarted(InstanceEvent, frozen=True, tag="SpawnStarted", kw_only=True):
    """Intent: the host claimed the instance's resources and will spawn it."""
    name: str
    flavor: Flavor
    resources: Resources
    stopped: bool = False
    image: str = ""


class Spawned(InstanceEvent, frozen=True, tag="Spawned", kw_only=True):
    power_state: int = RUNNING
    disks: tuple[DiskInfo, ...] = ()


class PoweredOff(InstanceEvent, frozen=True, tag="PoweredOff", kw_only=True):
    pass


class PoweredOn(InstanceEvent, frozen=True, tag="PoweredOn", kw_only=True):
    pass


class Deleted(InstanceEvent, frozen=True, tag="Deleted", kw_only=True):
    """The instance is gone from this host and its allocation released."""


class SpawnFailed(InstanceEvent, frozen=True, tag="SpawnFailed", kw_only=True):
    reason: str


# -- resize: the destination's claim

class MigrationSpec(msgspec.Struct, frozen=True, gc=False):
    """What both ends of a migration know of it; the controller hands it to each."""
    name: str                      # the instance's name
    source: str
    dest: str
    old_flavor: Flavor
    new_flavor: Flavor
    old_resources: Resources       # what the source holds for the instance
    new_resources: Resources       # new flavor + the destination's driver overhead
    migration_type: str            # "resize" | "migration"
    vm_state: str                  # the vm_state to return to: "active" | "stopped"
    created_at: float = 0.0


class Claimed(MigrationEvent, frozen=True, tag="Claimed", kw_only=True):
    """prep_resize + resize_claim on the destination: it now holds the new flavor."""
    spec: MigrationSpec
    probe: str = ""                # shared-storage probe file the destination creates
    probe_pending: bool = False    # intent: the probe is created after this is durable


class ProbeCreated(MigrationEvent, frozen=True, tag="ProbeCreated", kw_only=True):
    """Outcome of a claim's intent: the destination created the shared-storage probe."""


class ClaimRejected(HostEventBase, frozen=True, tag="ClaimRejected", kw_only=True):
    """The destination could not hold the new flavor; nothing is held. No version bump."""
    migration_id: str
    instance_uuid: str
    dest: str
    reason: str


class ClaimReleased(MigrationEvent, frozen=True, tag="ClaimReleased", kw_only=True):
    """Compensation: what this host held for a failed migration in `role` ("source" or
    "dest") is released."""
    reason: str
    role: str = "dest"
    disks_removed: bool = False      # dest: the copy the source had sent was removed


# -- resize: the source moves the disks

class MigrationStarted(MigrationEvent, frozen=True, tag="MigrationStarted", kw_only=True):
    """Intent on the source: power off and move the disks (resize_instance)."""
    spec: MigrationSpec
    probe: str = ""


class DiskMigrated(MigrationEvent, frozen=True, tag="DiskMigrated", kw_only=True):
    """Outcome of migrate_disk_and_power_off: instance off, `_resize` dir kept."""
    shared_storage: bool
    disks: tuple[DiskInfo, ...] = ()


# -- resize: the destination finishes

class FinishStarted(MigrationEvent, frozen=True, tag="FinishStarted", kw_only=True):
    disks: tuple[DiskInfo, ...] = ()
    shared_storage: bool = False


class Finished(MigrationEvent, frozen=True, tag="Finished", kw_only=True):
    power_state: int = RUNNING


# -- confirm (source)

class ConfirmStarted(MigrationEvent, frozen=True, tag="ConfirmStarted", kw_only=True):
    shared_storage: bool = False


class Confirmed(MigrationEvent, frozen=True, tag="Confirmed", kw_only=True):
    pass


# -- revert (destination, then source)

class RevertStarted(MigrationEvent, frozen=True, tag="RevertStarted", kw_only=True):
    shared_storage: bool = False


class DestReverted(MigrationEvent, frozen=True, tag="DestReverted", kw_only=True):
    pass


class RevertFinishStarted(MigrationEvent, frozen=True, tag="RevertFinishStarted",
                          kw_only=True):
    pass


class Reverted(MigrationEvent, frozen=True, tag="Reverted", kw_only=True):
    power_state: int = RUNNING


# -- failures

class Failed(MigrationEvent, frozen=True, tag="Failed", kw_only=True):
    """A step failed on this host. `rolled_back`: the instance is back as it was.
    `step` names the step; protocol.table's DEST_STEPS / SOURCE_STEPS say the role."""
    step: str
    reason: str
    rolled_back: bool
    power_state: int = RUNNING
    shared_storage: bool = False     # migrate: what the probe found before it failed
    dest_copy: bool = False          # migrate: disks may have reached the destination
    closes: str = ""                 # an abandoned cleanup: the command id of its intent


class RestoreStarted(MigrationEvent, frozen=True, tag="RestoreStarted", kw_only=True):
    """Intent on the source: take the instance back (`_resize` renamed back, domain
    defined again), the compensation after a failure or a delete on the way."""


class ReleaseStarted(MigrationEvent, frozen=True, tag="ReleaseStarted", kw_only=True):
    """Intent of a release on the destination: remove the probe and, with
    `remove_disks`, the copy the source sent."""
    reason: str
    role: str = "dest"
    remove_disks: bool = False


class SourceRestored(MigrationEvent, frozen=True, tag="SourceRestored", kw_only=True):
    """Compensation on the source after a failure on the destination: `_resize` renamed
    back, the old domain defined again and powered on unless it was stopped."""
    power_state: int = RUNNING


# -- the rest of the lifecycle: intents, then outcomes (PoweredOff, PoweredOn, Deleted
# above) or ActionFailed

class PowerOffStarted(InstanceEvent, frozen=True, tag="PowerOffStarted", kw_only=True):
    pass


class PowerOnStarted(InstanceEvent, frozen=True, tag="PowerOnStarted", kw_only=True):
    pass


class RebootStarted(InstanceEvent, frozen=True, tag="RebootStarted", kw_only=True):
    hard: bool = False


class Rebooted(InstanceEvent, frozen=True, tag="Rebooted", kw_only=True):
    hard: bool = False


class DeleteStarted(InstanceEvent, frozen=True, tag="DeleteStarted", kw_only=True):
    pass


class ActionFailed(InstanceEvent, frozen=True, tag="ActionFailed", kw_only=True):
    """A stop, start, reboot or delete failed on this host; `step` says which. The
    instance keeps its state (a failed delete leaves it in error, still held)."""
    step: str
    reason: str


HostEvent = (HostConfigured | SpawnStarted | Spawned | SpawnFailed | PoweredOff | PoweredOn | Deleted
             | Claimed | ClaimRejected | ClaimReleased | MigrationStarted | DiskMigrated
             | FinishStarted | Finished | ConfirmStarted | Confirmed | RevertStarted
             | DestReverted | RevertFinishStarted | Reverted | Failed | SourceRestored
             | ProbeCreated | RestoreStarted | ReleaseStarted | PowerOffStarted
             | PowerOnStarted | RebootStarted | Rebooted | DeleteStarted | ActionFailed)

HOST_EVENT_TYPES = HostEvent.__args__


# --------------------------------------------------------------------------- controller events

class ControllerEventBase(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    request_id: str


class BootRequested(ControllerEventBase, frozen=True, tag="BootRequested", kw_only=True):
    instance_uuid: str
    name: str
    flavor: str
    host: str = ""
    stopped: bool = False


class ResizeRequested(ControllerEventBase, frozen=True, tag="ResizeRequested", kw_only=True):
    migration_id: str
    instance_uuid: str
    new_flavor: str
    migration_type: str
    host: str = ""
    created_at: float = 0.0


class DestinationChosen(ControllerEventBase, frozen=True, tag="DestinationChosen",
                        kw_only=True):
    migration_id: str
    dest: str
    attempt: int


class ConfirmRequested(ControllerEventBase, frozen=True, tag="ConfirmRequested",
                       kw_only=True):
    migration_id: str


class RevertRequested(ControllerEventBase, frozen=True, tag="RevertRequested", kw_only=True):
    migration_id: str


class RequestEnded(ControllerEventBase, frozen=True, tag="RequestEnded", kw_only=True):
    """A request reached its end: `outcome` is ok, or why it was refused or failed."""
    ok: bool
    outcome: str = ""
    migration_id: str = ""


class ActionRequested(ControllerEventBase, frozen=True, tag="ActionRequested", kw_only=True):
    """stop, start, reboot (`hard`) or delete of an instance."""
    instance_uuid: str
    action: str
    hard: bool = False


class FlavorCreated(ControllerEventBase, frozen=True, tag="FlavorCreated", kw_only=True):
    """A flavor added through the compute API (admin); it lives beside cluster.yaml's."""
    flavor: Flavor
    flavor_id: str
    is_public: bool = True
    description: str = ""


class FlavorDeleted(ControllerEventBase, frozen=True, tag="FlavorDeleted", kw_only=True):
    """A flavor removed through the compute API; instances that have it keep it."""
    name: str
    flavor_id: str = ""


class OwnerRecorded(ControllerEventBase, frozen=True, tag="OwnerRecorded", kw_only=True):
    """Who booted an instance through the compute API, and from which image: logged
    with its `BootRequested`, in the same append."""
    instance_uuid: str
    project_id: str = ""
    user_id: str = ""
    image_id: str = ""


ControllerEvent = (BootRequested | ResizeRequested | DestinationChosen | ConfirmRequested
                   | RevertRequested | RequestEnded | ActionRequested | FlavorCreated
                   | FlavorDeleted | OwnerRecorded)


# --------------------------------------------------------------------------- envelope

class Envelope(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One log record. `offset` is gapless per log; `wall_time` in seconds since epoch."""
    host: str
    offset: int
    wall_time: float
    event: HostEvent
    version: int = SCHEMA_VERSION


class ControllerEnvelope(msgspec.Struct, frozen=True, array_like=True):
    host: str
    offset: int
    wall_time: float
    event: ControllerEvent
    version: int = SCHEMA_VERSION
