"""The auditor: replays every host log and checks the six invariants of DESIGN §4.

`check(logs)` is pure: it takes each host's envelopes and returns an `AuditReport`
naming every violation with its host and log offset; it takes the hosts the cluster
should have too: a missing or empty log of one of them is a `host-log` violation.
Reading a state directory and checking it (on one process or two) is
`vmresize.offline.audit`, which owns the I/O this module does not do.

`as_of` audits a consistent cut: a wall time (records at or before it; one clock for
all hosts), or HOST:OFFSET, that record and every record it depends on (its log's
earlier records, and each instance's earlier versions wherever they were written). A
bare offset is refused: offsets count each log on its own, so the same number is a
different moment on every host.
"""
from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Callable, Iterable, Iterator, Protocol

import msgspec

from vmresize.events import schema as ev
from vmresize.events.schema import Envelope, Resources
from vmresize.projections.fold import (_INSTANCE_EVENTS, _LEDGER_EVENTS, _MIGRATION_EVENTS,
                                       FoldState, InstanceRecord, MigrationRecord, _thaw,
                                       _view, merge_logs)
from vmresize.projections.state import (Instance, Migration, claim_key, instance_key,
                                        migration_final, source_key)
from vmresize.protocol.states import MigrationStatus as MS
from vmresize.protocol.table import TRANSITIONS

INVARIANTS = {
    1: "capacity",          # no host holds more than capacity x ratio - reserved
    2: "version-chain",     # gapless, unforked instance versions
    3: "state-machine",     # migrations follow the protocol's state machine
    4: "no-leak",           # an ended migration holds nothing; one home per instance
    5: "resize-dirs",       # every `_resize` dir and dest copy removed or restored
    6: "ledger-matches",    # ledger from instances == ledger from claim events
}
HOST_LOG = "host-log"       # a host of the cluster has no log, or an empty one

# The protocol table's transitions are as each end's own log sees them: the destination
# never sees `migrating` (it finishes from `pre-migrating`), the source never sees
# `finished` (it confirms or reverts from `post-migrating`). Merged by instance version,
# every migration goes through both ends' statuses, so the auditor forbids those skips.
SEEN_BY_ONE_END = {MS.PRE_MIGRATING: {MS.POST_MIGRATING},
                   MS.POST_MIGRATING: {MS.CONFIRMING, MS.REVERTING}}
MERGED_TRANSITIONS = {status: set(after) - SEEN_BY_ONE_END.get(status, set())
                      for status, after in TRANSITIONS.items()}


class Violation(msgspec.Struct, frozen=True):
    invariant: str
    message: str
    host: str
    offset: int
    offsets: list[int] = []


class TornTailNote(msgspec.Struct, frozen=True):
    host: str
    segment: str
    offset: int
    bytes_dropped: int


class AuditReport(msgspec.Struct):
    ok: bool
    violations: list[Violation]
    events: int
    hosts: int
    instances: int = 0
    migrations: int = 0
    open_migrations: int = 0
    torn_tails: list[TornTailNote] = []
    records: dict[str, int] = {}      # records read from each host's log


VERSION_WINDOW = 16     # memory per instance stays bounded whatever its history


class _Chain:
    __slots__ = ("last", "recent")

    def __init__(self):
        self.last = 0
        self.recent: deque[tuple[str, int]] = deque(maxlen=VERSION_WINDOW)


class _Where(msgspec.Struct):
    host: str
    offset: int


# --------------------------------------------------------------------------- spill
#
# What a checker keeps grows with history unless it lets go of what has ended: ended
# migrations, deleted instances and released allocations. Their end-state checks need
# them at the end all the same, so a checker given a `Spill` moves each ended migration
# and deleted instance there once `keep` newer ones have ended (and takes one back if a
# record names it again), and forgets where each allocation was released: when an
# end-state finding needs that, `locate` reads the host's log again for it (the
# caller's: it has the logs). The report is the same either way. The spill is the
# caller's I/O too (the offline audit puts it in a temporary SQLite file).

class EndedMigration(msgspec.Struct, array_like=True):
    migration: Migration
    last: tuple[str, int]           # its last record (where end-state findings point)


class DeletedInstance(msgspec.Struct, array_like=True):
    instance: Instance
    version: int                    # its version chain: the last version and
    recent: list[tuple[str, int]]   # where the last VERSION_WINDOW versions were written


