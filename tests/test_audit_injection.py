"""The auditor tested by injection: realistic histories from the simulator (the real host
shells and controller, with crashes and faults), each broken by one planted fault, must
be reported with the right invariant and the host and offset of the offending record.

Every planted fault is one a real bug would write: a release logged by the wrong host,
a claim the host could not hold, a lost or duplicated record, a stale version accepted,
an abandoned cleanup, a compensation that forgot the copy. The expected answer is
computed here from the history and DESIGN §2 and §4, not from the auditor's own tables.
Histories are written back in the real log format and audited as `vmresize audit` does.
"""
from __future__ import annotations

import bisect
import tempfile

import msgspec
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import strategies as s
from vmresize.events import schema as ev
from vmresize.events.schema import Envelope, Resources
from vmresize.offline import audit
from vmresize.projections import check, fold, merge_logs
from vmresize.projections.fold import evolve_ledger
from vmresize.projections.state import Ledger

replace = msgspec.structs.replace
Logs = dict[str, list[Envelope]]

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# DESIGN §2: the status each event leaves its migration in, and the protocol's steps.
LEADS_TO = {
    ev.Claimed: "pre-migrating", ev.MigrationStarted: "migrating",
    ev.DiskMigrated: "post-migrating", ev.FinishStarted: "post-migrating",
    ev.Finished: "finished", ev.ConfirmStarted: "confirming", ev.Confirmed: "confirmed",
    ev.RevertStarted: "reverting", ev.DestReverted: "reverting",
    ev.RevertFinishStarted: "reverting", ev.Reverted: "reverted", ev.Failed: "error",
    ev.ClaimReleased: "error", ev.SourceRestored: "error",
}
NEXT = {
    "pre-migrating": {"migrating"}, "migrating": {"post-migrating"},
    "post-migrating": {"finished"}, "finished": {"confirming", "reverting"},
    "confirming": {"confirmed"}, "reverting": {"reverted"},
    "confirmed": set(), "reverted": set(), "error": set(),
}
ENDED = {"confirmed", "reverted"}
# Events that change a host's allocations (DESIGN §2, last column).
ALLOCATING = (ev.SpawnStarted, ev.SpawnFailed, ev.Deleted, ev.Claimed, ev.MigrationStarted,
              ev.Finished, ev.Confirmed, ev.DestReverted, ev.Reverted, ev.SourceRestored,
              ev.ClaimReleased, ev.Failed)
# Events with no fields beyond a migration event's, or with simple ones: replacements.
SIMPLE_STEPS = {
    ev.DiskMigrated: dict(shared_storage=False), ev.FinishStarted: {},
    ev.Finished: dict(power_state=ev.RUNNING), ev.ConfirmStarted: {}, ev.Confirmed: {},
    ev.RevertStarted: {}, ev.DestReverted: {}, ev.RevertFinishStarted: {},
    ev.Reverted: dict(power_state=ev.RUNNING),
}


# --------------------------------------------------------------------------- editing logs

def renumbered(host: str, envs) -> list[Envelope]:
    return [replace(env, host=host, offset=i) for i, env in enumerate(envs)]


def dropped(logs: Logs, host: str, offset: int) -> Logs:
    """The record removed and the records after it renumbered (a lost write)."""
    out = dict(logs)
    out[host] = renumbered(host, logs[host][:offset] + logs[host][offset + 1:])
    return out


def inserted(logs: Logs, host: str, event, wall_time: float) -> Logs:
    """`event` written by `host` at `wall_time`, after every record it wrote before."""
    log = logs.get(host, [])
    at = bisect.bisect_right([env.wall_time for env in log], wall_time)
    env = Envelope(host, at, wall_time, event)
    out = dict(logs)
    out[host] = renumbered(host, log[:at] + [env] + log[at:])
    return out


def appended(logs: Logs, host: str, event) -> Logs:
    """`event` written by `host` after everything else in the history."""
    last = max(env.wall_time for envs in logs.values() for env in envs)
    return inserted(logs, host, event, last + 1.0)


def swapped(logs: Logs, host: str, offset: int, event) -> Logs:
    """The record at host:offset carries `event` instead of its own."""
    out = dict(logs)
    out[host] = list(logs[host])
    out[host][offset] = replace(logs[host][offset], event=event)
    return out


