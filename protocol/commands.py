"""Commands the controller sends to hosts, and the hosts' replies.

Commands are imperative and mirror Nova's RPC names. Every command carries a
`command_id` (a repeated one is answered from the log, never executed twice) and the
`instance_version` the controller believes current; the host's first event for the
command gets the next version, and a host that already knows a later version refuses.
"""
from __future__ import annotations

import msgspec

from vmresize.events.schema import DiskInfo, Envelope, Flavor, MigrationSpec


class Command(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    command_id: str
    instance_uuid: str
    instance_version: int


class Spawn(Command, frozen=True, tag="Spawn", kw_only=True):
    name: str
    flavor: Flavor
    stopped: bool = False
    image: str = ""


class PrepResize(Command, frozen=True, tag="PrepResize", kw_only=True):
    migration_id: str
    spec: MigrationSpec          # new_resources is filled in by the destination
    allow_same_host: bool = False


class ResizeInstance(Command, frozen=True, tag="ResizeInstance", kw_only=True):
    migration_id: str
    spec: MigrationSpec
    probe: str = ""


class FinishResize(Command, frozen=True, tag="FinishResize", kw_only=True):
    migration_id: str
    disks: tuple[DiskInfo, ...] = ()
    shared_storage: bool = False


class ConfirmResize(Command, frozen=True, tag="ConfirmResize", kw_only=True):
    migration_id: str
    shared_storage: bool = False


class RevertResize(Command, frozen=True, tag="RevertResize", kw_only=True):
    migration_id: str
    shared_storage: bool = False


class FinishRevertResize(Command, frozen=True, tag="FinishRevertResize", kw_only=True):
    migration_id: str


class RestoreSource(Command, frozen=True, tag="RestoreSource", kw_only=True):
    """Compensation on the source after the destination failed to finish."""
    migration_id: str


class ReleaseClaim(Command, frozen=True, tag="ReleaseClaim", kw_only=True):
    """Compensation: release what this host holds for a failed migration."""
    migration_id: str
    role: str = "dest"
    reason: str = ""
    remove_disks: bool = False   # dest: the source may have sent disks here (not shared)


class AbandonStep(Command, frozen=True, tag="AbandonStep", kw_only=True):
    """Give up a cleanup step that kept failing: record it as failed, not rolled back."""
    migration_id: str
    step: str
    reason: str
    abandons: str = ""           # the command id whose intent stays open; this closes it


class StopInstance(Command, frozen=True, tag="StopInstance", kw_only=True):
    """Power off: a clean shutdown, then a hard one after the driver's timeout."""


class StartInstance(Command, frozen=True, tag="StartInstance", kw_only=True):
    pass


class RebootInstance(Command, frozen=True, tag="RebootInstance", kw_only=True):
    hard: bool = False


class DeleteInstance(Command, frozen=True, tag="DeleteInstance", kw_only=True):
    """Destroy the domain, remove every file of the instance, release its allocation."""


AnyCommand = (Spawn | PrepResize | ResizeInstance | FinishResize | ConfirmResize
              | RevertResize | FinishRevertResize | RestoreSource | ReleaseClaim
              | AbandonStep | StopInstance | StartInstance | RebootInstance
              | DeleteInstance)


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """`ok`: the command's events are durable. Not ok: `reason` says why; `retryable`
    means the same command may succeed later (a transient driver failure)."""
    command_id: str
    ok: bool
    events: list[Envelope] = []
    reason: str = ""
    retryable: bool = False


class Rejected(msgspec.Struct, frozen=True):
    """A refusal decided from state: a value, not an exception."""
    reason: str
