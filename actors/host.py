"""Host logic: pure decisions of a compute host.

`decide(state, policy, cmd)` returns the events a command appends first (its intent, a
decision, or a refusal event) or `Rejected`; `outcome(state, intent, result)` returns the
events that close an intent once its driver call has run. No Ray, no clock, no I/O: the
state is the host's own projection (its log folded). Which command is legal in which
state comes from the protocol table (protocol/table.py); the shell (actors/shell.py)
appends what these functions return and calls the driver between intent and outcome.
"""
from __future__ import annotations

import msgspec

from vmresize.events import schema as ev
from vmresize.projections.fold import Projection
from vmresize.projections.state import Ledger, claim_key
from vmresize.protocol import commands as c
from vmresize.protocol import table
from vmresize.protocol.commands import Rejected
from vmresize.protocol.states import RUNNING, SHUTDOWN, Role, Step, VmState


class HostPolicy(msgspec.Struct, frozen=True):
    """What the host's configuration says about claims."""
    name: str
    limit: ev.Resources
    overhead: ev.Resources = ev.ZERO


class Effect(msgspec.Struct, frozen=True):
    """What a driver call of an intent came to: `error` empty when it succeeded;
    `rolled_back` whether the step's own undo succeeded after a failure; `shared` what
    the shared-storage probe found; `probed` whether the probe was looked at at all."""
    error: str = ""
    rolled_back: bool = True
    shared: bool = False
    probed: bool = False
    disks: tuple[ev.DiskInfo, ...] = ()


def probe_name(migration_id: str) -> str:
    return f".vmresize-probe-{migration_id}"


def _ledger(state: Projection, host: str) -> Ledger:
    return state.ledgers.get(host) or Ledger(host=host)


def check_version(state: Projection, cmd: c.Command) -> Rejected | None:
    inst = state.instances.get(cmd.instance_uuid)
    if inst is not None and inst.version > cmd.instance_version:
        return Rejected(f"instance {cmd.instance_uuid} is at version {inst.version} here, "
                        f"the command expects {cmd.instance_version}")
    return None


def refusal(state: Projection, policy: HostPolicy, cmd: c.Command) -> str:
    """Why this host refuses `cmd` in its state (the table's legality); empty if legal."""
    rule = table.STEPS[type(cmd)]
    inst = state.instances.get(cmd.instance_uuid)
    mid = getattr(cmd, "migration_id", "")
    mig = state.migrations.get(mid) if mid else None
    live = inst is not None and not inst.deleted
    return table.step_refusal(
        rule, policy.name, inst.vm_state if live else None,
        inst.task_state if live else None, live and inst.host == policy.name,
        mig.status if mig is not None else None, inst.power_state if live else 0)


def _fits(state: Projection, policy: HostPolicy, need: ev.Resources) -> str:
    """Empty when `need` fits beside what the host holds; else why not."""
    total = _ledger(state, policy.name).used + need
    if total.fits_in(policy.limit):
        return ""
    short = [f"{field} {getattr(total, field)} > {getattr(policy.limit, field)}"
             for field in ("vcpus", "memory_mb", "disk_gb")
             if getattr(total, field) > getattr(policy.limit, field)]
    return f"{policy.name} cannot hold it: " + ", ".join(short)


def _event(cls, cmd, bump: int = 1, **fields):
    """An event of `cmd`'s instance (and migration) at the next version."""
    kw = dict(command_id=cmd.command_id, instance_uuid=cmd.instance_uuid,
              instance_version=cmd.instance_version + bump)
    if "migration_id" in cls.__struct_fields__:
        kw["migration_id"] = cmd.migration_id
    return cls(**kw, **fields)


# --------------------------------------------------------------------------- decisions

def decide_spawn(state, policy, cmd: c.Spawn):
    need = cmd.flavor.resources(policy.overhead)
    why = _fits(state, policy, need)
    if why:
        return Rejected(why)
    return [_event(ev.SpawnStarted, cmd, name=cmd.name, flavor=cmd.flavor, resources=need,
                   stopped=cmd.stopped, image=cmd.image)]