def moved(logs: Logs, host: str, offset: int, to: str) -> Logs:
    """The record written by `to` instead of `host`, at the same time."""
    env = logs[host][offset]
    return inserted(dropped(logs, host, offset), to, env.event, env.wall_time)


def where(logs: Logs, event) -> tuple[str, int]:
    """Host and offset of the record carrying this very event object."""
    for host, envs in logs.items():
        for env in envs:
            if env.event is event:
                return host, env.offset
    raise AssertionError(f"{event!r} is in no log")


def copy_of(event, **changes):
    return replace(event, **changes)     # always a new object, found by `where`


# --------------------------------------------------------------------------- reading histories

def audited(logs: Logs, **kw):
    """The auditor's report on these logs, written as a state directory and read back;
    the same whether what has ended stays in memory or is spilled as soon as it can."""
    with tempfile.TemporaryDirectory() as tmp:
        s.write_state_dir(logs, tmp)
        report = audit(tmp, keep=None, **kw)
        spilled = audit(tmp, keep=0, **kw)
    assert msgspec.msgpack.encode(spilled) == msgspec.msgpack.encode(report)
    return report


def found(report, invariant: str) -> list[tuple[str, int]]:
    return [(v.host, v.offset) for v in report.violations if v.invariant == invariant]


def merged(logs: Logs) -> list[Envelope]:
    return list(merge_logs(logs))


def migrations(logs: Logs):
    return fold(merged(logs)).migrations


def records_of(logs: Logs, mid: str) -> list[Envelope]:
    """Every record of one migration, in merge order."""
    return [env for env in merged(logs) if getattr(env.event, "migration_id", "") == mid]


def last_version(logs: Logs, uuid: str) -> int:
    return max(env.event.instance_version for envs in logs.values() for env in envs
               if getattr(env.event, "instance_uuid", "") == uuid
               and isinstance(env.event, ev.InstanceEvent))


def last_migration_of(logs: Logs, uuid: str) -> str:
    """The migration of the instance's last versioned record, "" if none."""
    last = max((env for envs in logs.values() for env in envs
                if isinstance(env.event, ev.InstanceEvent)
                and env.event.instance_uuid == uuid),
               key=lambda env: env.event.instance_version)
    return getattr(last.event, "migration_id", "")


def ledger_after_each(envs) -> list[tuple[Envelope, Ledger]]:
    ledger = Ledger(host=envs[0].host if envs else "", allocations={})
    out = []
    for env in envs:
        ledger = evolve_ledger(ledger, env)
        out.append((env, ledger))
    return out


def last_change_of(envs, key: str) -> int | None:
    """Offset of the last record of one host's log that changed allocation `key`."""
    last, value = None, None
    for env, ledger in ledger_after_each(envs):
        now = ledger.allocations.get(key)
        if now != value:
            last, value = env.offset, now
    return last


def ended_migrations(logs: Logs, statuses=ENDED) -> list[str]:
    return sorted(mid for mid, m in migrations(logs).items() if m.status in statuses)


def has(pred):
    """A `having` filter for s.pool_histories from a predicate on {host: list}."""
    return lambda logs: bool(pred({h: list(e) for h, e in logs.items()}))


def record_choice(draw, candidates):
    """One of `candidates`, shown as host:offset and type rather than in full."""
    assume(candidates)
    choice = candidates[draw(st.integers(0, len(candidates) - 1))]
    note(f"chose {describe(choice)}")
    return choice


def describe(x) -> str:
    if isinstance(x, Envelope):
        version = getattr(x.event, "instance_version", "-")
        return f"{x.host}:{x.offset} {type(x.event).__name__} v{version}"
    if isinstance(x, tuple):
        return ", ".join(describe(part) for part in x)
    return str(x)


# --------------------------------------------------------------------------- clean histories

@SETTINGS
@given(history=s.pool_histories())
def test_a_clean_simulated_history_has_no_violation(history):
    seed, logs = history
    report = audited(logs, expected_hosts=sorted(logs))
    assert report.ok, (seed, report.violations)
    assert report.events == sum(len(envs) for envs in logs.values())
    assert report.hosts == len(logs)


@SETTINGS
@given(history=s.pool_histories())
def test_writing_a_history_to_disk_changes_nothing_the_auditor_sees(history):
    _, logs = history
    pure = check(logs)
    read = audited(logs)
    assert (read.ok, read.events, read.instances, read.migrations) == (
        pure.ok, pure.events, pure.instances, pure.migrations)