MIGRATION, INSTANCE = "migration", "instance"
SPILLED = {MIGRATION: EndedMigration, INSTANCE: DeletedInstance}    # what each kind is
KEEP_IN_MEMORY = 128        # ended migrations and deleted instances a spilling checker keeps


class Spill(Protocol):
    def put(self, kind: str, key: str, value) -> None: ...
    def get(self, kind: str, key: str): ...          # None: not there
    def take(self, kind: str, key: str): ...         # get, and remove
    def values(self, kind: str) -> Iterable: ...
    def count(self, kind: str) -> int: ...


class MemorySpill:
    """A `Spill` in dictionaries: the same report, nothing saved; for tests."""

    def __init__(self):
        self.kinds: dict[str, dict] = {kind: {} for kind in SPILLED}

    def put(self, kind, key, value):
        self.kinds[kind][key] = value

    def get(self, kind, key):
        return self.kinds[kind].get(key)

    def take(self, kind, key):
        return self.kinds[kind].pop(key, None)

    def values(self, kind):
        return list(self.kinds[kind].values())

    def count(self, kind):
        return len(self.kinds[kind])


_SPAWN_STARTED, _SPAWN_FAILED, _DELETED = ev.SpawnStarted, ev.SpawnFailed, ev.Deleted
_MAY_BE_FINAL = frozenset({MS.CONFIRMED, MS.REVERTED, MS.ERROR})   # see Migration.final


