"""The protocol in one place: every host step and every event, as data.

`STEPS` has one record per command a host executes: the role it plays, the instance and
migration states it is legal from (on the acting host's own projection), its intent
event, the driver call made between the intent and its outcome, the outcome and failure
events, and what a failure means (`rollback`: the step undoes itself and reports
`Failed`/`ActionFailed`; `retry`: a cleanup that cannot be undone, retried by the
controller and finally abandoned). A step without an intent is a decision: it calls no
driver and its events are final.

`EVENTS` says what each event does to the migration's status and the instance's
task_state. `OPERATIONS` says from which instance states a controller accepts each
user operation (resize, confirm, stop, delete, ...).

Who reads it:
- `actors/host.py` checks a command's legality with `STEPS` (`refusal`);
- `actors/shell.py` runs `effect` between `intent` and the outcome, and treats every
  `intent` event as open until its outcome is logged (`INTENTS`);
- `actors/controller.py` checks a user operation with `OPERATIONS` (`refuse_operation`);
- `projections/fold.py` takes each event's migration status and task_state from `EVENTS`;
- `projections/audit.py` takes the legal migration transitions from `TRANSITIONS`;
- `tests/test_protocol_table.py` walks every (state, command) pair against the fold.
"""
from __future__ import annotations

import msgspec

from vmresize.events import schema as ev
from vmresize.protocol import commands as c
from vmresize.protocol.states import (RUNNING, SHUTDOWN, MigrationStatus as MS, Role,
                                      Step, TaskState as TS, VmState as VS)

ANY = None                          # in a rule: no condition
ABSENT = frozenset({"absent"})      # the acting host does not know it yet

KEEP = "keep"                       # in EVENTS: the event leaves the field as it is


class StepRule(msgspec.Struct, frozen=True):
    command: type
    step: Step
    role: Role
    instance: frozenset | None        # legal vm_states of the instance here (ANY: no check)
    migration: frozenset | None       # legal migration statuses here (ANY: no check)
    intent: type | None               # appended before the driver call; None: a decision
    effect: str                       # the driver call(s) between intent and outcome
    outcome: type | None
    failure: type | None
    on_failure: str                   # "rollback" | "retry" | "refuse"
    noop: frozenset = frozenset()     # power states in which it succeeds with no events
    busy_ok: bool = False             # legal while the instance has a task_state
    requires: frozenset = frozenset()  # power states it needs (empty: any)


_LIVE = frozenset({VS.ACTIVE, VS.STOPPED})
# On a host, an instance resized here stays `resized` in this host's log after the
# source logged Confirmed: for a host it is live like active and stopped.
_LIVE_HERE = frozenset({VS.ACTIVE, VS.STOPPED, VS.RESIZED})