# --------------------------------------------------------------------------- 1 capacity

def _ledger_hosts(logs: Logs) -> list[str]:
    return sorted(h for h, envs in logs.items()
                  if any(isinstance(env.event, ALLOCATING) for env in envs))


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_1_a_limit_below_what_the_host_held_is_caught_where_it_was_exceeded(history, data):
    # Given a host whose logged limit is one MB below the most memory it ever held
    seed, logs = history
    host = record_choice(data.draw, _ledger_hosts(logs))
    peak = max(ledger.used.memory_mb for _, ledger in ledger_after_each(logs[host]))
    assume(peak > 0)
    for env in logs[host]:
        if type(env.event) is ev.HostConfigured:
            lowered = replace(env.event.limit, memory_mb=peak - 1)
            logs = swapped(logs, host, env.offset, copy_of(env.event, limit=lowered))
    # then every allocating record after which it held more than that is reported
    expected = [(host, env.offset) for env, ledger in ledger_after_each(logs[host])
                if isinstance(env.event, ALLOCATING) and ledger.used.memory_mb >= peak]
    report = audited(logs)
    assert expected and found(report, "capacity") == expected, seed
    assert all("over its limit" in v.message for v in report.violations)
    assert {v.invariant for v in report.violations} == {"capacity"}


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_1_a_claim_bigger_than_the_destination_is_caught_at_the_claim(history, data):
    # Given a destination that accepted a claim for more memory than its limit
    seed, logs = history
    claims = [(h, env) for h, envs in logs.items() for env in envs
              if type(env.event) is ev.Claimed]
    host, env = record_choice(data.draw, claims)
    limit = next(e.event.limit for e in logs[host] if type(e.event) is ev.HostConfigured)
    spec = env.event.spec
    huge = replace(spec.new_resources, memory_mb=limit.memory_mb + 1)
    bad = copy_of(env.event, spec=replace(spec, new_resources=huge))
    logs = swapped(logs, host, env.offset, bad)
    # then the first capacity violation is that claim, and all are on that host
    report = audited(logs)
    caught = found(report, "capacity")
    assert caught and caught[0] == where(logs, bad), seed
    assert {h for h, _ in caught} == {host}


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_1_a_boot_bigger_than_the_host_is_caught_at_the_boot(history, data):
    seed, logs = history
    spawns = [(h, env) for h, envs in logs.items() for env in envs
              if type(env.event) is ev.SpawnStarted]
    host, env = record_choice(data.draw, spawns)
    limit = next(e.event.limit for e in logs[host] if type(e.event) is ev.HostConfigured)
    bad = copy_of(env.event, resources=replace(env.event.resources, vcpus=limit.vcpus + 1))
    logs = swapped(logs, host, env.offset, bad)
    caught = found(audited(logs), "capacity")
    assert caught and caught[0] == where(logs, bad), seed
    assert {h for h, _ in caught} == {host}


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_1_a_lost_capacity_record_is_caught_at_the_first_allocation(history, data):
    # Given a host whose HostConfigured record was lost (dropped, the rest renumbered)
    seed, logs = history
    host = record_choice(data.draw, _ledger_hosts(logs))
    configured = [env.offset for env in logs[host] if type(env.event) is ev.HostConfigured]
    assert configured == [0], "a host logs its capacity first, once"
    logs = dropped(logs, host, 0)
    # then its first allocation is reported: a host cannot allocate blind
    first = next(env for env in logs[host] if isinstance(env.event, ALLOCATING))
    report = audited(logs)
    caught = found(report, "capacity")
    assert caught and caught[0] == (host, first.offset), seed
    assert "before logging its capacity" in report.violations[0].message
    assert {h for h, _ in caught} == {host}


# --------------------------------------------------------------------------- 2 version chains

def _versioned(logs: Logs) -> list[tuple[str, Envelope]]:
    return [(h, env) for h, envs in logs.items() for env in envs
            if isinstance(env.event, ev.InstanceEvent)]