class _Checker:
    """Feeds records to a FoldState and checks them as they come (invariants 1 to 3),
    then the end state (4 to 6). Either side may run alone: the host side (ledgers,
    invariant 1, which record last changed each allocation) needs only each host's
    records in offset order, the instance side (instances, migrations, invariants 2 and
    3) only the merged order; a checker of the instance side alone takes invariant-1
    findings from `host_findings`, keyed by (host, offset), and puts them where its own
    feed would have."""

    def __init__(self, host_side: bool = True, instance_side: bool = True,
                 end_state: bool = True, keep_ended: int | None = None,
                 on_forget: Callable[[MigrationRecord], None] | None = None,
                 spill: Spill | None = None, keep: int = KEEP_IN_MEMORY,
                 keep_deleted: int | None = None, forget_released: bool = False,
                 locate: Callable[[str, set[str]], dict[str, int]] | None = None):
        self.s = FoldState()
        self.host_side = host_side
        self.instance_side = instance_side
        # False: `finish` is never called (the simulator audits the logs at its end), so
        # where each migration and allocation last changed is not kept.
        self.end_state = end_state
        # Without end-state checks, only the last `keep_ended` ended migrations are kept
        # (a record of one forgotten is "never claimed"); `on_forget` sees each one as it
        # goes. None: every migration is kept.
        if keep_ended is not None and (end_state or keep_ended < 0):
            raise ValueError(f"keep_ended: needs end_state=False and a count >= 0, got "
                             f"{keep_ended!r} with end_state={end_state}")
        self.keep_ended = keep_ended
        # ... and of deleted instances the last `keep_deleted` (default: keep_ended)
        self.keep_deleted = keep_ended if keep_deleted is None else keep_deleted
        self.on_forget = on_forget
        # With a spill, what has ended goes there once `keep` newer ones have; with
        # `forget_released`, where an allocation was released is not kept, and the
        # end-state checks ask `locate` (host, keys -> where each last changed there)
        if (spill is not None or forget_released) and (not end_state or keep < 0):
            raise ValueError(f"spill: needs end_state=True and keep >= 0, got keep={keep!r}"
                             f" with end_state={end_state}")
        self.forget_released = forget_released
        self.locate = locate
        self.spill = spill
        self.keep = keep
        self.spilled = {kind: 0 for kind in SPILLED}      # how many of each are there
        self.deleted_window: dict[str, None] = {}         # deleted instances, oldest first
        self.ended: dict[str, None] = {}                 # ended migrations, oldest first
        self.violations: list[Violation] = []
        self.host_findings: dict[tuple[str, int], list[Violation]] = {}
        # per instance: its last version, and where its last VERSION_WINDOW versions were
        # first written (a fork names the first record when it is that recent)
        self.versions: dict[str, _Chain] = {}
        self.mig_last: dict[str, tuple[str, int]] = {}    # the last record of a migration
        self.no_alloc: set[str] = set()
        # (host, allocation key) -> offset of the last record that changed it there
        self.changed: dict[tuple[str, str], int] = {}

    @property
    def p(self) -> FoldState:
        """The fold so far: records with the views' fields (instances, migrations,
        ledgers, offsets, events)."""
        return self.s

    def flag(self, n: int, message: str, env_or_where, offsets=()):
        self.violations.append(Violation(INVARIANTS[n], message, env_or_where.host,
                                         env_or_where.offset, list(offsets)))

    def feed(self, env: Envelope) -> None:
        e = env.event
        t = type(e)
        mid = ""
        if self.instance_side and t in _INSTANCE_EVENTS:
            if self.spill is not None and (self.spilled[INSTANCE] or self.spilled[MIGRATION]):
                self._take_back(e, t)
            self._check_version(env, e)
            if t in _MIGRATION_EVENTS:
                mid = e.migration_id
        if mid:
            before = self.s.migrations.get(mid)
            old = None if before is None else before.status
            was_final = old in _MAY_BE_FINAL and before.final
        if self.host_side and self.end_state and t in _LEDGER_EVENTS:
            self._apply_noting_changes(env, _allocation_keys(
                e, e.migration_id if t in _MIGRATION_EVENTS else ""))
        else:
            self.s.apply(env, self.host_side, self.instance_side)
        if mid:
            after = self.s.migrations.get(mid)
            self._check_transition(env, before is not None, old, was_final, after)
            if self.end_state:
                self.mig_last[mid] = (env.host, env.offset)
                if self.spill is not None:
                    self._note_ended(mid, after)
            elif self.keep_ended is not None and after is not None and after.final:
                self._forget_ended(mid)
        if self.end_state:
            if t is _SPAWN_FAILED or t is _DELETED:
                self.no_alloc.add(e.instance_uuid)
                if t is _DELETED and self.spill is not None and self.instance_side:
                    self._note_deleted(e.instance_uuid)
            elif t is _SPAWN_STARTED:
                self.no_alloc.discard(e.instance_uuid)
        elif t is _DELETED and self.keep_ended is not None and self.instance_side:
            self._forget_deleted(e.instance_uuid)
        if t in _LEDGER_EVENTS:
            if self.host_side:
                self._check_capacity(env)
            elif self.host_findings:
                self.violations.extend(self.host_findings.pop((env.host, env.offset), ()))

    def _forget_ended(self, mid: str) -> None:
        # ended again (an error's cleanup): newest now
        for old in _past_window(self.ended, mid, self.keep_ended):
            gone = self.s.migrations.pop(old)
            if self.on_forget is not None:
                self.on_forget(gone)

    def _forget_deleted(self, uuid: str) -> None:
        """Without end-state checks, the last `keep_deleted` deleted instances are kept (a
        record of one forgotten starts its version chain anew: a gap)."""
        for old in _past_window(self.deleted_window, uuid, self.keep_deleted):
            self.s.instances.pop(old, None)
            self.versions.pop(old, None)

    def _apply_noting_changes(self, env: Envelope, keys: tuple[str, ...]) -> None:
        """apply, and note which of `keys` the record changed in its host's ledger."""
        ledger = self.s.ledgers.get(env.host)
        held = [ledger.allocations.get(k) for k in keys] if ledger else [None] * len(keys)
        self.s.apply(env, True, self.instance_side)
        allocations = self.s.ledgers[env.host].allocations
        for key, was in zip(keys, held):
            now = allocations.get(key)
            if now != was:
                if now is None and self.forget_released:
                    self.changed.pop((env.host, key), None)
                else:
                    self.changed[(env.host, key)] = env.offset

    # ------------------------------------------------------------------ spilling

    def _note_ended(self, mid: str, mig) -> None:
        """Keep the ended-migration window in order; spill the oldest past `keep`."""
        if mig is None or not mig.final:
            self.ended.pop(mid, None)
            return
        for old in _past_window(self.ended, mid, self.keep):
            record = self.s.migrations.pop(old)
            self.spill.put(MIGRATION, old, EndedMigration(_view(record),
                                                          self.mig_last.pop(old)))
            self.spilled[MIGRATION] += 1

    def _note_deleted(self, uuid: str) -> None:
        """Keep the deleted-instance window in order; spill the oldest past `keep`, unless
        it has come back or its migration is open (whose end-state checks need it here)."""
        for old in _past_window(self.deleted_window, uuid, self.keep):
            inst = self.s.instances.get(old)
            if inst is None or not inst.deleted:
                continue
            mig = self.s.migrations.get(inst.migration_id)
            if mig is not None and not mig.final:
                continue
            chain = self.versions.pop(old, None) or _Chain()
            # a deleted instance holds nothing whatever `no_alloc` says: not kept
            self.spill.put(INSTANCE, old, DeletedInstance(
                _view(self.s.instances.pop(old)), chain.last, list(chain.recent)))
            self.no_alloc.discard(old)
            self.spilled[INSTANCE] += 1

    def _take_back(self, e, t) -> None:
        """A record names a spilled instance or migration: back into memory with it."""
        uuid = e.instance_uuid
        if uuid not in self.s.instances and self.spilled[INSTANCE]:
            d = self.spill.take(INSTANCE, uuid)
            if d is not None:
                self.spilled[INSTANCE] -= 1
                self.s.instances[uuid] = _thaw(InstanceRecord, d.instance)
                chain = self.versions[uuid] = _Chain()
                chain.last = d.version
                chain.recent.extend(tuple(w) for w in d.recent)
                self.deleted_window.pop(uuid, None)
        if t in _MIGRATION_EVENTS and self.spilled[MIGRATION]:
            mid = e.migration_id
            if mid and mid not in self.s.migrations:
                d = self.spill.take(MIGRATION, mid)
                if d is not None:
                    self.spilled[MIGRATION] -= 1
                    self.s.migrations[mid] = _thaw(MigrationRecord, d.migration)
                    self.mig_last[mid] = tuple(d.last)

    def _migration(self, mid: str):
        """An ended or open migration and where its last record is, from memory or the
        spill; (None, None) if there is none."""
        mig = self.s.migrations.get(mid)
        if mig is not None:
            return mig, self.mig_last.get(mid)
        if self.spill is not None and self.spilled[MIGRATION]:
            d = self.spill.get(MIGRATION, mid)
            if d is not None:
                return d.migration, tuple(d.last)
        return None, None

    def count(self, kind: str) -> int:
        """Instances or migrations seen, in memory and spilled."""
        held = self.s.instances if kind == INSTANCE else self.s.migrations
        return len(held) + self.spilled[kind]

    def _check_version(self, env: Envelope, e: ev.InstanceEvent) -> None:
        uuid, v = e.instance_uuid, e.instance_version
        chain = self.versions.get(uuid)
        if chain is None:
            chain = self.versions[uuid] = _Chain()
        last, recent = chain.last, chain.recent
        if v == last + 1:
            recent.append((env.host, env.offset))
            chain.last = v
        elif v <= last:
            back = last - v
            if v >= 1 and back < len(recent):
                host, offset = recent[-1 - back]
                self.flag(2, f"instance {uuid}: version {v} written twice (fork); first "
                          f"at {host}:{offset}", env, [offset])
            else:
                self.flag(2, f"instance {uuid}: version {v} written again after version "
                          f"{last} (fork)", env)
        else:
            self.flag(2, f"instance {uuid}: version {v} follows {last} (gap)", env)
            recent.extend([(env.host, env.offset)] * min(v - last, VERSION_WINDOW))
            chain.last = v

    def _check_transition(self, env, existed: bool, old: str | None, was_final: bool,
                          after) -> None:
        if after is None:
            self.flag(3, f"{type(env.event).__name__} for migration "
                      f"{env.event.migration_id} that was never claimed", env)
            return
        if type(env.event) is ev.Claimed and existed:
            self.flag(3, f"migration {after.id} claimed twice", env)
        elif after.status != old and after.status not in MERGED_TRANSITIONS.get(old, ()):
            self.flag(3, f"migration {after.id}: {old} -> {after.status} "
                      f"({type(env.event).__name__}) is not a protocol step", env)
        elif after.status == old and old != MS.ERROR and was_final:
            self.flag(3, f"migration {after.id}: {type(env.event).__name__} after it "
                      f"ended ({old})", env)

    def _check_capacity(self, env: Envelope) -> None:
        ledger = self.s.ledgers[env.host]
        if ledger.limit == ev.ZERO:
            self.flag(1, f"host {env.host} allocates before logging its capacity", env)
        elif not ledger.used.fits_in(ledger.limit):
            self.flag(1, f"host {env.host} holds {_res(ledger.used)}, over its limit "
                      f"{_res(ledger.limit)}", env)

    # ------------------------------------------------------------------ end-state checks

    def finish(self) -> None:
        self._check_leaks()
        self._check_dirs()
        self._check_ledger_from_instances()

    def _flag_sorted(self, findings: list[tuple[int, str, _Where]]) -> None:
        """End-state findings in one order whatever was spilled: by host and offset."""
        for n, message, where in sorted(findings, key=lambda f: (f[2].host, f[2].offset,
                                                                 f[1])):
            self.flag(n, message, where)

    def _check_leaks(self) -> None:
        findings = []
        holders: dict[str, list[str]] = {}
        for host, ledger in self.p.ledgers.items():
            for key in ledger.allocations:
                if key.startswith("m:"):
                    mid = key[2:].rsplit(":", 1)[0]
                    mig, last = self._migration(mid)
                    if mig is not None and migration_final(mig):
                        findings.append((4, f"migration {mid} ended {mig.status} but {host} "
                                         f"still holds {key}", _Where(*last)))
                elif key.startswith("i:"):
                    holders.setdefault(key[2:], []).append(host)
        instances = list(self.p.instances.items())
        if self.spilled[INSTANCE]:     # a spilled (deleted) instance matters if held
            for uuid in holders:
                if uuid not in self.p.instances:
                    d = self.spill.get(INSTANCE, uuid)
                    if d is not None:
                        instances.append((uuid, d.instance))
        for uuid, inst in instances:
            mig, last = self._migration(inst.migration_id)
            if mig is not None and not migration_final(mig):
                continue
            want = 0 if (inst.deleted or uuid in self.no_alloc) else 1
            got = holders.get(uuid, [])
            if len(got) != want:
                where = _Where(*last) if last else self._last_of(uuid)
                findings.append((4, f"instance {uuid} ({inst.name}) should be held by "
                                 f"{want} host(s), is held by {got or 'none'}", where))
        self._flag_sorted(findings)

    def _last_of(self, uuid: str) -> _Where:
        chain = self.versions.get(uuid)
        if chain is None and self.spilled[INSTANCE]:
            d = self.spill.get(INSTANCE, uuid)
            if d is not None and d.recent:
                return _Where(*d.recent[-1])
        return _Where(*chain.recent[-1]) if chain and chain.recent else _Where("", 0)

    def _check_dirs(self) -> None:
        findings = []
        for mid, mig, last in self._ended_migrations():
            if mig.resize_dir:
                findings.append((5, f"migration {mid} ended {mig.status} leaving "
                                 f"{mig.instance_uuid}_resize on {mig.source_compute}",
                                 _Where(*last)))
            if mig.dest_copy and not _kept_on_dest(mig):
                findings.append((5, f"migration {mid} ended {mig.status} leaving the disk "
                                 f"copy on {mig.dest_compute}", _Where(*last)))
        self._flag_sorted(findings)

    def _ended_migrations(self) -> Iterator[tuple[str, object, tuple[str, int]]]:
        """Every ended migration and where its last record is: memory's, then spilled."""
        for mid, mig in self.p.migrations.items():
            if mig.final:
                yield mid, mig, self.mig_last[mid]
        if self.spilled[MIGRATION]:
            for d in self.spill.values(MIGRATION):
                yield d.migration.id, d.migration, tuple(d.last)

    def _check_ledger_from_instances(self) -> None:
        expected = _expected_allocations(self.p, self.no_alloc)
        wrong: list[tuple[str, str, Resources | None, Resources | None]] = []
        for host, ledger in self.p.ledgers.items():
            want = expected.get(host, {})
            if ledger.allocations == want:
                continue
            for key in sorted(set(want) | set(ledger.allocations)):
                if want.get(key) != ledger.allocations.get(key):
                    wrong.append((host, key, ledger.allocations.get(key), want.get(key)))
        found: dict[str, dict[str, int]] = {}
        if self.locate is not None:      # where the allocations released were released
            forgotten: dict[str, set[str]] = {}
            for host, key, _, _ in wrong:
                if (host, key) not in self.changed:
                    forgotten.setdefault(host, set()).add(key)
            found = {host: self.locate(host, keys) for host, keys in forgotten.items()}
        for host, key, held, wanted in wrong:
            # at the record that last changed the key there, else the last one
            offset = self.changed.get((host, key), found.get(host, {}).get(key))
            if offset is None:
                offset = self.p.offsets.get(host, 1) - 1
            self.flag(6, f"host {host}: {key} is {_res(held)} by claim events, "
                      f"{_res(wanted)} by instances", _Where(host, offset))


