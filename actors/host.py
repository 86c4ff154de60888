"""Host logic: pure decisions of a compute host, `decide(state, command) -> events`.

No Ray, no clock, no I/O: the state is the host's own projection (its log folded), and
every refusal is a value (`Rejected`) or an audit-trail event (`ClaimRejected`,
`Failed`). The shell (actors/shell.py) appends what `decide` returns, calls the driver
between an intent and its outcome, and appends the outcome.
"""
from __future__ import annotations

import msgspec

from vmresize.protocol import commands as c
from vmresize.protocol.commands import Rejected
from vmresize.events import schema as ev
from vmresize.projections.fold import Projection
from vmresize.projections.state import (ERROR, FINISHED, MIGRATING, POST_MIGRATING,
                                        PRE_MIGRATING, REVERTING, Ledger, claim_key)


class HostPolicy(msgspec.Struct, frozen=True):
    """What the host's configuration says about claims."""
    name: str
    limit: ev.Resources
    overhead: ev.Resources = ev.ZERO


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


def _fits(state: Projection, policy: HostPolicy, need: ev.Resources) -> str:
    """Empty when `need` fits beside what the host holds; else why not."""
    used = _ledger(state, policy.name).used
    total = used + need
    if total.fits_in(policy.limit):
        return ""
    short = [f"{field} {getattr(total, field)} > {getattr(policy.limit, field)}"
             for field in ("vcpus", "memory_mb", "disk_gb")
             if getattr(total, field) > getattr(policy.limit, field)]
    return f"{policy.name} cannot hold it: " + ", ".join(short)


def decide_spawn(state: Projection, policy: HostPolicy, cmd: c.Spawn):
    if cmd.instance_uuid in state.instances:
        return Rejected(f"instance {cmd.instance_uuid} already exists on {policy.name}")
    need = cmd.flavor.resources(policy.overhead)
    why = _fits(state, policy, need)
    if why:
        return Rejected(why)
    return [ev.SpawnStarted(command_id=cmd.command_id, instance_uuid=cmd.instance_uuid,
                            instance_version=cmd.instance_version + 1, name=cmd.name,
                            flavor=cmd.flavor, resources=need, stopped=cmd.stopped,
                            image=cmd.image)]


def decide_prep(state: Projection, policy: HostPolicy, cmd: c.PrepResize):
    """resize_claim on the destination: Claimed, or ClaimRejected (no version bump)."""
    spec = msgspec.structs.replace(cmd.spec,
                                   new_resources=cmd.spec.new_flavor.resources(policy.overhead))
    reason = ""
    if spec.source == policy.name and not cmd.allow_same_host:
        reason = f"resize to the same host ({policy.name}) is not allowed"
    elif cmd.migration_id in state.migrations:
        reason = f"migration {cmd.migration_id} is already claimed here"
    else:
        # On the same host the old flavor is still held, so old and new must fit together.
        reason = _fits(state, policy, spec.new_resources)
    if reason:
        return [ev.ClaimRejected(command_id=cmd.command_id, migration_id=cmd.migration_id,
                                 instance_uuid=cmd.instance_uuid, dest=policy.name,
                                 reason=reason)]
    return [ev.Claimed(command_id=cmd.command_id, instance_uuid=cmd.instance_uuid,
                       instance_version=cmd.instance_version + 1,
                       migration_id=cmd.migration_id, spec=spec,
                       probe=probe_name(cmd.migration_id))]


def _migration_in(state: Projection, cmd, statuses) -> Rejected | None:
    mig = state.migrations.get(cmd.migration_id)
    if mig is None:
        return Rejected(f"migration {cmd.migration_id} is unknown here")
    if mig.status not in statuses:
        return Rejected(f"migration {cmd.migration_id} is {mig.status}, "
                        f"expected {' or '.join(sorted(statuses))}")
    return None


