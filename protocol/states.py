"""The protocol's vocabulary: migration statuses, vm_states, task_states, steps, roles.

`StrEnum`s whose values are the strings written in the logs and shown by the CLI and the
compute API (Nova's words), so a member compares equal to its string and encodes as it:
logs written before these enums existed read back unchanged.
"""
from __future__ import annotations

from enum import StrEnum


class MigrationStatus(StrEnum):
    PRE_MIGRATING = "pre-migrating"
    MIGRATING = "migrating"
    POST_MIGRATING = "post-migrating"
    FINISHED = "finished"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    ERROR = "error"


class VmState(StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    RESIZED = "resized"
    ERROR = "error"
    DELETED = "deleted"


class TaskState(StrEnum):
    SPAWNING = "spawning"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_MIGRATED = "resize_migrated"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    RESIZE_CONFIRMING = "resize_confirming"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    REBOOTING = "rebooting"
    REBOOTING_HARD = "rebooting_hard"
    DELETING = "deleting"


class Step(StrEnum):
    """A host step's name, as `Failed.step` and `ActionFailed.step` write it."""
    SPAWN = "spawn"
    PREP = "prep"
    RESIZE_INSTANCE = "resize_instance"
    MIGRATE = "migrate"
    FINISH = "finish"
    CONFIRM = "confirm"
    REVERT = "revert"
    FINISH_REVERT = "finish_revert"
    RESTORE = "restore"
    RELEASE = "release"
    ABANDON = "abandon"
    STOP = "stop"
    START = "start"
    REBOOT = "reboot"
    DELETE = "delete"


class Role(StrEnum):
    SOURCE = "source"
    DEST = "dest"
    HOST = "host"         # a step on the instance's own host (spawn, power, delete)


class MigrationType(StrEnum):
    RESIZE = "resize"
    MIGRATION = "migration"


# Nova's power states (ints).
NOSTATE = 0
RUNNING = 1
SHUTDOWN = 4

# The statuses a migration ends in (compensations aside, see Migration.final).
ENDED = frozenset({MigrationStatus.CONFIRMED, MigrationStatus.REVERTED,
                   MigrationStatus.ERROR})