def last_changes(envelopes: Iterable[Envelope], keys: set[str]) -> dict[str, int]:
    """Of one host's log, the offset of the last record that changed each allocation of
    `keys` in its ledger (the `locate` of a checker that forgets them)."""
    c = _Checker(instance_side=False)
    host = ""
    for env in envelopes:
        c.feed(env)
        host = env.host
    return {key: c.changed[(host, key)] for key in keys if (host, key) in c.changed}


def _past_window(window: dict[str, None], key: str, size: int) -> Iterator[str]:
    """Make `key` the newest of `window`; remove and yield the oldest keys past `size`."""
    window.pop(key, None)
    window[key] = None
    while len(window) > size:
        old = next(iter(window))
        del window[old]
        yield old


def _allocation_keys(e, mid: str) -> tuple[str, ...]:
    """The allocation keys an event may change on the host that logs it."""
    if not mid:
        return (instance_key(e.instance_uuid),)
    return instance_key(e.instance_uuid), claim_key(mid), source_key(mid)


def _kept_on_dest(mig) -> bool:
    """The instance stayed on the destination: its copy there is the instance's disks
    (confirmed, or a confirm or revert given up after it finished there)."""
    return mig.status == MS.CONFIRMED or mig.failed_step in ("confirm", "revert")


def _res(r: Resources | None) -> str:
    if r is None:
        return "nothing"
    return f"{r.vcpus} vcpus/{r.memory_mb} MB/{r.disk_gb} GB"