def _successor(logs: Logs, env: Envelope) -> Envelope | None:
    e = env.event
    return next((x for _, x in _versioned(logs)
                 if x.event.instance_uuid == e.instance_uuid
                 and x.event.instance_version == e.instance_version + 1), None)


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_2_a_dropped_record_is_caught_as_a_gap_at_the_next_version(history, data):
    # Given a record lost from a log (the others renumbered) that has a successor
    seed, logs = history
    host, env = record_choice(data.draw, [(h, x) for h, x in _versioned(logs)
                                          if _successor(logs, x) is not None])
    after = _successor(logs, env)
    logs = dropped(logs, host, env.offset)
    # then the chain is reported broken exactly once, at the successor's record
    report = audited(logs)
    assert found(report, "version-chain") == [where(logs, after.event)], seed
    (gap,) = [v for v in report.violations if v.invariant == "version-chain"]
    v = env.event.instance_version
    assert f"version {v + 1} follows {v - 1} (gap)" in gap.message


def _assert_one_fork(report, logs: Logs, first, second, seed) -> None:
    forks = [v for v in report.violations if v.invariant == "version-chain"]
    assert len(forks) == 1, (seed, forks)
    writers = {where(logs, first), where(logs, second)}
    reported = (forks[0].host, forks[0].offset)
    assert reported in writers, (seed, reported, writers)
    (other,) = writers - {reported}
    assert forks[0].offsets == [other[1]]
    assert "fork" in forks[0].message and f"first at {other[0]}:{other[1]}" in \
        forks[0].message


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_2_the_same_version_written_by_two_hosts_is_caught_as_a_fork(history, data):
    # Given split brain: another host wrote a record with the same instance version
    seed, logs = history
    host, env = record_choice(data.draw, _versioned(logs))
    other = data.draw(st.sampled_from(sorted(set(logs) - {host})))
    twin = copy_of(env.event)
    logs = inserted(logs, other, twin, env.wall_time)
    _assert_one_fork(audited(logs), logs, env.event, twin, seed)


def _renumber_versions(logs: Logs, uuid: str, start: int, by: int) -> tuple[Logs, dict]:
    """Every record of `uuid` from version `start` on carries version + `by`; returns
    the new logs and {old event: new event}."""
    out, changed = {}, {}
    for host, envs in logs.items():
        new = []
        for env in envs:
            e = env.event
            if isinstance(e, ev.InstanceEvent) and e.instance_uuid == uuid and \
                    e.instance_version >= start:
                changed[e] = copy_of(e, instance_version=e.instance_version + by)
                env = replace(env, event=changed[e])
            new.append(env)
        out[host] = new
    return out, changed


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_2_a_stale_version_accepted_is_caught_as_a_fork(history, data):
    # Given a host that accepted a command for a version already written (the stale
    # version check disabled): its record and every later one are one version behind
    seed, logs = history
    host, env = record_choice(data.draw, [(h, x) for h, x in _versioned(logs)
                                          if x.event.instance_version >= 2])
    e = env.event
    before = next(x for _, x in _versioned(logs) if x.event.instance_uuid ==
                  e.instance_uuid and x.event.instance_version == e.instance_version - 1)
    logs, changed = _renumber_versions(logs, e.instance_uuid, e.instance_version, -1)
    _assert_one_fork(audited(logs), logs, before.event, changed[e], seed)


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_2_a_skipped_version_is_caught_as_a_gap_where_it_was_skipped(history, data):
    seed, logs = history
    host, env = record_choice(data.draw, [(h, x) for h, x in _versioned(logs)
                                          if x.event.instance_version >= 2])
    e = env.event
    logs, changed = _renumber_versions(logs, e.instance_uuid, e.instance_version, +1)
    report = audited(logs)
    assert found(report, "version-chain") == [where(logs, changed[e])], seed


# --------------------------------------------------------------------------- 3 state machine

def _status_before(logs: Logs, env: Envelope) -> str:
    history = merged(logs)
    i = next(i for i, x in enumerate(history) if x.event is env.event)
    return fold(history[:i]).migrations[env.event.migration_id].status