STEPS: dict[type, StepRule] = {r.command: r for r in (
    StepRule(c.Spawn, Step.SPAWN, Role.HOST, ABSENT, ANY,
             ev.SpawnStarted, "spawn", ev.Spawned, ev.SpawnFailed, "rollback"),
    # 1 prep_resize + resize_claim: ClaimRejected is a refusal with an audit trail.
    StepRule(c.PrepResize, Step.PREP, Role.DEST, ANY, ABSENT,
             ev.Claimed, "create_probe", ev.ProbeCreated, ev.ClaimReleased, "rollback",
             busy_ok=True),
    # 2+3 resize_instance + migrate_disk_and_power_off; a disk shrink is refused here.
    StepRule(c.ResizeInstance, Step.RESIZE_INSTANCE, Role.SOURCE, _LIVE_HERE,
             frozenset({"absent", MS.PRE_MIGRATING}),
             ev.MigrationStarted, "probe_exists, migrate_disk_and_power_off",
             ev.DiskMigrated, ev.Failed, "rollback", busy_ok=True),
    # 4 finish_resize + finish_migration.
    StepRule(c.FinishResize, Step.FINISH, Role.DEST, ANY,
             frozenset({MS.PRE_MIGRATING, MS.POST_MIGRATING}),
             ev.FinishStarted, "remove_probe, finish_migration", ev.Finished, ev.Failed,
             "rollback", busy_ok=True),
    # 5 confirm_resize.
    StepRule(c.ConfirmResize, Step.CONFIRM, Role.SOURCE, ANY,
             frozenset({MS.POST_MIGRATING, MS.FINISHED, MS.CONFIRMING}),
             ev.ConfirmStarted, "confirm_migration", ev.Confirmed, None, "retry",
             busy_ok=True),
    # 6 revert_resize on the destination, 7 finish_revert_resize on the source.
    StepRule(c.RevertResize, Step.REVERT, Role.DEST, ANY, frozenset({MS.FINISHED}),
             ev.RevertStarted, "revert_migration_dest", ev.DestReverted, None, "retry",
             busy_ok=True),
    StepRule(c.FinishRevertResize, Step.FINISH_REVERT, Role.SOURCE, ANY,
             frozenset({MS.POST_MIGRATING, MS.REVERTING}),
             ev.RevertFinishStarted, "finish_revert_migration", ev.Reverted, None, "retry",
             busy_ok=True),
    # x compensations: the source takes the instance back, either end lets go.
    StepRule(c.RestoreSource, Step.RESTORE, Role.SOURCE, ANY,
             frozenset({MS.MIGRATING, MS.POST_MIGRATING, MS.ERROR}),
             ev.RestoreStarted, "finish_revert_migration", ev.SourceRestored, None, "retry",
             busy_ok=True),
    StepRule(c.ReleaseClaim, Step.RELEASE, Role.DEST, ANY,
             frozenset(MS) - {MS.CONFIRMED, MS.REVERTED},
             ev.ReleaseStarted, "remove_probe, destroy (the copy, with remove_disks)",
             ev.ClaimReleased, None, "retry", busy_ok=True),
    StepRule(c.AbandonStep, Step.ABANDON, Role.HOST, ANY,
             frozenset({MS.MIGRATING, MS.POST_MIGRATING, MS.FINISHED, MS.CONFIRMING,
                        MS.REVERTING, MS.ERROR}),
             None, "", ev.Failed, None, "refuse", busy_ok=True),
    # The rest of the lifecycle, on the instance's own host.
    StepRule(c.StopInstance, Step.STOP, Role.HOST, _LIVE_HERE, ANY,
             ev.PowerOffStarted, "power_off", ev.PoweredOff, ev.ActionFailed, "rollback",
             noop=frozenset({SHUTDOWN})),
    StepRule(c.StartInstance, Step.START, Role.HOST, _LIVE_HERE, ANY,
             ev.PowerOnStarted, "power_on", ev.PoweredOn, ev.ActionFailed, "rollback",
             noop=frozenset({RUNNING})),
    StepRule(c.RebootInstance, Step.REBOOT, Role.HOST, _LIVE_HERE, ANY,
             ev.RebootStarted, "reboot", ev.Rebooted, ev.ActionFailed, "rollback",
             requires=frozenset({RUNNING})),
    StepRule(c.DeleteInstance, Step.DELETE, Role.HOST, _LIVE_HERE | {VS.ERROR}, ANY,
             ev.DeleteStarted, "destroy", ev.Deleted, ev.ActionFailed, "rollback"),
)}


class EventRule(msgspec.Struct, frozen=True):
    """What one event does to the migration's status and the instance's task_state
    (`KEEP`: nothing; `None` for task_state: cleared). Events whose effect depends on
    their fields (Failed, ClaimReleased, ActionFailed) name the common case and the
    fold's own functions finish the job."""
    migration: object = KEEP
    task_state: object = KEEP