def _event(cls, cmd, bump: int = 1, **fields):
    return cls(command_id=cmd.command_id, instance_uuid=cmd.instance_uuid,
               instance_version=cmd.instance_version + bump,
               migration_id=cmd.migration_id, **fields)


def decide_resize_instance(state: Projection, policy: HostPolicy, cmd: c.ResizeInstance):
    inst = state.instances.get(cmd.instance_uuid)
    if inst is None or inst.host != policy.name:
        return Rejected(f"instance {cmd.instance_uuid} is not on {policy.name}")
    old, new = cmd.spec.old_flavor, cmd.spec.new_flavor
    if new.root_gb < old.root_gb or new.ephemeral_gb < old.ephemeral_gb:
        # Refused with a rollback: nothing has happened to the instance yet.
        return [_event(ev.Failed, cmd, step="resize_instance", rolled_back=True,
                       power_state=inst.power_state,
                       reason=f"disk shrink refused: root {old.root_gb} -> {new.root_gb} GB, "
                              f"ephemeral {old.ephemeral_gb} -> {new.ephemeral_gb} GB")]
    return [_event(ev.MigrationStarted, cmd, spec=cmd.spec, probe=cmd.probe)]


def decide_finish(state, policy, cmd: c.FinishResize):
    return _migration_in(state, cmd, {PRE_MIGRATING, POST_MIGRATING}) or [
        _event(ev.FinishStarted, cmd, disks=cmd.disks, shared_storage=cmd.shared_storage)]


def decide_confirm(state, policy, cmd: c.ConfirmResize):
    return _migration_in(state, cmd, {POST_MIGRATING, FINISHED, "confirming"}) or [
        _event(ev.ConfirmStarted, cmd, shared_storage=cmd.shared_storage)]


def decide_revert(state, policy, cmd: c.RevertResize):
    return _migration_in(state, cmd, {FINISHED}) or [
        _event(ev.RevertStarted, cmd, shared_storage=cmd.shared_storage)]


def decide_finish_revert(state, policy, cmd: c.FinishRevertResize):
    return _migration_in(state, cmd, {POST_MIGRATING, REVERTING}) or [
        _event(ev.RevertFinishStarted, cmd)]


def decide_restore(state, policy, cmd: c.RestoreSource):
    """No intent event: the outcome is appended after the driver call (see shell)."""
    return _migration_in(state, cmd, {MIGRATING, POST_MIGRATING, ERROR}) or []


def decide_release(state: Projection, policy: HostPolicy, cmd: c.ReleaseClaim):
    if cmd.migration_id not in state.migrations:
        return Rejected(f"migration {cmd.migration_id} is unknown here")
    ledger = _ledger(state, policy.name)
    if (cmd.role == "dest" and not cmd.remove_disks
            and claim_key(cmd.migration_id) not in ledger.allocations):
        return Rejected(f"{policy.name} holds no claim for {cmd.migration_id}")
    return []


def decide_abandon(state, policy, cmd: c.AbandonStep):
    return _migration_in(state, cmd, {MIGRATING, POST_MIGRATING, FINISHED, "confirming",
                                      REVERTING, ERROR}) or [
        _event(ev.Failed, cmd, step=cmd.step, reason=cmd.reason, rolled_back=False)]


DECIDE = {
    c.Spawn: decide_spawn, c.PrepResize: decide_prep,
    c.ResizeInstance: decide_resize_instance, c.FinishResize: decide_finish,
    c.ConfirmResize: decide_confirm, c.RevertResize: decide_revert,
    c.FinishRevertResize: decide_finish_revert, c.RestoreSource: decide_restore,
    c.ReleaseClaim: decide_release, c.AbandonStep: decide_abandon,
}


def decide(state: Projection, policy: HostPolicy, cmd: c.Command):
    """The events a command appends first (an intent, or a refusal event), or Rejected."""
    stale = check_version(state, cmd)
    if stale is not None:
        return stale
    return DECIDE[type(cmd)](state, policy, cmd)