def _first(report, invariant: str):
    return next((v for v in report.violations if v.invariant == invariant), None)


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_3_a_step_the_protocol_does_not_allow_is_caught_where_it_happened(history, data):
    # Given one record of a migration replaced by a step that cannot follow the status
    # the migration was in (an illegal transition, e.g. finished right after claimed)
    seed, logs = history
    steps = [(h, env) for h, env in _versioned(logs)
             if isinstance(env.event, ev.MigrationEvent)
             and type(env.event) not in (ev.Claimed, ev.MigrationStarted)]
    host, env = record_choice(data.draw, steps)
    status = _status_before(logs, env)
    illegal = [t for t in SIMPLE_STEPS if t is not type(env.event)
               and LEADS_TO[t] not in NEXT[status] | {status}]
    step = data.draw(st.sampled_from(illegal))
    e = env.event
    bad = step(instance_uuid=e.instance_uuid, instance_version=e.instance_version,
               migration_id=e.migration_id, command_id=e.command_id, **SIMPLE_STEPS[step])
    logs = swapped(logs, host, env.offset, bad)
    first = _first(audited(logs), "state-machine")
    assert first is not None and (first.host, first.offset) == where(logs, bad), seed
    assert f"{status} -> {LEADS_TO[step]} ({step.__name__})" in first.message


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_3_a_step_of_a_migration_never_claimed_is_caught(history, data):
    seed, logs = history
    steps = [(h, env) for h, env in _versioned(logs)
             if isinstance(env.event, ev.MigrationEvent)
             and type(env.event) not in (ev.Claimed, ev.MigrationStarted)]
    host, env = record_choice(data.draw, steps)
    ghost = copy_of(env.event, migration_id="never-claimed")
    logs = swapped(logs, host, env.offset, ghost)
    first = _first(audited(logs), "state-machine")
    assert first is not None and (first.host, first.offset) == where(logs, ghost), seed
    assert "never-claimed that was never claimed" in first.message


def _ended_last_migrations(logs: Logs) -> list[str]:
    """Ended migrations that are their instance's last versioned record's migration."""
    migs = migrations(logs)
    return [mid for mid in ended_migrations(logs)
            if last_migration_of(logs, migs[mid].instance_uuid) == mid]


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_3_a_step_after_the_migration_ended_is_caught(history, data):
    # Given a host that acted on a migration already confirmed or reverted
    seed, logs = history
    mid = record_choice(data.draw, _ended_last_migrations(logs))
    m = migrations(logs)[mid]
    step = data.draw(st.sampled_from(sorted(SIMPLE_STEPS, key=lambda t: t.__name__)))
    late = step(instance_uuid=m.instance_uuid, migration_id=mid, **SIMPLE_STEPS[step],
                instance_version=last_version(logs, m.instance_uuid) + 1)
    logs = appended(logs, data.draw(st.sampled_from([m.source_compute, m.dest_compute])),
                    late)
    report = audited(logs)
    first = _first(report, "state-machine")
    assert first is not None and (first.host, first.offset) == where(logs, late), seed
    assert found(report, "state-machine") == [where(logs, late)]


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_3_a_migration_claimed_twice_is_caught(history, data):
    seed, logs = history
    mid = record_choice(data.draw, _ended_last_migrations(logs))
    claim = next(env for env in records_of(logs, mid) if type(env.event) is ev.Claimed)
    again = copy_of(claim.event, instance_version=last_version(
        logs, claim.event.instance_uuid) + 1)
    logs = appended(logs, claim.host, again)
    first = _first(audited(logs), "state-machine")
    assert first is not None and (first.host, first.offset) == where(logs, again), seed
    assert "claimed twice" in first.message


# --------------------------------------------------------------------------- 4 no leak

RELEASES = (ev.Confirmed, ev.ClaimReleased, ev.Reverted, ev.SourceRestored)


def _ending_releases(logs: Logs) -> list[tuple[str, Envelope, str]]:
    """(host, record, other end) for each ended migration whose last record releases
    what its host held for it."""
    out = []
    for mid, m in migrations(logs).items():
        if not m.final:
            continue
        last = records_of(logs, mid)[-1]
        if isinstance(last.event, RELEASES):
            other = m.dest_compute if last.host == m.source_compute else m.source_compute
            out.append((last.host, last, other))
    return out


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_4_a_release_written_by_the_wrong_host_is_caught_as_a_leak(history, data):
    # Given the record that ended a migration, releasing what one end held, written by
    # the other end instead (which holds nothing under that key)
    seed, logs = history
    host, env, other = record_choice(data.draw, _ending_releases(logs))
    logs = moved(logs, host, env.offset, other)
    # then the leak is reported where the migration ended, naming the host that holds it
    report = audited(logs)
    leaks = [v for v in report.violations if v.invariant == "no-leak"
             and (v.host, v.offset) == where(logs, env.event)]
    assert any(f"{host} still holds m:{env.event.migration_id}:" in v.message
               for v in leaks), (seed, report.violations)


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_4_an_instance_spawned_again_on_another_host_is_held_twice(history, data):
    # Given a host that spawned an instance living elsewhere (a second home)
    seed, logs = history
    p = fold(merged(logs))
    homes = [(uuid, inst) for uuid, inst in sorted(p.instances.items())
             if f"i:{uuid}" in p.ledgers[inst.host].allocations     # held (spawned, live)
             and (not inst.migration_id or p.migrations[inst.migration_id].final)]
    uuid, inst = record_choice(data.draw, homes)
    other = data.draw(st.sampled_from(sorted(set(logs) - {inst.host})))
    again = ev.SpawnStarted(instance_uuid=uuid, instance_version=last_version(logs, uuid) + 1,
                            name=inst.name, flavor=inst.flavor, resources=inst.resources)
    logs = appended(logs, other, again)
    report = audited(logs)
    leaks = [v for v in report.violations if v.invariant == "no-leak"]
    assert [(v.host, v.offset) for v in leaks] == [where(logs, again)], seed
    assert "should be held by 1 host(s)" in leaks[0].message
    assert inst.host in leaks[0].message and other in leaks[0].message