EVENTS: dict[type, EventRule] = {
    ev.HostConfigured: EventRule(),
    ev.SpawnStarted: EventRule(task_state=TS.SPAWNING),
    ev.Spawned: EventRule(task_state=None),
    ev.SpawnFailed: EventRule(task_state=None),
    ev.Claimed: EventRule(MS.PRE_MIGRATING, TS.RESIZE_PREP),
    ev.ProbeCreated: EventRule(),
    ev.ClaimRejected: EventRule(),
    ev.MigrationStarted: EventRule(MS.MIGRATING, TS.RESIZE_MIGRATING),
    ev.DiskMigrated: EventRule(MS.POST_MIGRATING, TS.RESIZE_MIGRATED),
    ev.FinishStarted: EventRule(MS.POST_MIGRATING, TS.RESIZE_FINISH),
    ev.Finished: EventRule(MS.FINISHED, None),
    ev.ConfirmStarted: EventRule(MS.CONFIRMING, TS.RESIZE_CONFIRMING),
    ev.Confirmed: EventRule(MS.CONFIRMED, None),
    ev.RevertStarted: EventRule(MS.REVERTING, TS.RESIZE_REVERTING),
    ev.DestReverted: EventRule(MS.REVERTING),
    ev.RevertFinishStarted: EventRule(MS.REVERTING),
    ev.Reverted: EventRule(MS.REVERTED, None),
    ev.Failed: EventRule(MS.ERROR),
    ev.RestoreStarted: EventRule(),
    ev.SourceRestored: EventRule(MS.ERROR, None),
    ev.ReleaseStarted: EventRule(),
    ev.ClaimReleased: EventRule(MS.ERROR),
    ev.PowerOffStarted: EventRule(task_state=TS.POWERING_OFF),
    ev.PoweredOff: EventRule(task_state=None),
    ev.PowerOnStarted: EventRule(task_state=TS.POWERING_ON),
    ev.PoweredOn: EventRule(task_state=None),
    ev.RebootStarted: EventRule(task_state=TS.REBOOTING),
    ev.Rebooted: EventRule(task_state=None),
    ev.DeleteStarted: EventRule(task_state=TS.DELETING),
    ev.Deleted: EventRule(task_state=None),
    ev.ActionFailed: EventRule(task_state=None),
}

# Which end of a migration a `Failed.step` was on (`migrate` is the effect of
# resize_instance; an abandoned cleanup names its own step).
DEST_STEPS = frozenset(r.step for r in STEPS.values() if r.role == Role.DEST)
SOURCE_STEPS = frozenset({Step.MIGRATE} | {r.step for r in STEPS.values()
                                           if r.role == Role.SOURCE})

# Cleanups that cannot be undone: a failure is retried by the controller and finally
# abandoned (`Failed` naming the step), which may leave disks behind on that host. An
# instance whose migration had one is in error from then on, wherever it runs (even
# after its source took it back), and resize, migrate, stop, start and reboot are
# refused until it is deleted: a later migration must not land on what was left.
CLEANUP_STEPS = frozenset(r.step for r in STEPS.values() if r.on_failure == "retry")

# Every intent event: open until an event of the same command follows it.
INTENTS: frozenset[type] = frozenset(r.intent for r in STEPS.values() if r.intent)

# Which step an intent belongs to (the shell runs that step's effect on recovery).
STEP_OF_INTENT: dict[type, StepRule] = {r.intent: r for r in STEPS.values() if r.intent}


def _status(event: type | None):
    return EVENTS[event].migration if event is not None else KEEP


def _transitions() -> dict:
    """Legal migration status changes, from the steps: a step legal from status S moves
    it to its intent's status, and from there to its outcome's or failure's status
    (statuses as each end's own log sees them; `None` is a migration not seen yet)."""
    out: dict = {None: set()}

    def edge(a, b):
        if b is not KEEP and a != b:
            out.setdefault(a, set()).add(b)

    for rule in STEPS.values():
        froms = {None if s == "absent" else s for s in rule.migration or ()}
        intent = _status(rule.intent)
        for f in froms:
            edge(f, intent)
        after = {intent} if intent is not KEEP else froms
        for a in after:
            for end in (_status(rule.outcome), _status(rule.failure)):
                edge(a, end)
    for status in MS:
        out.setdefault(status, set())
    # An ended migration moves no more; compensations keep it in error.
    for status in (MS.CONFIRMED, MS.REVERTED, MS.ERROR):
        out[status] = set()
    return out


TRANSITIONS: dict = _transitions()


# --------------------------------------------------------------------------- operations

class Operation(msgspec.Struct, frozen=True):
    """A user operation as the controller accepts it: from which vm_states (with no
    task under way), and in which it succeeds at once with nothing to do."""
    name: str
    vm_states: frozenset
    noop: frozenset = frozenset()
    busy_ok: bool = False           # accepted while a task is under way (delete)


