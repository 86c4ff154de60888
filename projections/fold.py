"""Pure folds of host events into instances, migrations and ledgers.

`evolve_instance`, `evolve_migration` and `evolve_ledger` take a state and one envelope
and return the next state; they read no clock, no file, no randomness. `Projection`
holds the three maps; `fold(envelopes, projection)` returns a new projection and never
changes the one it was given, so `fold(a + b) == fold(fold(a), b)`.

Instance and migration events must reach `fold` in instance-version order; one host's
log is, and `merge_logs` orders several hosts' logs that way.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import msgspec

from vmresize.events import schema as ev
from vmresize.events.schema import Envelope, RUNNING, SHUTDOWN
from vmresize.projections.state import (Instance, Ledger, Migration, claim_key,
                                        instance_key, source_key)
from vmresize.protocol.states import NOSTATE, MigrationStatus, Step, TaskState, VmState
from vmresize.protocol.table import DEST_STEPS, EVENTS, KEEP, SOURCE_STEPS

MIGRATING, PRE_MIGRATING = MigrationStatus.MIGRATING, MigrationStatus.PRE_MIGRATING

replace = msgspec.structs.replace


def _vm_state(power_state: int) -> str:
    return VmState.ACTIVE if power_state == RUNNING else VmState.STOPPED


# --------------------------------------------------------------------------- instances

def _spawn_started(inst, e: ev.SpawnStarted, env):
    return Instance(uuid=e.instance_uuid, name=e.name, host=env.host, flavor=e.flavor,
                    vm_state=VmState.BUILDING, task_state=TaskState.SPAWNING,
                    power_state=NOSTATE,
                    version=e.instance_version, resources=e.resources)


def _claimed(inst, e: ev.Claimed, env):
    s = e.spec
    if inst is None:    # the destination's first sight of the instance
        inst = Instance(uuid=e.instance_uuid, name=s.name, host=s.source,
                        flavor=s.old_flavor, vm_state=s.vm_state, task_state=None,
                        power_state=RUNNING if s.vm_state == "active" else SHUTDOWN,
                        version=0, resources=s.old_resources)
    return replace(inst, task_state=TaskState.RESIZE_PREP, migration_id=e.migration_id)


def _migration_started(inst, e: ev.MigrationStarted, env):
    s = e.spec
    if inst is None:
        inst = Instance(uuid=e.instance_uuid, name=s.name, host=s.source,
                        flavor=s.old_flavor, vm_state=s.vm_state, task_state=None,
                        power_state=RUNNING if s.vm_state == "active" else SHUTDOWN,
                        version=0, resources=s.old_resources)
    return replace(inst, task_state=TaskState.RESIZE_MIGRATING, migration_id=e.migration_id)


def _restored(inst, mig: Migration | None, power_state: int, **extra):
    """The instance back on its source with its old flavor (revert, rollback)."""
    changes = dict(task_state=None, power_state=power_state, migration_id="")
    if mig is not None:
        changes.update(host=mig.source_compute, flavor=mig.old_flavor,
                       resources=mig.old_resources, vm_state=mig.vm_state)
    changes.update(extra)
    return replace(inst, **changes)


def evolve_instance(inst: Instance | None, env: Envelope,
                    mig: Migration | None = None) -> Instance | None:
    """The instance after `env.event`; `mig` is its migration after the event. The
    task_state an event sets comes from the protocol table; the rest from the steps
    below."""
    e = env.event
    t = type(e)
    if t is ev.SpawnStarted:
        return _spawn_started(inst, e, env)
    if t is ev.Claimed:
        inst = _claimed(inst, e, env)
    elif t is ev.MigrationStarted:
        inst = _migration_started(inst, e, env)
    elif inst is None:
        return None     # a host that never saw the instance's earlier events
    task = _TASK_STATE.get(t, KEEP)
    if task is not KEEP:
        inst = replace(inst, task_state=task)
    step = _INSTANCE_STEPS.get(t)
    if step is not None:
        inst = step(inst, e, mig)
    return replace(inst, version=e.instance_version)


def _failed(inst, e: ev.Failed, mig):
    if e.step == Step.FINISH:     # the source still has to take the instance back
        return replace(inst, task_state=TaskState.RESIZE_REVERTING)
    if e.step in (Step.CONFIRM, Step.REVERT):     # the instance stays on the destination
        return replace(inst, vm_state=VmState.ERROR, task_state=None, migration_id="")
    if not e.rolled_back:
        return _restored(inst, mig, e.power_state, vm_state=VmState.ERROR)
    return _restored(inst, mig, e.power_state)


def _action_failed(inst, e: ev.ActionFailed, mig):
    # A failed delete leaves an instance in error that still holds its resources.
    return replace(inst, vm_state=VmState.ERROR) if e.step == Step.DELETE else inst


_TASK_STATE = {t: r.task_state for t, r in EVENTS.items()
               if t not in (ev.SpawnStarted, ev.Claimed, ev.MigrationStarted)}

_INSTANCE_STEPS = {
    ev.Spawned: lambda i, e, m: replace(i, vm_state=_vm_state(e.power_state),
                                        power_state=e.power_state),
    ev.SpawnFailed: lambda i, e, m: replace(i, vm_state=VmState.ERROR, power_state=NOSTATE),
    ev.PoweredOff: lambda i, e, m: replace(i, vm_state=VmState.STOPPED, power_state=SHUTDOWN),
    ev.PoweredOn: lambda i, e, m: replace(i, vm_state=VmState.ACTIVE, power_state=RUNNING),
    ev.RebootStarted: lambda i, e, m: replace(i, task_state=TaskState.REBOOTING_HARD)
    if e.hard else i,
    ev.Rebooted: lambda i, e, m: replace(i, vm_state=VmState.ACTIVE, power_state=RUNNING),
    ev.Deleted: lambda i, e, m: replace(i, deleted=True, vm_state=VmState.DELETED,
                                        power_state=NOSTATE),
    ev.ActionFailed: _action_failed,
    ev.ClaimReleased: lambda i, e, m: replace(i, task_state=None, migration_id="")
    if i.task_state == TaskState.RESIZE_PREP else i,
    ev.DiskMigrated: lambda i, e, m: replace(
        i, power_state=SHUTDOWN, host=m.dest_compute if m else i.host),
    ev.Finished: lambda i, e, m: replace(
        i, vm_state=VmState.RESIZED, power_state=e.power_state,
        host=m.dest_compute if m else i.host, flavor=m.new_flavor if m else i.flavor,
        resources=m.new_resources if m else i.resources),
    ev.Confirmed: lambda i, e, m: replace(i, vm_state=m.vm_state if m else VmState.ACTIVE,
                                          migration_id=""),
    ev.Reverted: lambda i, e, m: _restored(i, m, e.power_state),
    ev.Failed: _failed,
    ev.SourceRestored: lambda i, e, m: _restored(i, m, e.power_state),
}


# --------------------------------------------------------------------------- migrations

def _new_migration(e, status: str, wall_time: float) -> Migration:
    s = e.spec
    return Migration(id=e.migration_id, instance_uuid=e.instance_uuid,
                     source_compute=s.source, dest_compute=s.dest, status=status,
                     migration_type=s.migration_type, old_flavor=s.old_flavor,
                     new_flavor=s.new_flavor, created_at=s.created_at or wall_time,
                     updated_at=wall_time, old_resources=s.old_resources,
                     new_resources=s.new_resources, vm_state=s.vm_state,
                     version=e.instance_version)


# Each migration event's status, from the protocol table (Claimed creates the record).
_MIGRATION_STATUS = {t: r.migration for t, r in EVENTS.items()
                     if r.migration is not KEEP and t is not ev.Claimed}


def evolve_migration(mig: Migration | None, env: Envelope) -> Migration | None:
    e = env.event
    t = type(e)
    if t is ev.Claimed:
        return replace(_new_migration(e, PRE_MIGRATING, env.wall_time),
                       claim_ready=not e.probe_pending)
    if t is ev.ProbeCreated:
        return replace(mig, claim_ready=True) if mig is not None else None
    status = _MIGRATION_STATUS.get(t)
    if status is None:
        return mig
    if mig is None:
        if t is not ev.MigrationStarted:
            return None
        mig = _new_migration(e, MIGRATING, env.wall_time)
    changes = dict(status=status, updated_at=env.wall_time, version=e.instance_version)
    if t is ev.DiskMigrated:
        changes.update(shared_storage=e.shared_storage, disk_migrated=True,
                       resize_dir=True, dest_copy=not e.shared_storage)
    elif t in (ev.Reverted, ev.SourceRestored):
        changes.update(resize_dir=False)
    elif t is ev.Confirmed:
        changes.update(resize_dir=False, dest_copy=False)
    elif t is ev.DestReverted:
        changes.update(dest_copy=False, dest_reverted=True)
    elif t is ev.Failed and e.step == "finish" and e.rolled_back:
        changes.update(dest_copy=False)
    elif t is ev.ClaimReleased:
        if e.role == "dest" and e.disks_removed:
            changes.update(dest_copy=False)
        if not mig.reason:
            changes.update(reason=e.reason)
    elif t is ev.MigrationStarted:
        changes.update(source_started=True)
    if t in _DEST_SETTLES or (t is ev.ClaimReleased and e.role == "dest") or (
            t is ev.Failed and e.step in DEST_STEPS):
        changes.update(dest_settled=True)
    if t in _SOURCE_SETTLES or (t is ev.ClaimReleased and e.role == "source") or (
            t is ev.Failed and e.step in SOURCE_STEPS):
        changes.update(source_settled=True)
    if t is ev.Failed:
        changes.update(failed_step=e.step, reason=e.reason)
        if e.step == "migrate":
            changes.update(shared_storage=e.shared_storage,
                           dest_copy=mig.dest_copy or e.dest_copy)
    return replace(mig, **changes)


_DEST_SETTLES = frozenset({ev.Finished, ev.DestReverted})

_SOURCE_SETTLES = frozenset({ev.SourceRestored, ev.Confirmed, ev.Reverted})


# --------------------------------------------------------------------------- ledgers

_NONE = ev.ZERO


def _move(allocs: dict, src: str, dst: str) -> ev.Resources:
    if src in allocs and dst not in allocs:
        allocs[dst] = allocs.pop(src)
    return _NONE


def _put(allocs: dict, key: str, res: ev.Resources) -> ev.Resources:
    old = allocs.get(key)
    allocs[key] = res
    return res if old is None else res - old


def _pop(allocs: dict, key: str) -> ev.Resources:
    old = allocs.pop(key, None)
    return _NONE if old is None else _NONE - old


def _ledger_changes(allocs: dict, e) -> ev.Resources:
    """Apply one event's allocation changes to a (private) dict of allocations; return
    by how much the sum of the allocations changed."""
    t = type(e)
    uuid = getattr(e, "instance_uuid", "")
    mid = getattr(e, "migration_id", "")
    if t is ev.SpawnStarted:
        return _put(allocs, instance_key(uuid), e.resources)
    if t is ev.SpawnFailed or t is ev.Deleted:
        return _pop(allocs, instance_key(uuid))
    if t is ev.Claimed:
        return _put(allocs, claim_key(mid), e.spec.new_resources)
    if t is ev.MigrationStarted:
        return _move(allocs, instance_key(uuid), source_key(mid))
    if t is ev.Finished:
        return _move(allocs, claim_key(mid), instance_key(uuid))
    if t is ev.Confirmed:
        return _pop(allocs, source_key(mid))
    if t is ev.DestReverted:
        return _pop(allocs, instance_key(uuid))
    if t is ev.Reverted or t is ev.SourceRestored:
        return _move(allocs, source_key(mid), instance_key(uuid))
    if t is ev.ClaimReleased:
        return _pop(allocs, claim_key(mid) if e.role == "dest" else source_key(mid))
    if t is ev.Failed:
        if e.step in DEST_STEPS:
            return _pop(allocs, claim_key(mid))
        if e.step == "confirm":
            return _pop(allocs, source_key(mid))
        return _move(allocs, source_key(mid), instance_key(uuid))
    return _NONE


_LEDGER_EVENTS = frozenset({
    ev.SpawnStarted, ev.SpawnFailed, ev.Deleted, ev.Claimed, ev.MigrationStarted,
    ev.Finished, ev.Confirmed, ev.DestReverted, ev.Reverted, ev.SourceRestored,
    ev.ClaimReleased, ev.Failed})


def evolve_ledger(ledger: Ledger, env: Envelope) -> Ledger:
    """Pure: a new ledger; the one given is left as it was."""
    e = env.event
    t = type(e)
    if t is ev.HostConfigured:
        return replace(ledger, capacity=e.capacity, limit=e.limit, driver=e.driver)
    if t not in _LEDGER_EVENTS:
        return ledger
    allocs = dict(ledger.allocations)
    delta = _ledger_changes(allocs, e)
    return replace(ledger, allocations=allocs, used=ledger.used + delta)


def _evolve_ledger_in_place(ledger: Ledger, env: Envelope) -> Ledger:
    """Like evolve_ledger, but changes `ledger.allocations` in place: for a projection
    that owns its ledgers (see Projection.copy), where copying a host's allocations on
    every event would make a fold quadratic."""
    e = env.event
    t = type(e)
    if t is ev.HostConfigured:
        return replace(ledger, capacity=e.capacity, limit=e.limit, driver=e.driver)
    delta = _ledger_changes(ledger.allocations, e)
    if delta is _NONE:
        return ledger
    return replace(ledger, used=ledger.used + delta)


# --------------------------------------------------------------------------- projection

class Projection(msgspec.Struct):
    """Instances, migrations and ledgers as of some point of some logs."""
    instances: dict[str, Instance] = {}
    migrations: dict[str, Migration] = {}
    ledgers: dict[str, Ledger] = {}
    offsets: dict[str, int] = {}       # host -> next offset not yet folded
    events: int = 0

    def copy(self) -> "Projection":
        """An independent copy: `apply` on it never shows through to this one."""
        ledgers = {h: replace(l, allocations=dict(l.allocations))
                   for h, l in self.ledgers.items()}
        return Projection(dict(self.instances), dict(self.migrations), ledgers,
                          dict(self.offsets), self.events)


def apply(p: Projection, env: Envelope) -> None:
    """Fold one envelope into `p` in place. Only `fold` and owners of a private
    projection (a host shell, the auditor) call this."""
    e = env.event
    t = type(e)
    host = env.host
    ledger = p.ledgers.get(host)
    if ledger is None:
        ledger = p.ledgers[host] = Ledger(host=host, allocations={})
    if t is ev.HostConfigured or t in _LEDGER_EVENTS:
        p.ledgers[host] = _evolve_ledger_in_place(ledger, env)
    if isinstance(e, ev.InstanceEvent):
        uuid = e.instance_uuid
        mid = getattr(e, "migration_id", "")
        mig = p.migrations.get(mid) if mid else None
        new_mig = evolve_migration(mig, env) if mid else None
        inst = evolve_instance(p.instances.get(uuid), env, new_mig or mig)
        if inst is not None:
            p.instances[uuid] = inst
        if new_mig is not None:
            p.migrations[mid] = new_mig
    p.offsets[host] = env.offset + 1
    p.events += 1


def fold(envelopes: Iterable[Envelope], projection: Projection | None = None) -> Projection:
    p = projection.copy() if projection is not None else Projection()
    for env in envelopes:
        apply(p, env)
    return p


def evolve(projection: Projection, env: Envelope) -> Projection:
    return fold((env,), projection)


def merge_logs(logs: dict[str, Iterable[Envelope]],
               start_versions: dict[str, int] | None = None) -> Iterator[Envelope]:
    """Interleave several hosts' logs so that every instance's events come in version
    order and every host's in offset order.

    A host event waits until the instance events it follows on other hosts have been
    yielded: we yield, among the heads of the logs, an event whose instance version is
    the next one expected for its instance, or a non-instance event. When no head
    qualifies (a gap or a fork in the versions), the oldest head by wall time goes first
    so the auditor still sees every record and reports the chain break where it is: a
    head waiting for a record that sits behind another head was written after that
    head, so the oldest one waits for a record that no log holds.
    """
    iters = {h: iter(log) for h, log in logs.items()}
    expected: dict[str, int] = dict(start_versions or {})
    heads: dict[str, Envelope] = {}
    ready: deque[str] = deque()
    blocked: dict[tuple[str, int], list[str]] = {}    # (uuid, version) -> hosts waiting

    def place(host: str, env: Envelope) -> None:
        heads[host] = env
        e = env.event
        if not isinstance(e, ev.InstanceEvent):
            ready.append(host)
            return
        want = expected.get(e.instance_uuid, 0) + 1
        if e.instance_version <= want:
            ready.append(host)
        else:
            blocked.setdefault((e.instance_uuid, e.instance_version), []).append(host)

    for h in sorted(iters):
        env = next(iters[h], None)
        if env is not None:
            place(h, env)
    while heads:
        if ready:
            host = ready.popleft()
        else:      # a gap or a fork: let the oldest waiting record through
            key, host = min(((k, h) for k, hosts in blocked.items() for h in hosts),
                            key=lambda kh: (heads[kh[1]].wall_time, kh[0][1], kh[0][0]))
            blocked[key].remove(host)
            if not blocked[key]:
                del blocked[key]
        env = heads.pop(host)
        e = env.event
        yield env
        if isinstance(e, ev.InstanceEvent) and e.instance_version > expected.get(
                e.instance_uuid, 0):
            expected[e.instance_uuid] = e.instance_version
            waiting = blocked.pop((e.instance_uuid, e.instance_version + 1), None)
            if waiting:
                ready.extend(waiting)
        nxt = next(iters[host], None)
        if nxt is not None:
            place(host, nxt)