# --------------------------------------------------------------------------- 5 resize dirs

def _abandoned(data, logs: Logs, cls, step: str):
    """A cleanup outcome `cls` replaced by its step given up (Failed, not rolled back)."""
    records = [(h, env) for h, env in _versioned(logs) if type(env.event) is cls]
    host, env = record_choice(data.draw, records)
    e = env.event
    gave_up = ev.Failed(instance_uuid=e.instance_uuid, instance_version=e.instance_version,
                        migration_id=e.migration_id, command_id=e.command_id, step=step,
                        reason=f"{step} given up", rolled_back=False,
                        power_state=getattr(e, "power_state", ev.RUNNING))
    return swapped(logs, host, env.offset, gave_up), gave_up, host


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_5_a_confirm_given_up_leaves_the_resize_dir(history, data):
    seed, logs = history
    logs, bad, host = _abandoned(data, logs, ev.Confirmed, "confirm")
    report = audited(logs)
    dirs = [v for v in report.violations if v.invariant == "resize-dirs"]
    assert [(v.host, v.offset) for v in dirs] == [where(logs, bad)], (seed, dirs)
    assert f"{bad.instance_uuid}_resize on {host}" in dirs[0].message


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_5_a_revert_given_up_on_the_source_leaves_the_resize_dir(history, data):
    seed, logs = history
    logs, bad, host = _abandoned(data, logs, ev.Reverted, "finish_revert")
    report = audited(logs)
    dirs = [v for v in report.violations if v.invariant == "resize-dirs"]
    assert [(v.host, v.offset) for v in dirs] == [where(logs, bad)], (seed, dirs)
    assert f"{bad.instance_uuid}_resize on {host}" in dirs[0].message
    assert {v.invariant for v in report.violations} == {"resize-dirs"}


@SETTINGS
@given(history=s.pool_histories(having=has(lambda logs: any(
    type(env.event) is ev.SourceRestored for envs in logs.values() for env in envs))),
       data=st.data())
def test_5_a_restore_given_up_leaves_the_resize_dir(history, data):
    seed, logs = history
    logs, bad, host = _abandoned(data, logs, ev.SourceRestored, "restore")
    report = audited(logs)
    dirs = [v for v in report.violations if v.invariant == "resize-dirs"]
    assert [(v.host, v.offset) for v in dirs] == [where(logs, bad)], (seed, dirs)
    assert f"{bad.instance_uuid}_resize on {host}" in dirs[0].message


def _copy_removals(logs: Logs):
    return [(h, env) for h, envs in logs.items() for env in envs
            if type(env.event) is ev.ClaimReleased and env.event.disks_removed]


@SETTINGS
@given(history=s.pool_histories(having=has(_copy_removals)), data=st.data())
def test_5_a_compensation_that_forgot_the_copy_leaves_it(history, data):
    # Given a failed migration whose destination released its claim but not the disk
    # copy the source had already sent
    seed, logs = history
    host, env = record_choice(data.draw, _copy_removals(logs))
    forgot = copy_of(env.event, disks_removed=False)
    logs = swapped(logs, host, env.offset, forgot)
    report = audited(logs)
    dirs = [v for v in report.violations if v.invariant == "resize-dirs"]
    mig_last = records_of(logs, forgot.migration_id)[-1]
    assert [(v.host, v.offset) for v in dirs] == [(mig_last.host, mig_last.offset)], seed
    assert f"the disk copy on {host}" in dirs[0].message


