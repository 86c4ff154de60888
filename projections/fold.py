"""Pure folds of host events into instances, migrations and ledgers.

The fold runs on `FoldState`, a projection's mutable twin: one record per instance,
migration and host ledger, changed in place by each event (no copy of a state, no dict
of changes per event), so a replay costs a few attribute writes per record. `Projection`
is what everyone else sees: dicts of the frozen views in `projections.state`, copied
from the records an event touched. `fold(envelopes, projection)` runs the events on a
`FoldState` and hands back a new `Projection`; it never changes the one it was given, so
`fold(a + b) == fold(fold(a), b)`. `evolve_instance`, `evolve_migration` and
`evolve_ledger` are the same steps on one frozen value. Nothing here reads a clock, a
file or randomness.

Instance and migration events must reach the fold in instance-version order; one host's
log is, and `merge_logs` orders several hosts' logs that way.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import msgspec

from vmresize.events import schema as ev
from vmresize.events.schema import Envelope, RUNNING, SHUTDOWN
from vmresize.projections.state import (Instance, Ledger, Migration, claim_key,
                                        instance_key, migration_final, source_key)
from vmresize.protocol.states import NOSTATE, MigrationStatus, Step, TaskState, VmState
from vmresize.protocol.table import CLEANUP_STEPS, DEST_STEPS, EVENTS, KEEP, SOURCE_STEPS

MIGRATING, PRE_MIGRATING = MigrationStatus.MIGRATING, MigrationStatus.PRE_MIGRATING

replace = msgspec.structs.replace


# --------------------------------------------------------------------------- records

def _record_of(view: type, namespace: dict | None = None) -> type:
    """A mutable twin of a frozen view in projections.state: the same fields in the
    same order, so `_view` freezes a record and `_thaw` thaws a view, each in one call."""
    fields = [(f.name, f.type) if f.required else (f.name, f.type, f.default)
              for f in msgspec.structs.fields(view)]
    return msgspec.defstruct(view.__name__ + "Record", fields, gc=False,
                             module=__name__, namespace=namespace)


InstanceRecord = _record_of(Instance)
MigrationRecord = _record_of(Migration, {"final": property(migration_final)})
LedgerRecord = _record_of(Ledger)     # its `allocations` is the dict its views share
_VIEWS = {InstanceRecord: Instance, MigrationRecord: Migration, LedgerRecord: Ledger}
_astuple = msgspec.structs.astuple


def _view(record):
    return _VIEWS[type(record)](*_astuple(record))


def _thaw(record_type: type, view):
    return record_type(*_astuple(view))


def _new_ledger(host: str) -> LedgerRecord:
    return LedgerRecord(host=host, allocations={})


# --------------------------------------------------------------------------- instances
#
# The task_state an event sets comes from the protocol table (`_TASK_STATE`); a step
# below, one per event type that does more, changes the instance record in place. `mig`
# is the instance's migration after the event (None for an event of no migration, or one
# this log never saw claimed). The caller sets the version.

def _vm_state(power_state: int) -> str:
    return VmState.ACTIVE if power_state == RUNNING else VmState.STOPPED


def _seen_from_spec(e) -> InstanceRecord:
    """The instance as a host that first hears of it through a migration knows it."""
    s = e.spec
    return InstanceRecord(uuid=e.instance_uuid, name=s.name, host=s.source,
                          flavor=s.old_flavor, vm_state=s.vm_state, task_state=None,
                          power_state=RUNNING if s.vm_state == "active" else SHUTDOWN,
                          version=0, resources=s.old_resources)


def _restored(i, m, power_state: int, vm_state: str | None = None) -> None:
    """The instance back on its source with its old flavor (revert, rollback)."""
    i.task_state = None
    i.power_state = power_state
    i.migration_id = ""
    if m is not None:
        i.host = m.source_compute
        i.flavor = m.old_flavor
        i.resources = m.old_resources
        i.vm_state = m.vm_state
    if vm_state is not None:
        i.vm_state = vm_state


def _i_spawned(i, e: ev.Spawned, m) -> None:
    i.vm_state = _vm_state(e.power_state)
    i.power_state = e.power_state


def _i_spawn_failed(i, e, m) -> None:
    i.vm_state = VmState.ERROR
    i.power_state = NOSTATE


def _i_powered_off(i, e, m) -> None:
    i.vm_state = VmState.STOPPED
    i.power_state = SHUTDOWN


def _i_running(i, e, m) -> None:     # PoweredOn, Rebooted
    i.vm_state = VmState.ACTIVE
    i.power_state = RUNNING


def _i_reboot_started(i, e: ev.RebootStarted, m) -> None:
    if e.hard:
        i.task_state = TaskState.REBOOTING_HARD


def _i_deleted(i, e, m) -> None:
    i.deleted = True
    i.vm_state = VmState.DELETED
    i.power_state = NOSTATE


def _i_action_failed(i, e: ev.ActionFailed, m) -> None:
    if e.step == Step.DELETE:   # a failed delete leaves an instance in error, still held
        i.vm_state = VmState.ERROR


def _i_claimed(i, e, m) -> None:
    i.task_state = TaskState.RESIZE_PREP
    i.migration_id = e.migration_id


def _i_claim_released(i, e, m) -> None:
    if i.task_state == TaskState.RESIZE_PREP:
        i.task_state = None
        i.migration_id = ""


def _i_migration_started(i, e, m) -> None:
    i.task_state = TaskState.RESIZE_MIGRATING
    i.migration_id = e.migration_id


def _i_disk_migrated(i, e, m) -> None:
    i.power_state = SHUTDOWN
    if m is not None:
        i.host = m.dest_compute


def _i_finished(i, e: ev.Finished, m) -> None:
    i.vm_state = VmState.RESIZED
    i.power_state = e.power_state
    if m is not None:
        i.host = m.dest_compute
        i.flavor = m.new_flavor
        i.resources = m.new_resources


def _i_confirmed(i, e, m) -> None:
    i.vm_state = m.vm_state if m is not None else VmState.ACTIVE
    i.migration_id = ""


def _i_restored(i, e, m) -> None:      # Reverted
    _restored(i, m, e.power_state)


def _i_source_restored(i, e, m) -> None:
    """Back on its source after a failure; in error if a cleanup of the migration was
    abandoned (a copy may be left on the destination: protocol.table CLEANUP_STEPS)."""
    abandoned = m is not None and m.failed_step in CLEANUP_STEPS
    _restored(i, m, e.power_state, VmState.ERROR if abandoned else None)


def _i_failed(i, e: ev.Failed, m) -> None:
    if e.step == Step.FINISH:     # the source still has to take the instance back
        i.task_state = TaskState.RESIZE_REVERTING
    elif e.step in (Step.CONFIRM, Step.REVERT):     # it stays on the destination
        i.vm_state = VmState.ERROR
        i.task_state = None
        i.migration_id = ""
    else:
        _restored(i, m, e.power_state, None if e.rolled_back else VmState.ERROR)


_TASK_STATE = {t: r.task_state for t, r in EVENTS.items()
               if t not in (ev.SpawnStarted, ev.Claimed, ev.MigrationStarted)}

_INSTANCE_STEPS = {
    ev.Spawned: _i_spawned,
    ev.SpawnFailed: _i_spawn_failed,
    ev.PoweredOff: _i_powered_off,
    ev.PoweredOn: _i_running,
    ev.RebootStarted: _i_reboot_started,
    ev.Rebooted: _i_running,
    ev.Deleted: _i_deleted,
    ev.ActionFailed: _i_action_failed,
    ev.Claimed: _i_claimed,
    ev.ClaimReleased: _i_claim_released,
    ev.MigrationStarted: _i_migration_started,
    ev.DiskMigrated: _i_disk_migrated,
    ev.Finished: _i_finished,
    ev.Confirmed: _i_confirmed,
    ev.Reverted: _i_restored,
    ev.Failed: _i_failed,
    ev.SourceRestored: _i_source_restored,
}


# --------------------------------------------------------------------------- migrations
#
# A migration event sets the migration's status (from the protocol table), `updated_at`
# and `version`; the steps below change what else the event says.

_MIGRATION_STATUS = {t: r.migration for t, r in EVENTS.items()
                     if r.migration is not KEEP and t is not ev.Claimed}


def _new_migration(e, status: str, wall_time: float) -> MigrationRecord:
    s = e.spec
    return MigrationRecord(
        id=e.migration_id, instance_uuid=e.instance_uuid, source_compute=s.source,
        dest_compute=s.dest, status=status, migration_type=s.migration_type,
        old_flavor=s.old_flavor, new_flavor=s.new_flavor,
        created_at=s.created_at or wall_time, updated_at=wall_time,
        old_resources=s.old_resources, new_resources=s.new_resources, vm_state=s.vm_state,
        version=e.instance_version)


def _m_claim_released(m, e: ev.ClaimReleased) -> None:
    if e.role == "dest":
        if e.disks_removed:
            m.dest_copy = False
        m.dest_settled = True
    elif e.role == "source":
        m.source_settled = True
    if not m.reason:
        m.reason = e.reason


def _m_migration_started(m, e) -> None:
    m.source_started = True


def _m_disk_migrated(m, e: ev.DiskMigrated) -> None:
    m.shared_storage = e.shared_storage
    m.disk_migrated = True
    m.resize_dir = True
    m.dest_copy = not e.shared_storage


def _m_finished(m, e) -> None:
    m.dest_settled = True


def _m_confirmed(m, e) -> None:
    m.resize_dir = False
    m.dest_copy = False
    m.source_settled = True


def _m_dest_reverted(m, e) -> None:
    m.dest_copy = False
    m.dest_reverted = True
    m.dest_settled = True


def _m_source_back(m, e) -> None:     # Reverted, SourceRestored
    m.resize_dir = False
    m.source_settled = True


def _m_failed(m, e: ev.Failed) -> None:
    step = e.step
    if step == "finish" and e.rolled_back:
        m.dest_copy = False
    elif step == "migrate":
        m.shared_storage = e.shared_storage
        m.dest_copy = m.dest_copy or e.dest_copy
    if step in DEST_STEPS:
        m.dest_settled = True
    if step in SOURCE_STEPS:
        m.source_settled = True
    m.failed_step = step
    m.reason = e.reason


_MIGRATION_STEPS = {
    ev.ClaimReleased: _m_claim_released,
    ev.MigrationStarted: _m_migration_started,
    ev.DiskMigrated: _m_disk_migrated,
    ev.Finished: _m_finished,
    ev.Confirmed: _m_confirmed,
    ev.DestReverted: _m_dest_reverted,
    ev.Reverted: _m_source_back,
    ev.SourceRestored: _m_source_back,
    ev.Failed: _m_failed,
}


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


def _l_failed(allocs: dict, e: ev.Failed) -> ev.Resources:
    mid = e.migration_id
    if e.step in DEST_STEPS:
        return _pop(allocs, claim_key(mid))
    if e.step == "confirm":
        return _pop(allocs, source_key(mid))
    return _move(allocs, source_key(mid), instance_key(e.instance_uuid))


# Keys are built inline ("i:" + uuid is instance_key, "m:" + mid + ":new" claim_key,
# "m:" + mid + ":old" source_key): these run for most records of a replay.
_LEDGER_RULES = {
    ev.SpawnStarted: lambda a, e: _put(a, "i:" + e.instance_uuid, e.resources),
    ev.SpawnFailed: lambda a, e: _pop(a, "i:" + e.instance_uuid),
    ev.Deleted: lambda a, e: _pop(a, "i:" + e.instance_uuid),
    ev.Claimed: lambda a, e: _put(a, "m:" + e.migration_id + ":new", e.spec.new_resources),
    ev.MigrationStarted: lambda a, e: _move(a, "i:" + e.instance_uuid,
                                            "m:" + e.migration_id + ":old"),
    ev.Finished: lambda a, e: _move(a, "m:" + e.migration_id + ":new",
                                    "i:" + e.instance_uuid),
    ev.Confirmed: lambda a, e: _pop(a, "m:" + e.migration_id + ":old"),
    ev.DestReverted: lambda a, e: _pop(a, "i:" + e.instance_uuid),
    ev.Reverted: lambda a, e: _move(a, "m:" + e.migration_id + ":old",
                                    "i:" + e.instance_uuid),
    ev.SourceRestored: lambda a, e: _move(a, "m:" + e.migration_id + ":old",
                                          "i:" + e.instance_uuid),
    ev.ClaimReleased: lambda a, e: _pop(a, "m:" + e.migration_id + (
        ":new" if e.role == "dest" else ":old")),
    ev.Failed: _l_failed,
}
_LEDGER_EVENTS = frozenset(_LEDGER_RULES)


def _ledger_changes(allocs: dict, e) -> ev.Resources:
    """Apply one event's allocation changes to a (private) dict of allocations; return
    by how much the sum of the allocations changed."""
    rule = _LEDGER_RULES.get(type(e))
    return _NONE if rule is None else rule(allocs, e)


# --------------------------------------------------------------------------- the fold

_INSTANCE_EVENTS = frozenset(t for t in ev.HOST_EVENT_TYPES if issubclass(t, ev.InstanceEvent))
_MIGRATION_EVENTS = frozenset(t for t in ev.HOST_EVENT_TYPES
                              if issubclass(t, ev.MigrationEvent))


class FoldState:
    """Instances, migrations and ledgers as mutable records (see the module docstring),
    and how far each host's log has been folded. `apply` is the fold's one step."""
    __slots__ = ("instances", "migrations", "ledgers", "offsets", "events")

    def __init__(self):
        self.instances: dict[str, InstanceRecord] = {}
        self.migrations: dict[str, MigrationRecord] = {}
        self.ledgers: dict[str, LedgerRecord] = {}
        self.offsets: dict[str, int] = {}      # host -> next offset not yet folded
        self.events = 0

    @classmethod
    def of(cls, p: "Projection") -> "FoldState":
        """The records of `p`'s views; the ledgers share their allocation dicts."""
        s = cls()
        s.instances = {k: _thaw(InstanceRecord, v) for k, v in p.instances.items()}
        s.migrations = {k: _thaw(MigrationRecord, v) for k, v in p.migrations.items()}
        s.ledgers = {k: _thaw(LedgerRecord, v) for k, v in p.ledgers.items()}
        s.offsets = dict(p.offsets)
        s.events = p.events
        return s

    def projection(self) -> "Projection":
        """Frozen views of every record (the ledgers' views share their allocations)."""
        return Projection({k: _view(v) for k, v in self.instances.items()},
                          {k: _view(v) for k, v in self.migrations.items()},
                          {k: _view(v) for k, v in self.ledgers.items()},
                          dict(self.offsets), self.events)

    def apply(self, env: Envelope, ledgers: bool = True, instances: bool = True) -> None:
        """Fold one envelope. A host's ledger depends on that host's records alone and
        instances and migrations on instance records alone, so an auditor may fold
        either half on its own (`ledgers=False` or `instances=False`)."""
        # The hottest code of a replay: module constants instead of `ev.` lookups, and
        # the common path of a migration event inline.
        e = env.event
        t = type(e)
        host = env.host
        ledger = self.ledgers.get(host)
        if ledger is None:
            ledger = self.ledgers[host] = _new_ledger(host)
        if not ledgers:
            pass
        elif t in _LEDGER_EVENTS:
            delta = _ledger_changes(ledger.allocations, e)
            if delta is not _NONE:
                ledger.used = ledger.used + delta
        elif t is _HOST_CONFIGURED:
            ledger.capacity, ledger.limit, ledger.driver = e.capacity, e.limit, e.driver
        plan = _PLANS.get(t) if instances else None
        if plan is not None:        # an instance event
            status, migration_step, task, instance_step = plan
            v = e.instance_version
            if status is not None:      # a step of a migration claimed before
                mid = e.migration_id
                mig = self.migrations.get(mid)
                if mig is None and mid:
                    mig = self._first_sight(env, e, t)
                if mig is not None:
                    mig.status = status
                    mig.updated_at = env.wall_time
                    mig.version = v
                    if migration_step is not None:
                        migration_step(mig, e)
            elif t is _CLAIMED:
                mid = e.migration_id     # a new migration, even over one of the same id
                mig = _new_migration(e, PRE_MIGRATING, env.wall_time) if mid else None
                if mig is not None:
                    mig.claim_ready = not e.probe_pending
                    self.migrations[mid] = mig
            elif t is _PROBE_CREATED:
                mig = self.migrations.get(e.migration_id) if e.migration_id else None
                if mig is not None:
                    mig.claim_ready = True
            elif t in _MIGRATION_EVENTS and e.migration_id:
                mig = self.migrations.get(e.migration_id)
            else:
                mig = None
            uuid = e.instance_uuid
            if t is _SPAWN_STARTED:
                self.instances[uuid] = InstanceRecord(
                    uuid=uuid, name=e.name, host=host, flavor=e.flavor,
                    vm_state=VmState.BUILDING, task_state=TaskState.SPAWNING,
                    power_state=NOSTATE, version=v, resources=e.resources)
            else:
                inst = self.instances.get(uuid)
                if inst is None and (t is _CLAIMED or t is _MIGRATION_STARTED):
                    inst = self.instances[uuid] = _seen_from_spec(e)
                if inst is not None:     # else a host that never saw the instance before
                    if task is not KEEP:
                        inst.task_state = task
                    if instance_step is not None:
                        instance_step(inst, e, mig)
                    inst.version = v
        self.offsets[host] = env.offset + 1
        self.events += 1

    def _first_sight(self, env: Envelope, e, t) -> MigrationRecord | None:
        """A migration this log never saw claimed: the source's first record of it
        starts it; anything else has no migration to change."""
        if t is not _MIGRATION_STARTED:
            return None
        mig = self.migrations[e.migration_id] = _new_migration(e, MIGRATING, env.wall_time)
        return mig