def decide_prep(state, policy, cmd: c.PrepResize):
    """resize_claim on the destination: Claimed (the intent of creating the probe), or
    ClaimRejected (a refusal with an audit trail, no version bump)."""
    spec = msgspec.structs.replace(
        cmd.spec, new_resources=cmd.spec.new_flavor.resources(policy.overhead))
    # On the same host the old flavor is still held, so old and new must fit together.
    reason = (table.same_host_refusal(spec.source, policy.name, cmd.allow_same_host)
              or _fits(state, policy, spec.new_resources))
    if reason:
        return [ev.ClaimRejected(command_id=cmd.command_id, migration_id=cmd.migration_id,
                                 instance_uuid=cmd.instance_uuid, dest=policy.name,
                                 reason=reason)]
    return [_event(ev.Claimed, cmd, spec=spec, probe=probe_name(cmd.migration_id),
                   probe_pending=True)]


def decide_resize_instance(state, policy, cmd: c.ResizeInstance):
    inst = state.instances[cmd.instance_uuid]
    shrink = table.disk_shrink_refusal(cmd.spec.old_flavor, cmd.spec.new_flavor)
    if shrink:      # refused with a rollback: nothing has happened to the instance yet
        return [_event(ev.Failed, cmd, step=Step.RESIZE_INSTANCE, rolled_back=True,
                       power_state=inst.power_state, reason=shrink)]
    return [_event(ev.MigrationStarted, cmd, spec=cmd.spec, probe=cmd.probe)]


def decide_release(state, policy, cmd: c.ReleaseClaim):
    if cmd.role != Role.DEST:
        return Rejected(f"{policy.name} releases only a destination's claim: a source "
                        f"lets go through its own step's outcome (role {cmd.role!r})")
    if (not cmd.remove_disks
            and claim_key(cmd.migration_id) not in _ledger(state, policy.name).allocations):
        return Rejected(f"{policy.name} holds no claim for {cmd.migration_id}")
    return [_event(ev.ReleaseStarted, cmd, role=cmd.role, reason=cmd.reason,
                   remove_disks=cmd.remove_disks)]


def _intent_only(fields=lambda cmd: {}):
    def decide_step(state, policy, cmd):
        return [_event(table.STEPS[type(cmd)].intent, cmd, **fields(cmd))]
    return decide_step


DECIDE = {
    c.Spawn: decide_spawn, c.PrepResize: decide_prep,
    c.ResizeInstance: decide_resize_instance,
    c.FinishResize: _intent_only(lambda cmd: dict(disks=cmd.disks,
                                                  shared_storage=cmd.shared_storage)),
    c.ConfirmResize: _intent_only(lambda cmd: dict(shared_storage=cmd.shared_storage)),
    c.RevertResize: _intent_only(lambda cmd: dict(shared_storage=cmd.shared_storage)),
    c.FinishRevertResize: _intent_only(),
    c.RestoreSource: _intent_only(),
    c.ReleaseClaim: decide_release,
    c.AbandonStep: lambda state, policy, cmd: [
        _event(ev.Failed, cmd, step=cmd.step, reason=cmd.reason, rolled_back=False,
               closes=cmd.abandons)],
    c.StopInstance: _intent_only(),
    c.StartInstance: _intent_only(),
    c.RebootInstance: _intent_only(lambda cmd: dict(hard=cmd.hard)),
    c.DeleteInstance: _intent_only(),
}


def decide(state: Projection, policy: HostPolicy, cmd: c.Command):
    """The events a command appends first (an intent, a decision or a refusal event),
    `[]` when there is nothing to do (stop of a stopped instance), or Rejected."""
    stale = check_version(state, cmd)
    if stale is not None:
        return stale
    why = refusal(state, policy, cmd)
    if why:
        if isinstance(cmd, c.PrepResize):
            return [ev.ClaimRejected(command_id=cmd.command_id,
                                     migration_id=cmd.migration_id,
                                     instance_uuid=cmd.instance_uuid, dest=policy.name,
                                     reason=why)]
        return Rejected(why)
    inst = state.instances.get(cmd.instance_uuid)
    if inst is not None and inst.power_state in table.STEPS[type(cmd)].noop:
        return []
    return DECIDE[type(cmd)](state, policy, cmd)