# --------------------------------------------------------------------------- 6 ledger

RESTORING = (ev.Reverted, ev.SourceRestored, ev.Failed)


def _restored_last_migrations(logs: Logs) -> list[str]:
    """Migrations that ended by giving the instance its old resources back on its
    source (a revert, a restore, a failure rolled back), as their instance's last
    migration (so nothing after them changed its resources)."""
    migs = migrations(logs)
    p = fold(merged(logs))
    return [mid for mid, m in sorted(migs.items())
            if m.final and m.status != "confirmed" and m.failed_step not in ("confirm",
                                                                           "revert")
            and any(isinstance(env.event, RESTORING) for env in records_of(logs, mid))
            and last_migration_of(logs, m.instance_uuid) == mid
            and not p.instances[m.instance_uuid].deleted
            and p.instances[m.instance_uuid].host == m.source_compute]


def _assert_ledger_disagrees(report, logs: Logs, host: str, key: str, seed) -> None:
    """An invariant-6 violation on `host` naming `key`, at the last record of that host
    that changed the key's allocation."""
    hits = [v for v in report.violations if v.invariant == "ledger-matches"
            and v.host == host and f" {key} " in v.message]
    assert hits, (seed, report.violations)
    expected = last_change_of(logs[host], key)
    if expected is None:                    # never allocated there: the host's last record
        expected = len(logs[host]) - 1
    assert [v.offset for v in hits] == [expected], seed


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_6_a_claim_that_misstated_the_source_allocation_is_caught(history, data):
    # Given a migration whose claim recorded other old resources than the source held;
    # when the instance went back to its source, the instances say one thing and the
    # source's allocations another
    seed, logs = history
    mid = record_choice(data.draw, _restored_last_migrations(logs))
    claim = next(env for env in records_of(logs, mid) if type(env.event) is ev.Claimed)
    spec = claim.event.spec
    wrong = replace(spec, old_resources=spec.old_resources + Resources(1, 0, 0))
    logs = swapped(logs, claim.host, claim.offset, copy_of(claim.event, spec=wrong))
    m = migrations(logs)[mid]
    _assert_ledger_disagrees(audited(logs), logs, m.source_compute,
                             f"i:{m.instance_uuid}", seed)


def _never_moved(logs: Logs) -> list[str]:
    """Instances with migrations, every one of which left them on their source."""
    restored = set(_restored_last_migrations(logs))
    by_instance: dict[str, list[str]] = {}
    for mid, m in migrations(logs).items():
        by_instance.setdefault(m.instance_uuid, []).append(mid)
    return sorted(uuid for uuid, mids in by_instance.items()
                  if all(migrations(logs)[mid].status in ("reverted", "error")
                         and migrations(logs)[mid].failed_step not in ("confirm", "revert")
                         for mid in mids) and restored & set(mids))


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_6_a_boot_that_allocated_other_resources_than_the_instance_is_caught(history, data):
    # Given a boot that allocated one more vcpu than the instance's resources the
    # controller knew; the instance migrated and always came back to where it was booted
    seed, logs = history
    uuid = record_choice(data.draw, _never_moved(logs))
    spawn = next(env for envs in logs.values() for env in envs
                 if type(env.event) is ev.SpawnStarted and env.event.instance_uuid == uuid)
    bigger = spawn.event.resources + Resources(1, 0, 0)
    logs = swapped(logs, spawn.host, spawn.offset, copy_of(spawn.event, resources=bigger))
    home = fold(merged(logs)).instances[uuid].host
    _assert_ledger_disagrees(audited(logs), logs, home, f"i:{uuid}", seed)


@SETTINGS
@given(history=s.pool_histories(), data=st.data())
def test_6_a_finish_written_by_the_source_is_caught_on_the_destination(history, data):
    # Given a Finished record written by the source: the destination's claim never
    # became the instance's allocation
    seed, logs = history
    mid = record_choice(data.draw, [m for m in _ended_last_migrations(logs)
                                    if migrations(logs)[m].status == "confirmed"])
    m = migrations(logs)[mid]
    fin = next(env for env in records_of(logs, mid) if type(env.event) is ev.Finished)
    logs = moved(logs, fin.host, fin.offset, m.source_compute)
    _assert_ledger_disagrees(audited(logs), logs, m.dest_compute, f"m:{mid}:new", seed)