def _expected_allocations(p: FoldState, no_alloc: set[str]) -> dict[str, dict]:
    """What every host should hold, recomputed from instances and migrations."""
    out: dict[str, dict] = {}

    def hold(host, key, res):
        out.setdefault(host, {})[key] = res

    for uuid, inst in p.instances.items():
        if inst.deleted or uuid in no_alloc:
            continue
        mig = p.migrations.get(inst.migration_id)
        if mig is None or mig.final:
            hold(inst.host, instance_key(uuid), inst.resources)
            continue
        _hold_for_migration(hold, mig, inst)
    for mig in p.migrations.values():
        # a failed migration its instance has left (rolled back, or given up on one
        # end) still holds what the other end has not released yet
        inst = p.instances.get(mig.instance_uuid)
        if not mig.final and (inst is None or inst.migration_id != mig.id):
            _hold_until_released(hold, mig)
    return out


def _hold_for_migration(hold, mig, inst) -> None:
    src, dst, mid, uuid = mig.source_compute, mig.dest_compute, mig.id, inst.uuid
    status = mig.status
    if status == MS.PRE_MIGRATING:
        hold(src, instance_key(uuid), mig.old_resources)
        hold(dst, claim_key(mid), mig.new_resources)
    elif status in (MS.MIGRATING, MS.POST_MIGRATING):
        hold(src, source_key(mid), mig.old_resources)
        hold(dst, claim_key(mid), mig.new_resources)
    elif status in (MS.FINISHED, MS.CONFIRMING, MS.REVERTING):
        hold(src, source_key(mid), mig.old_resources)
        if not mig.dest_reverted:
            hold(dst, instance_key(uuid), mig.new_resources)
    elif status == MS.ERROR:     # compensation under way: what each side still holds
        _hold_until_released(hold, mig)
        if not mig.resize_dir:     # else the source takes it back (restore)
            hold(inst.host, instance_key(uuid), inst.resources)