# Per instance event type, everything its step looks up, in one lookup: the migration
# status it sets (None: none, or a Claimed, which starts one), its migration step, the
# task_state it sets (KEEP: none) and its instance step.
_PLANS = {t: (_MIGRATION_STATUS.get(t), _MIGRATION_STEPS.get(t), _TASK_STATE.get(t, KEEP),
              _INSTANCE_STEPS.get(t)) for t in _INSTANCE_EVENTS}
_HOST_CONFIGURED, _SPAWN_STARTED = ev.HostConfigured, ev.SpawnStarted
_CLAIMED, _MIGRATION_STARTED = ev.Claimed, ev.MigrationStarted
_PROBE_CREATED = ev.ProbeCreated


# --------------------------------------------------------------------------- projection

class Projection(msgspec.Struct):
    """Instances, migrations and ledgers as of some point of some logs: frozen views,
    the fields a snapshot stores. Each ledger's `allocations` dict belongs to the
    projection and changes in place (see `copy`); an owner may drop entries it no longer
    needs (a host forgets ended migrations)."""
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
    projection (a host shell, the controller) call this. The views the event touches
    are thawed into a FoldState of their own, the step runs there, and their frozen
    successors replace them: the views stay the only state, whatever an owner drops."""
    e = env.event
    t = type(e)
    host = env.host
    s = FoldState()
    view = p.ledgers.get(host)
    ledger = s.ledgers[host] = (_thaw(LedgerRecord, view) if view is not None
                                else _new_ledger(host))
    uuid = mid = ""
    if t in _INSTANCE_EVENTS:
        uuid = e.instance_uuid
        inst = p.instances.get(uuid)
        if inst is not None:
            s.instances[uuid] = _thaw(InstanceRecord, inst)
        if t in _MIGRATION_EVENTS:
            mid = e.migration_id
            mig = p.migrations.get(mid) if mid else None
            if mig is not None:
                s.migrations[mid] = _thaw(MigrationRecord, mig)
    s.apply(env)
    if (view is None or view.used is not ledger.used or view.limit is not ledger.limit
            or view.capacity is not ledger.capacity or view.driver is not ledger.driver):
        p.ledgers[host] = _view(ledger)     # its allocations: the same dict, changed
    if uuid:
        record = s.instances.get(uuid)
        if record is not None:
            p.instances[uuid] = _view(record)
    if mid:
        record = s.migrations.get(mid)
        if record is not None:
            p.migrations[mid] = _view(record)
    p.offsets[host] = env.offset + 1
    p.events += 1


def fold(envelopes: Iterable[Envelope], projection: Projection | None = None) -> Projection:
    """The projection after `envelopes`, from `projection` (left as it was) or empty."""
    s = FoldState.of(projection.copy()) if projection is not None else FoldState()
    for env in envelopes:
        s.apply(env)
    return s.projection()


def evolve(projection: Projection, env: Envelope) -> Projection:
    return fold((env,), projection)


# --------------------------------------------------------------------------- one value

def _one(view: Ledger | None, env: Envelope) -> FoldState:
    s = FoldState()
    s.ledgers[env.host] = _thaw(LedgerRecord, view) if view else _new_ledger(env.host)
    return s


def evolve_instance(inst: Instance | None, env: Envelope,
                    mig: Migration | None = None) -> Instance | None:
    """The instance after `env.event`; `mig` is its migration before the event."""
    s = _one(None, env)
    e = env.event
    if inst is not None:
        s.instances[inst.uuid] = _thaw(InstanceRecord, inst)
    if mig is not None:
        s.migrations[mig.id] = _thaw(MigrationRecord, mig)
    s.apply(env)
    record = s.instances.get(getattr(e, "instance_uuid", None))
    return _view(record) if record is not None else None


def evolve_migration(mig: Migration | None, env: Envelope) -> Migration | None:
    if type(env.event) not in _MIGRATION_EVENTS:
        return mig
    s = _one(None, env)
    if mig is not None:
        s.migrations[mig.id] = _thaw(MigrationRecord, mig)
    s.apply(env)
    record = s.migrations.get(getattr(env.event, "migration_id", None))
    return _view(record) if record is not None else None


def evolve_ledger(ledger: Ledger, env: Envelope) -> Ledger:
    """Pure: a new ledger; the one given is left as it was."""
    e = env.event
    if type(e) is not ev.HostConfigured and type(e) not in _LEDGER_EVENTS:
        return ledger
    s = _one(replace(ledger, allocations=dict(ledger.allocations)), env)
    s.apply(env)
    return _view(s.ledgers[env.host])


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
        if type(e) not in _INSTANCE_EVENTS:
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
        if type(e) in _INSTANCE_EVENTS and e.instance_version > expected.get(
                e.instance_uuid, 0):
            expected[e.instance_uuid] = e.instance_version
            waiting = blocked.pop((e.instance_uuid, e.instance_version + 1), None)
            if waiting:
                ready.extend(waiting)
        nxt = next(iters[host], None)
        if nxt is not None:
            place(host, nxt)
