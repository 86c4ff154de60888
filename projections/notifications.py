"""Nova's resize notifications, derived from the events (never written separately).

`notifications(env)` gives the legacy notification names Nova emits around each step,
prefixed `compute.instance.` as Nova's event types are.
"""
from __future__ import annotations

from vmresize.events import schema as ev
from vmresize.events.schema import Envelope

PREFIX = "compute.instance."

_NAMES: dict[type, tuple[str, ...]] = {
    ev.Claimed: ("resize.prep.start", "resize.prep.end"),
    ev.MigrationStarted: ("resize.start",),
    ev.DiskMigrated: ("resize.end",),
    ev.FinishStarted: ("finish_resize.start",),
    ev.Finished: ("finish_resize.end",),
    ev.ConfirmStarted: ("resize.confirm.start",),
    ev.Confirmed: ("resize.confirm.end",),
    ev.RevertStarted: ("resize.revert.start",),
    ev.Reverted: ("resize.revert.end",),
    ev.Failed: ("resize.error",),
    ev.SpawnStarted: ("create.start",),
    ev.Spawned: ("create.end",),
    ev.SpawnFailed: ("create.error",),
}


def notifications(env: Envelope) -> list[str]:
    return [PREFIX + name for name in _NAMES.get(type(env.event), ())]