def _hold_until_released(hold, mig) -> None:
    if not mig.dest_settled:
        hold(mig.dest_compute, claim_key(mig.id), mig.new_resources)
    if mig.source_started and not mig.source_settled:
        hold(mig.source_compute, source_key(mig.id), mig.old_resources)


def check(logs: dict[str, Iterable[Envelope]], expected_hosts: Iterable[str] = (),
          spill: Spill | None = None, keep: int = KEEP_IN_MEMORY,
          locate: Callable[[str, set[str]], dict[str, int]] | None = None) -> AuditReport:
    """Check the six invariants over `logs`; each host of `expected_hosts` (the hosts of
    the cluster) that has no log here, or an empty one, is a violation too. With a
    `spill`, what has ended goes there past the last `keep`, and `locate` reads a host's
    log again (by default `last_changes` of `logs`, which must then be lists): the same
    report."""
    if spill is not None and locate is None:
        def locate(host, keys):
            return last_changes(logs[host], keys)
    c = _Checker(spill=spill, keep=keep, forget_released=spill is not None, locate=locate)
    for env in merge_logs(logs):
        c.feed(env)
    c.finish()
    return _report(c, list(logs), expected_hosts)


def _report(c: _Checker, hosts: list[str], expected_hosts: Iterable[str]) -> AuditReport:
    for host in expected_hosts:
        if host not in hosts or host not in c.p.offsets:
            what = "no log" if host not in hosts else "an empty log"
            c.violations.append(Violation(HOST_LOG, f"host {host} is in the cluster but "
                                          f"has {what}", host, 0))
    p = c.p
    return AuditReport(ok=not c.violations, violations=c.violations, events=p.events,
                       hosts=len(hosts), instances=c.count(INSTANCE),
                       migrations=c.count(MIGRATION),
                       open_migrations=sum(not m.final for m in p.migrations.values()),
                       records={h: p.offsets.get(h, 0) for h in hosts})