OPERATIONS: dict[str, Operation] = {o.name: o for o in (
    Operation("resize", _LIVE),
    Operation("migrate", _LIVE),
    Operation("confirm", frozenset({VS.RESIZED})),
    Operation("revert", frozenset({VS.RESIZED})),
    Operation("stop", _LIVE, noop=frozenset({VS.STOPPED})),
    Operation("start", _LIVE, noop=frozenset({VS.ACTIVE})),
    Operation("reboot", frozenset({VS.ACTIVE})),
    Operation("delete", frozenset({VS.ACTIVE, VS.STOPPED, VS.RESIZED, VS.ERROR}),
              busy_ok=True),
)}


def refuse_operation(op: str, name: str, vm_state: str, task_state: str | None,
                     deleted: bool = False) -> str:
    """Why `op` is refused for an instance in this state; empty when it is legal."""
    rule = OPERATIONS[op]
    if deleted:
        return f"cannot {op} {name!r}: it is deleted"
    state = vm_state + (f"/{task_state}" if task_state else "")
    if vm_state not in rule.vm_states:
        return (f"cannot {op} {name!r} while it is {state} (needs "
                f"{' or '.join(sorted(rule.vm_states))})")
    if task_state and not rule.busy_ok:
        return f"cannot {op} {name!r} while it is in task_state {task_state}"
    return ""


def step_refusal(rule: StepRule, host: str, vm_state: str | None,
                 task_state: str | None, on_host: bool,
                 mig_status: str | None, power_state: int = RUNNING) -> str:
    """Why a host refuses the step in this state (empty: legal). `vm_state` None: the
    host does not know the instance; `mig_status` None: nor the migration."""
    name = rule.step
    if rule.instance is ABSENT:
        if vm_state is not None:
            return f"{name}: the instance already exists on {host} ({vm_state})"
    elif rule.instance is not ANY:
        if vm_state is None:
            return f"{name}: the instance is unknown on {host}"
        if not on_host:
            return f"{name}: the instance is not on {host}"
        if vm_state not in rule.instance:
            return f"{name}: the instance is {vm_state} on {host}"
        if task_state and not rule.busy_ok:
            return f"{name}: the instance is in task_state {task_state} on {host}"
        if rule.requires and power_state not in rule.requires:
            return f"{name}: the instance is not running on {host}"
    if rule.migration is not ANY:
        status = mig_status if mig_status is not None else "absent"
        if status not in rule.migration:
            if rule.migration is ABSENT:
                return f"{name}: the migration is already {status} on {host}"
            if status == "absent":
                return f"{name}: the migration is unknown on {host}"
            want = " or ".join(sorted(s for s in rule.migration if s != "absent"))
            return f"{name}: the migration is {status} on {host}, expected {want}"
    return ""


def describe() -> str:
    """The table as text, for people (`python -m vmresize.protocol.table`)."""
    lines = [f"{'command':20} {'role':6} {'legal from':36} {'intent':20} {'effect':40} "
             f"{'outcome':16} {'failure':14} on failure"]
    for r in STEPS.values():
        legal = ",".join(sorted(r.instance or ["*"])) + " | " + ",".join(
            sorted(r.migration or ["*"]))
        lines.append(f"{r.command.__name__:20} {r.role:6} {legal:36} "
                     f"{_n(r.intent):20} {r.effect or '-':40} {_n(r.outcome):16} "
                     f"{_n(r.failure):14} {r.on_failure}")
    return "\n".join(lines)


def _n(t: type | None) -> str:
    return t.__name__ if t is not None else "-"



# --------------------------------------------------------------------------- rules

def same_host_refusal(source: str, dest: str, allowed: bool) -> str:
    """The same-host rule (Nova's allow_resize_to_same_host); empty when allowed."""
    if source == dest and not allowed:
        return (f"resize to the same host ({dest}) is not allowed "
                f"(allow_resize_to_same_host is false)")
    return ""


def disk_shrink_refusal(old: ev.Flavor, new: ev.Flavor) -> str:
    """Shrinking root or ephemeral disk is refused (with a rollback: nothing happened
    yet); empty when the new flavor's disks are at least as large."""
    if new.root_gb < old.root_gb or new.ephemeral_gb < old.ephemeral_gb:
        return (f"disk shrink refused: root {old.root_gb} -> {new.root_gb} GB, "
                f"ephemeral {old.ephemeral_gb} -> {new.ephemeral_gb} GB")
    return ""


if __name__ == "__main__":
    print(describe())