# --------------------------------------------------------------------------- outcomes

def _power(on: bool) -> int:
    return RUNNING if on else SHUTDOWN


def outcome(state: Projection, intent, result: Effect) -> list | None:
    """The events that close `intent` after its driver call came to `result`; None when
    a step that can only be retried failed (the intent stays open)."""
    rule = table.STEP_OF_INTENT[type(intent)]
    if result.error and rule.on_failure == "retry":
        return None
    build = _OUTCOMES.get(type(intent))
    if build is not None:
        return [build(state, intent, result)]
    if result.error:
        return [_next(rule.failure, intent, step=rule.step, reason=result.error)]
    return [_next(rule.outcome, intent)]


def _vm_state_of(state: Projection, intent) -> str:
    mig = state.migrations.get(getattr(intent, "migration_id", ""))
    return mig.vm_state if mig is not None else VmState.ACTIVE


def _spawned(state, e: ev.SpawnStarted, r: Effect):
    if r.error:
        return _next(ev.SpawnFailed, e, reason=r.error)
    return _next(ev.Spawned, e, power_state=_power(not e.stopped), disks=r.disks)


def _claim_ready(state, e: ev.Claimed, r: Effect):
    if r.error:
        return _next(ev.ClaimReleased, e, role=Role.DEST,
                     reason=f"shared-storage probe failed: {r.error}")
    return _next(ev.ProbeCreated, e)


def _disk_migrated(state, e: ev.MigrationStarted, r: Effect):
    if r.error:
        # Only a source that knew the storage was not shared may have sent disks.
        return _next(ev.Failed, e, step=Step.MIGRATE, reason=r.error,
                     rolled_back=r.rolled_back, power_state=_power(e.spec.vm_state == VmState.ACTIVE),
                     shared_storage=r.shared, dest_copy=r.probed and not r.shared)
    return _next(ev.DiskMigrated, e, shared_storage=r.shared, disks=r.disks)


def _finished(state, e: ev.FinishStarted, r: Effect):
    if r.error:
        return _next(ev.Failed, e, step=Step.FINISH, reason=r.error,
                     rolled_back=r.rolled_back)
    return _next(ev.Finished, e, power_state=_power(_vm_state_of(state, e) == VmState.ACTIVE))


def _source_back(cls):
    def build(state, e, r: Effect):
        return _next(cls, e, power_state=_power(_vm_state_of(state, e) == VmState.ACTIVE))
    return build


def _released(state, e: ev.ReleaseStarted, r: Effect):
    return _next(ev.ClaimReleased, e, role=e.role, reason=e.reason,
                 disks_removed=e.remove_disks)


def _rebooted(state, e: ev.RebootStarted, r: Effect):
    if r.error:
        return _next(ev.ActionFailed, e, step=Step.REBOOT, reason=r.error)
    return _next(ev.Rebooted, e, hard=e.hard)


_OUTCOMES = {
    ev.SpawnStarted: _spawned, ev.Claimed: _claim_ready,
    ev.MigrationStarted: _disk_migrated, ev.FinishStarted: _finished,
    ev.RevertFinishStarted: _source_back(ev.Reverted),
    ev.RestoreStarted: _source_back(ev.SourceRestored),
    ev.ReleaseStarted: _released, ev.RebootStarted: _rebooted,
}


def _next(cls, intent, **fields):
    """The outcome of `intent`: same command, migration and instance, next version."""
    kw = dict(command_id=intent.command_id, instance_uuid=intent.instance_uuid,
              instance_version=intent.instance_version + 1)
    if "migration_id" in cls.__struct_fields__:
        kw["migration_id"] = intent.migration_id
    return cls(**kw, **fields)