# --------------------------------------------------------------------------- as of

class AsOf(msgspec.Struct, frozen=True):
    """A consistent cut of the logs: every record at or before `wall_time` (one clock
    for all hosts), or the record `host`:`offset` and every record it depends on."""
    wall_time: float | None = None
    host: str = ""
    offset: int = 0


BARE_OFFSET = ("--as-of: a bare offset is refused: each host's log counts its own "
               "offsets, so offset {n} is a different moment on every host; give "
               "HOST:{n} (that record and every record it depends on) or an ISO time")


def parse_as_of(text: str | None) -> AsOf | None:
    """`--as-of HOST:OFFSET` or `--as-of ISO-TIME`. Raises ValueError naming the input."""
    if text is None or text == "":
        return None
    if text.isdigit():
        raise ValueError(BARE_OFFSET.format(n=text))
    try:
        return AsOf(wall_time=datetime.fromisoformat(text).timestamp())
    except ValueError:
        pass
    host, _, offset = text.rpartition(":")
    if host and offset.isdigit():
        return AsOf(host=host, offset=int(offset))
    raise ValueError(f"--as-of: expected HOST:OFFSET or an ISO time, got {text!r}")


def causal_cut(logs: dict[str, Iterable[Envelope]], host: str, offset: int) -> dict[str, int]:
    """How many records of each log the record host:offset depends on, itself included:
    the records before it in its own log and, for every instance record in the cut, the
    instance's previous version wherever it was written (all writers of a forked
    version), closed under both. Raises ValueError naming a host or offset not there."""
    where: dict[tuple[str, int], list[tuple[str, int]]] = {}   # (uuid, version) -> writers
    chains: dict[str, list[tuple[int, str, int]]] = {}      # host -> (offset, uuid, v)
    size = 0
    for h, envs in logs.items():
        chain = chains[h] = []
        for env in envs:
            e = env.event
            if isinstance(e, ev.InstanceEvent):
                key = (e.instance_uuid, e.instance_version)
                where.setdefault(key, []).append((h, env.offset))
                chain.append((env.offset, e.instance_uuid, e.instance_version))
            if h == host:
                size = env.offset + 1
    if host not in chains:
        raise ValueError(f"--as-of: no log for host {host!r} (hosts: "
                         f"{', '.join(sorted(chains))})")
    if offset >= size:
        held = f"{size} records (offsets 0 to {size - 1})" if size else "an empty log"
        raise ValueError(f"--as-of: host {host} has {held}, got offset {offset}")
    cut = {h: 0 for h in logs}
    scanned = {h: 0 for h in logs}        # instance records of each log already followed
    todo = [host]
    cut[host] = offset + 1
    while todo:
        h = todo.pop()
        chain = chains[h]
        while scanned[h] < len(chain) and chain[scanned[h]][0] < cut[h]:
            _, uuid, v = chain[scanned[h]]
            scanned[h] += 1
            for h2, off2 in where.get((uuid, v - 1), ()):
                if cut[h2] <= off2:
                    cut[h2] = off2 + 1
                    todo.append(h2)
    return cut


def _until(envelopes: Iterable[Envelope], wall_time: float) -> Iterable[Envelope]:
    for env in envelopes:
        if env.wall_time > wall_time:
            return
        yield env
