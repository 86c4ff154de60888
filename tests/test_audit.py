"""The auditor: a clean history passes; each broken invariant is caught with its name and
the host and offset of the offending record; `as_of` cuts by offset and by time; a
missing state directory is an error that writes nothing."""
from __future__ import annotations

import importlib
import tempfile
from datetime import datetime, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies as s
from strategies import SMALL, TINY, History
from vmresize.events import schema as ev
from vmresize.events.codec import encode
from vmresize.events.log import CorruptLog, LogError, SegmentLog
from vmresize.events.schema import Resources
from vmresize.offline import audit
from vmresize.projections import check
from vmresize.projections.audit import (INSTANCE, MIGRATION, MemorySpill, _Checker,
                                        merge_logs)

fold_module = importlib.import_module("vmresize.projections.fold")   # the package's
# `fold` attribute is the function, which shadows the module of the same name

U, M = "u", "m"


def violations(h: History, invariant: str | None = None):
    report = check(h.logs)
    same_when_everything_ended_is_spilled(h.logs, report)
    found = [v for v in report.violations if invariant is None or v.invariant == invariant]
    return report, found


def same_when_everything_ended_is_spilled(logs, report) -> None:
    """A checker that spills each ended migration and deleted instance as soon as it can,
    and reads where an allocation was released from the log again, reports exactly
    what one that keeps them all does."""
    spilled = check(logs, spill=MemorySpill(), keep=0)
    assert msgspec.json.encode(spilled) == msgspec.json.encode(report)


def resized(old=TINY, new=SMALL) -> History:
    h = History()
    h.boot("a", U, old)
    h.resize(M, U, "a", "b", old, new)
    return h


# --------------------------------------------------------------------------- clean

def test_clean_hand_history_passes():
    h = resized()
    h.full_resize(M)
    h.revert_dest(M)
    h.finish_revert(M)
    h.resize("m2", U, "a", "b", TINY, SMALL)
    h.full_resize("m2")
    h.confirm("m2")
    report = check(h.logs)
    assert report.ok and report.violations == []
    assert (report.events, report.hosts, report.instances, report.migrations) == (
        sum(len(log) for log in h.logs.values()), 2, 1, 2)
    assert report.open_migrations == 0


def test_a_checker_without_end_state_keeps_a_window_of_ended_migrations():
    """The simulator's incremental checker keeps the last `keep_ended` ended migrations:
    the oldest goes (and is shown to `on_forget`); a record of it later is reported."""
    from vmresize.projections.audit import _Checker, merge_logs
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    h.resize("m2", U, "a", "b", TINY, SMALL)
    h.full_resize("m2")
    h.confirm("m2")
    forgotten = []
    c = _Checker(end_state=False, keep_ended=1, on_forget=forgotten.append)
    for env in merge_logs(h.logs):
        c.feed(env)
    assert [m.id for m in forgotten] == [M] and set(c.p.migrations) == {"m2"}
    assert c.violations == []
    last_of_m = [e.event for e in h.logs["b"] if getattr(e.event, "migration_id", "") == M]
    c.feed(h.add("b", msgspec.structs.replace(last_of_m[-1])))     # M's last, once more
    assert any(v.invariant == "state-machine" and f"migration {M} that was never "
               "claimed" in v.message for v in c.violations), c.violations
    with pytest.raises(ValueError, match="keep_ended"):
        _Checker(keep_ended=1)      # the end-state checks need every migration


def test_a_checker_without_end_state_keeps_a_window_of_deleted_instances():
    from vmresize.projections.audit import _Checker, merge_logs
    h = History()
    for uuid in ("u1", "u2", "u3"):
        h.boot("a", uuid, TINY)
        h.inst("a", ev.Deleted, uuid)
    c = _Checker(end_state=False, keep_ended=2)
    for env in merge_logs(h.logs):
        c.feed(env)
    assert set(c.p.instances) == set(c.versions) == {"u2", "u3"}
    assert c.violations == []


@settings(max_examples=25, deadline=None)
@given(h=s.hand_histories())
def test_every_hand_built_protocol_path_passes(h):
    report = check(h.logs)
    assert report.ok, report.violations


@settings(max_examples=15, deadline=None)
@given(logs=s.protocol_histories())
def test_simulated_histories_pass(logs):
    report = check(logs)
    assert report.ok, report.violations
    assert report.events == sum(len(envs) for envs in logs.values())


def test_an_open_migration_is_not_a_violation():
    h = resized()
    h.claim(M)
    h.start(M)
    report = check(h.logs)
    assert report.ok and report.open_migrations == 1


def test_a_compensation_under_way_is_not_a_violation():
    # Given a disk shrink refused on the source (the instance rolled back at once) and
    # the destination's release not written yet, as an audit of a running cluster sees
    h = resized(old=SMALL, new=TINY)
    h.claim(M)
    h.fail(M, "resize_instance")
    report = check(h.logs)
    assert report.ok, report.violations
    assert report.open_migrations == 1
    # and once the destination released its claim, the migration has ended
    h.release(M, "dest")
    report = check(h.logs)
    assert report.ok and report.open_migrations == 0


def test_a_claim_left_behind_by_a_newer_migration_is_held_until_released():
    # Given a claim on b the controller gave up on before the source heard of it, and a
    # new migration of the same instance claimed on c
    h = History(hosts=("a", "b", "c"))
    h.boot("a", U, SMALL)
    h.resize(M, U, "a", "b", SMALL, TINY)
    h.claim(M)
    h.resize("z-later", U, "a", "c", SMALL, SMALL)    # an id that sorts after M's
    h.claim("z-later")
    # then b still holds its claim, a only the instance, and nothing is amiss
    report = check(h.logs)
    assert report.ok and report.open_migrations == 2, report.violations
    h.release(M, "dest")
    report = check(h.logs)
    assert report.ok and report.open_migrations == 1, report.violations


@pytest.mark.parametrize("stop", ["finish failed", "reverting"])
def test_a_compensation_or_revert_half_done_is_not_a_violation(stop):
    # as the audit of a running cluster sees: the finish failed on b and a has not
    # taken the instance back yet, or b reverted and a has not finished the revert
    h = resized()
    h.claim(M)
    h.start(M)
    h.disks(M)
    if stop == "finish failed":
        h.mig("b", ev.FinishStarted, M)
        h.fail(M, "finish")
    else:
        h.finish(M)
        h.revert_dest(M)
    report = check(h.logs)
    assert report.ok and report.open_migrations == 1, report.violations


def test_a_spawn_that_failed_holds_nothing_and_is_no_leak():
    h = History()
    h.inst("a", ev.SpawnStarted, U, name="vm", flavor=TINY, resources=TINY.resources())
    h.inst("a", ev.SpawnFailed, U, reason="no image")
    h.boot("b", "later", TINY)       # an instance looked at after the failed one
    report = check(h.logs)
    assert report.ok, report.violations


def test_a_leak_is_found_whatever_instance_comes_before_it():
    # the instance with an open migration is checked first: the leak after it is found
    h = History()
    h.boot("a", "u1", TINY)
    h.resize(M, "u1", "a", "b", TINY, SMALL)
    h.claim(M)
    h.boot("a", "u2", TINY)
    twice = h.inst("b", ev.SpawnStarted, "u2", name="vm-u2", flavor=TINY,
                   resources=TINY.resources())
    _, found = violations(h, "no-leak")
    assert [(v.host, v.offset) for v in found] == [("b", twice.offset)]
    assert "u2" in found[0].message and "held by ['a', 'b']" in found[0].message


def test_a_revert_given_up_before_the_source_released_is_not_a_violation():
    h = resized()
    h.full_resize(M)
    h.mig("b", ev.RevertStarted, M)
    h.fail(M, "revert", rolled_back=False)
    report = check(h.logs)
    assert report.ok and report.open_migrations == 1, report.violations


# --------------------------------------------------------------------------- 1 capacity

def test_1_over_capacity_claim_is_caught():
    h = History(limit=Resources(4, 4096, 100))
    h.boot("a", U, TINY)
    h.resize(M, U, "a", "b", TINY, ev.Flavor(name="huge", vcpus=2, memory_mb=8192,
                                                root_gb=20))
    bad = h.claim(M)
    _, found = violations(h, "capacity")
    assert len(found) == 1
    assert (found[0].host, found[0].offset) == ("b", bad.offset)
    assert "over its limit" in found[0].message


def test_1_allocating_before_the_capacity_is_logged_is_caught():
    h = History(hosts=())
    env = h.boot("a", U, TINY)[0]
    _, found = violations(h, "capacity")
    assert [(v.host, v.offset) for v in found] == [("a", env.offset)]
    assert found[0].message == "host a allocates before logging its capacity"


# --------------------------------------------------------------------------- 2 version chain

def test_2_gap_in_the_version_chain_is_caught():
    h = History()
    h.inst("a", ev.SpawnStarted, U, name="vm", flavor=TINY, resources=TINY.resources())
    h.next_version(U)           # version 2 is never written
    gap = h.inst("a", ev.Spawned, U)
    _, found = violations(h, "version-chain")
    assert [(v.host, v.offset) for v in found] == [("a", gap.offset)]
    assert "gap" in found[0].message


def test_2_one_lost_record_is_one_gap_whatever_waits_behind_it():
    # Given instance X whose version 4 was lost on host a, and instance Y whose version
    # 2 was written on a after X's version 5, between its versions 1 and 3 on b
    h = History()
    h.inst("a", ev.SpawnStarted, "X", name="x", flavor=TINY, resources=TINY.resources())
    for _ in range(2):
        h.inst("a", ev.PoweredOff, "X")
    h.next_version("X")                                  # version 4 is lost
    gap = h.inst("a", ev.PoweredOn, "X")
    h.inst("b", ev.SpawnStarted, "Y", name="y", flavor=TINY, resources=TINY.resources())
    h.inst("a", ev.PoweredOff, "Y")
    h.inst("b", ev.PoweredOn, "Y")
    # then the one gap is reported, at X's version 5; Y's chain is whole
    _, found = violations(h, "version-chain")
    assert [(v.host, v.offset) for v in found] == [("a", gap.offset)]


def test_2_an_old_version_written_again_is_a_fork_not_a_gap():
    h = History()
    h.boot("a", U, TINY)
    h.inst("a", ev.PoweredOff, U)
    h.versions[U] = 1
    again = h.inst("a", ev.PoweredOn, U)         # version 2 after version 3
    _, found = violations(h, "version-chain")
    assert [(v.host, v.offset) for v in found] == [("a", again.offset)]
    assert "version 2 written twice (fork)" in found[0].message


def test_2_versions_after_a_gap_go_on_from_it():
    h = History()
    h.boot("a", U, TINY)
    h.inst("a", ev.PoweredOff, U)
    h.versions[U] = 4
    gap = h.inst("a", ev.PoweredOn, U)          # version 5 follows 3
    for _ in range(3):
        h.inst("a", ev.PoweredOff, U)
    _, found = violations(h, "version-chain")
    assert [(v.host, v.offset) for v in found] == [("a", gap.offset)]


def test_2_fork_in_the_version_chain_is_caught():
    # Given the source and the destination both wrote version 9 (split brain)
    h = resized()
    h.full_resize(M)
    h.confirm(M)                       # source writes 8, 9
    h.versions[U] = 7
    fork = h.mig("b", ev.RevertStarted, M)  # destination writes 8 again
    confirm_started = h.logs["a"][-2]
    _, found = violations(h, "version-chain")
    assert len(found) == 1 and "fork" in found[0].message
    # a fork has two writers: the one merged second is reported, the first is named
    writers = {("b", fork.offset), ("a", confirm_started.offset)}
    reported = (found[0].host, found[0].offset)
    assert reported in writers
    (other,) = writers - {reported}
    assert found[0].offsets == [other[1]]
    assert f"first at {other[0]}:{other[1]}" in found[0].message


# --------------------------------------------------------------------------- 3 state machine

def test_3_finished_right_after_claimed_is_caught():
    h = resized()
    h.claim(M)
    bad = h.mig("b", ev.Finished, M)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("b", bad.offset)]
    assert "pre-migrating -> finished" in found[0].message


def test_3_a_finish_before_the_disks_left_the_source_is_caught():
    # each end's own log may skip the other's statuses; merged, none may be skipped
    h = resized()
    h.claim(M)
    bad = h.mig("b", ev.FinishStarted, M)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("b", bad.offset)]
    assert "pre-migrating -> post-migrating (FinishStarted)" in found[0].message


@pytest.mark.parametrize("step", [ev.ConfirmStarted, ev.RevertFinishStarted])
def test_3_a_confirm_or_revert_before_the_finish_is_caught(step):
    h = resized()
    h.claim(M)
    h.start(M)
    h.disks(M)
    bad = h.mig("a", step, M)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("a", bad.offset)]
    assert "post-migrating -> " in found[0].message


def test_3_event_of_a_migration_never_claimed_is_caught():
    h = resized()
    h.specs["ghost"] = h.specs[M]
    bad = h.mig("a", ev.DiskMigrated, "ghost", shared_storage=False)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("a", bad.offset)]


def test_3_revert_after_confirm_is_caught():
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    bad = h.mig("b", ev.RevertStarted, M)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("b", bad.offset)]


@pytest.mark.parametrize("end", ["confirmed", "reverted"])
def test_3_a_step_repeated_after_the_end_is_caught(end):
    h = resized()
    h.full_resize(M)
    if end == "confirmed":
        h.confirm(M)
        again = h.mig("a", ev.Confirmed, M)       # the status stays confirmed
    else:
        h.revert_dest(M)
        h.finish_revert(M)
        again = h.mig("a", ev.Reverted, M, power_state=ev.RUNNING)
    _, found = violations(h, "state-machine")
    assert [(v.host, v.offset) for v in found] == [("a", again.offset)]
    assert f"{type(again.event).__name__} after it ended ({end})" in found[0].message


def test_3_claimed_twice_is_caught():
    h = resized()
    h.claim(M)
    again = h.claim(M)
    _, found = violations(h, "state-machine")
    assert (found[0].host, found[0].offset) == ("b", again.offset)


# --------------------------------------------------------------------------- 4 no leak

def test_4_ended_migration_that_left_a_claim_is_caught():
    # Given a disk shrink refused on the source, and the destination's release written
    # by the wrong host: the migration ends, but b still holds its claim
    h = resized(old=SMALL, new=TINY)
    h.claim(M)
    h.fail(M, "resize_instance")
    last = h.release(M, "dest", host="a")
    report, found = violations(h, "no-leak")
    assert len(found) == 1
    assert (found[0].host, found[0].offset) == ("a", last.offset)
    assert "still holds m:m:new" in found[0].message
    assert "b" in found[0].message


def test_4_a_leak_is_found_whatever_the_migration_id_holds():
    h = resized(old=SMALL, new=TINY)
    h.specs["id:with:colons"] = h.specs.pop(M)
    h.claim("id:with:colons")
    h.fail("id:with:colons", "resize_instance")
    last = h.release("id:with:colons", "dest", host="a")
    _, found = violations(h, "no-leak")
    assert [(v.host, v.offset) for v in found] == [("a", last.offset)]
    assert "b still holds m:id:with:colons:new" in found[0].message


def test_4_instance_held_by_no_host_is_caught():
    h = resized()
    h.claim(M)
    h.start(M)
    h.release(M, "source")            # the source let go of the instance itself
    last = h.release(M, "dest")
    _, found = violations(h, "no-leak")
    assert any(v.offset == last.offset and v.host == "b" and "held by none" in v.message
               for v in found)


# --------------------------------------------------------------------------- 5 resize dirs

def test_5_resize_dir_left_after_a_failure_not_rolled_back():
    # Given the disks moved, then migrate is recorded as failed and not rolled back
    h = resized()
    h.claim(M)
    h.start(M)
    h.disks(M, shared=False)
    h.fail(M, "migrate", rolled_back=False)
    last = h.release(M, "dest")
    report, found = violations(h, "resize-dirs")
    assert {(v.host, v.offset) for v in found} == {("b", last.offset)}
    messages = " ".join(v.message for v in found)
    assert "u_resize on a" in messages
    assert "disk copy on b" in messages
    assert {v.invariant for v in report.violations} == {"resize-dirs"}


def test_5_a_confirm_given_up_leaves_the_resize_dir_but_not_the_instance_disks():
    # Given a confirm given up on the source after the instance finished on b
    h = resized()
    h.full_resize(M)
    h.mig("a", ev.ConfirmStarted, M)
    gave_up = h.fail(M, "confirm", rolled_back=False)
    report, found = violations(h, "resize-dirs")
    # then the `_resize` dir on a is reported; the disks on b are the instance's
    assert [(v.host, v.offset) for v in found] == [("a", gave_up.offset)]
    assert "u_resize on a" in found[0].message
    assert report.instances == 1 and check(h.logs).violations == found


def test_5_a_revert_given_up_on_the_destination_leaves_the_resize_dir_only():
    h = resized()
    h.full_resize(M)
    h.mig("b", ev.RevertStarted, M)
    gave_up = h.fail(M, "revert", rolled_back=False)
    h.release(M, "source")        # the source gives the migration's allocation up
    _, found = violations(h, "resize-dirs")
    assert [(v.host, v.offset) for v in found] == [("a", h.logs["a"][-1].offset)]
    assert "u_resize on a" in found[0].message and "copy" not in found[0].message
    assert gave_up.offset < len(h.logs["b"])


def test_5_a_resize_dir_left_is_found_whatever_migration_comes_before_it():
    # an open migration is looked at first; the one after it left its `_resize` dir
    h = History(hosts=("a", "b", "c"))
    h.boot("a", "u1", TINY)
    h.resize("open", "u1", "a", "b", TINY, SMALL)
    h.claim("open")
    h.boot("a", "u2", TINY)
    h.resize("left", "u2", "a", "c", TINY, SMALL)
    h.full_resize("left")
    h.mig("a", ev.ConfirmStarted, "left")
    gave_up = h.fail("left", "confirm", rolled_back=False)
    _, found = violations(h, "resize-dirs")
    assert [(v.host, v.offset) for v in found] == [("a", gave_up.offset)]


def test_5_confirmed_leaves_no_dirs():
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    assert violations(h, "resize-dirs")[1] == []


# --------------------------------------------------------------------------- 6 ledger

def _forget_dest_reverted(monkeypatch):
    real = fold_module._ledger_changes

    def forgetful(allocs, e):
        if type(e) is ev.DestReverted:
            return fold_module._NONE   # the broken rule: the destination keeps the instance
        return real(allocs, e)

    monkeypatch.setattr(fold_module, "_ledger_changes", forgetful)


def test_6_ledger_that_disagrees_with_instances_is_caught(monkeypatch):
    _forget_dest_reverted(monkeypatch)
    h = resized()
    h.full_resize(M)
    h.revert_dest(M)
    h.finish_revert(M)
    report = check(h.logs)
    found = {v.invariant: v for v in report.violations}
    assert set(found) == {"no-leak", "ledger-matches"}
    # reported at the record that last changed the allocation there: Finished
    finished = next(env for env in h.logs["b"] if type(env.event) is ev.Finished)
    assert (found["ledger-matches"].host, found["ledger-matches"].offset) == (
        "b", finished.offset)
    assert "i:u" in found["ledger-matches"].message
    assert "held by ['a', 'b']" in found["no-leak"].message or \
        "held by ['b', 'a']" in found["no-leak"].message


def test_6_is_reported_at_the_record_that_last_changed_the_allocation():
    # Given a claim that stated other old resources than the source held: after the
    # revert, the instance (old resources by the claim) and a's allocation disagree
    h = History()
    h.boot("a", U, TINY)
    spec = h.resize(M, U, "a", "b", TINY, SMALL)
    h.specs[M] = (U, msgspec.structs.replace(spec, old_resources=Resources(2, 512, 1)))
    h.full_resize(M)
    h.revert_dest(M)
    _, reverted = h.finish_revert(M)
    # later records on a change other allocations; "other" is resized and reverted
    # cleanly, its allocation on a equal to (not the same object as) the instance's
    h.boot("a", "other", TINY)
    h.resize("m2", "other", "a", "b", TINY, SMALL)
    h.full_resize("m2")
    h.revert_dest("m2")
    h.finish_revert("m2")
    _, found = violations(h, "ledger-matches")
    assert [(v.host, v.offset) for v in found] == [("a", reverted.offset)]
    assert "i:u is 1 vcpus/512 MB/1 GB by claim events, 2 vcpus/512 MB/1 GB" in \
        found[0].message


def test_6_an_allocation_never_made_on_a_host_is_reported_at_its_last_record():
    # Given the Finished written by the source: b never turned its claim into the
    # instance's allocation, which the instances expect on b
    h = resized()
    claimed = h.claim(M)
    h.start(M)
    h.disks(M)
    h.mig("b", ev.FinishStarted, M)
    h.mig("a", ev.Finished, M, power_state=ev.RUNNING)
    h.inst("b", ev.PoweredOff, U)
    h.inst("b", ev.PoweredOn, U)
    _, found = violations(h, "ledger-matches")
    never = [v for v in found if v.host == "b" and "i:u is nothing" in v.message]
    assert [v.offset for v in never] == [len(h.logs["b"]) - 1]
    # and the claim b still holds, at the record that made it
    held = [v for v in found if v.host == "b" and "m:m:new is 1 vcpus" in v.message]
    assert [v.offset for v in held] == [claimed.offset]


def test_6_the_same_history_passes_with_the_real_rule():
    h = resized()
    h.full_resize(M)
    h.revert_dest(M)
    h.finish_revert(M)
    assert check(h.logs).ok


# --------------------------------------------------------------------------- state dirs

@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    s.run_simulation(tmp, seed=3, hosts=3, instances=4, operations=12)
    return tmp / "state"


def test_audit_of_a_simulated_state_dir(state_dir):
    logs = s.read_host_logs(state_dir)
    report = audit(state_dir)
    assert report.ok, report.violations
    assert report.events == sum(len(v) for v in logs.values())
    assert report.hosts == len(logs) == 3


@pytest.mark.parametrize("bare", ["0", "12", "20260101"])
def test_audit_as_of_a_bare_offset_is_refused_with_the_reason(state_dir, bare):
    # offsets count each host's log on its own: "offset 12" is no moment of the cluster
    with pytest.raises(ValueError) as refused:
        audit(state_dir, as_of=bare)
    message = str(refused.value)
    assert message.startswith("--as-of: a bare offset is refused")
    assert "different moment on every host" in message and f"HOST:{bare}" in message


def depends_on(logs, host: str, offset: int) -> dict[str, int]:
    """The cut of `host:offset` computed the slow, obvious way: keep adding, until
    nothing changes, the earlier records of every log in the cut and the previous
    version of every instance record in it."""
    cut = {h: 0 for h in logs}
    cut[host] = offset + 1
    changed = True
    while changed:
        changed = False
        for h, envs in logs.items():
            for env in envs[:cut[h]]:
                e = env.event
                if not isinstance(e, ev.InstanceEvent):
                    continue
                for h2, envs2 in logs.items():
                    for env2 in envs2:
                        e2 = env2.event
                        if isinstance(e2, ev.InstanceEvent) and \
                                e2.instance_uuid == e.instance_uuid and \
                                e2.instance_version == e.instance_version - 1 and \
                                cut[h2] <= env2.offset:
                            cut[h2] = env2.offset + 1
                            changed = True
    return cut


def test_audit_as_of_a_record_reads_that_record_and_what_it_depends_on(state_dir):
    logs = s.read_host_logs(state_dir)
    host = "sim-2"
    for offset in (0, len(logs[host]) // 2, len(logs[host]) - 1):
        report = audit(state_dir, as_of=f"{host}:{offset}")
        assert report.records == depends_on(logs, host, offset)
        assert report.records[host] == offset + 1
        assert report.events == sum(report.records.values())
        assert report.ok, report.violations       # a consistent cut of a clean history


@settings(max_examples=30, deadline=None)
@given(history=s.pool_histories(), data=st.data())
def test_every_cut_of_a_clean_simulated_history_is_clean(history, data):
    # Given any record of a simulated history (crashes and faults included)
    seed, logs = history
    host = data.draw(st.sampled_from(sorted(logs)))
    offset = data.draw(st.integers(0, len(logs[host]) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        s.write_state_dir(logs, tmp)
        report = audit(tmp, as_of=f"{host}:{offset}", expected_hosts=sorted(logs))
    # then the audit as of it reads exactly its cut, and finds nothing wrong there:
    # migrations may be open, nothing is held twice or forgotten
    assert report.records == depends_on(logs, host, offset), seed
    assert report.ok, (seed, report.violations)


def test_audit_as_of_a_host_or_offset_not_there_is_refused(state_dir):
    size = len(s.read_host_logs(state_dir)["sim-1"])
    with pytest.raises(ValueError, match=r"--as-of: no log for host 'sim-9' \(hosts: "
                                         r"sim-1, sim-2, sim-3\)"):
        audit(state_dir, as_of="sim-9:0")
    with pytest.raises(ValueError, match=rf"--as-of: host sim-1 has {size} records "
                                         rf"\(offsets 0 to {size - 1}\), got offset "
                                         rf"{size}"):
        audit(state_dir, as_of=f"sim-1:{size}")
    assert audit(state_dir, as_of=f"sim-1:{size - 1}").records["sim-1"] == size
    with pytest.raises(ValueError, match=rf"got offset {size + 5}"):
        audit(state_dir, as_of=f"sim-1:{size + 5}")


def test_audit_as_of_an_iso_time(state_dir):
    logs = s.read_host_logs(state_dir)
    times = sorted(env.wall_time for envs in logs.values() for env in envs)
    moment = times[len(times) // 2]
    iso = datetime.fromtimestamp(moment, tz=timezone.utc).isoformat()
    report = audit(state_dir, as_of=iso)
    expected = sum(1 for envs in logs.values() for env in envs if env.wall_time <= moment)
    # an ISO time has microseconds: records within the same microsecond count as before
    assert abs(report.events - expected) <= 1
    assert 0 < report.events < len(times)
    # one clock for all hosts: a time cut is consistent, so the chains and the state
    # machine hold (migrations may be open, which is not a violation)
    assert not [v for v in report.violations if v.invariant in
                ("capacity", "version-chain", "state-machine")]


def test_audit_as_of_nothing_is_the_whole_history(state_dir):
    assert audit(state_dir, as_of="").records == audit(state_dir).records


@pytest.mark.parametrize("garbage", ["yesterday-ish", "sim-1:", ":5", "sim-1:-1",
                                     "sim-1:x"])
def test_audit_as_of_garbage_is_refused(state_dir, garbage):
    with pytest.raises(ValueError, match=f"--as-of: expected HOST:OFFSET or an ISO "
                                         f"time, got '{garbage}'"):
        audit(state_dir, as_of=garbage)


def test_audit_of_a_missing_directory_raises_log_error(tmp_path):
    missing = tmp_path / "nope"
    try:
        with pytest.raises(LogError):
            audit(missing)
    finally:
        assert not missing.exists()


def test_audit_of_an_empty_directory_raises_log_error(tmp_path):
    with pytest.raises(LogError):
        audit(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_audit_of_a_missing_directory_creates_nothing(tmp_path):
    missing = tmp_path / "nope"
    try:
        audit(missing)
    except LogError:
        pass
    assert not missing.exists()
    assert list(tmp_path.iterdir()) == []


def test_audit_writes_nothing(state_dir):
    before = {p: p.stat().st_mtime_ns for p in state_dir.rglob("*")}
    audit(state_dir)
    assert {p: p.stat().st_mtime_ns for p in state_dir.rglob("*")} == before


def test_audit_reports_a_torn_tail_and_uses_the_records_before_it(state_dir, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)
    seg = sorted((copy / "hosts" / "sim-1" / "log").glob("*.seg"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00")      # half a header: an interrupted write
    size = seg.stat().st_size
    report = audit(copy)
    assert report.ok
    assert [t.host for t in report.torn_tails] == ["sim-1"]
    assert report.events == audit(state_dir).events
    assert seg.stat().st_size == size           # read-only: not truncated


def test_check_orders_instance_events_across_hosts():
    # The destination's log is complete before the source's: merge must still replay
    # each instance in version order.
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    logs = {"b": h.logs["b"], "a": h.logs["a"]}
    assert check(logs).ok


def test_violation_offsets_are_ints():
    h = resized()
    h.claim(M)
    h.mig("b", ev.Finished, M)
    for v in check(h.logs).violations:
        assert isinstance(v.offset, int) and isinstance(v.host, str)


# --------------------------------------------------------------------------- the cluster's hosts

def test_a_host_of_the_cluster_with_no_log_is_a_violation_naming_it():
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    report = check(h.logs, expected_hosts=["a", "b", "c"])
    assert not report.ok
    assert [(v.invariant, v.host, v.offset) for v in report.violations] == [
        ("host-log", "c", 0)]
    assert report.violations[0].message == "host c is in the cluster but has no log"
    assert check(h.logs, expected_hosts=["a", "b"]).ok
    assert check(h.logs).ok              # no list of hosts: only the logs there


def test_a_host_of_the_cluster_with_an_empty_log_is_a_violation_naming_it(tmp_path):
    h = resized()
    h.full_resize(M)
    logs = {**h.logs, "c": []}
    s.write_state_dir(logs, tmp_path)
    report = audit(tmp_path, expected_hosts=["a", "b", "c"])
    assert [(v.invariant, v.host, v.offset, v.message) for v in report.violations] == [
        ("host-log", "c", 0, "host c is in the cluster but has an empty log")]
    assert report.hosts == 3 and audit(tmp_path, expected_hosts=["a", "b"]).ok


def test_a_cut_before_a_hosts_first_record_does_not_make_its_log_empty(state_dir):
    logs = s.read_host_logs(state_dir)
    first = min(logs, key=lambda host: logs[host][0].wall_time)
    report = audit(state_dir, as_of=f"{first}:0", expected_hosts=sorted(logs))
    assert report.ok and report.events == 1, report.violations
    missing = audit(state_dir, as_of=f"{first}:0", expected_hosts=[*logs, "sim-9"])
    assert [v.host for v in missing.violations] == ["sim-9"]


# --------------------------------------------------------------------------- reports and reading

def test_violations_torn_tail_notes_and_cuts_are_frozen():
    from vmresize.projections.audit import TornTailNote, Violation, parse_as_of
    v = Violation("capacity", "m", "a", 1)
    note = TornTailNote("a", "seg", 3, 4)
    for value, field in ((v, "offset"), (note, "offset"), (parse_as_of("a:1"), "offset")):
        with pytest.raises(AttributeError):
            setattr(value, field, 0)


def test_audit_as_of_the_last_record_of_every_host(state_dir):
    logs = s.read_host_logs(state_dir)
    for host, envs in logs.items():
        report = audit(state_dir, as_of=f"{host}:{len(envs) - 1}")
        assert report.records[host] == len(envs) and report.ok


def test_audit_as_of_a_record_of_an_empty_log_is_refused(tmp_path):
    h = resized()
    s.write_state_dir({**h.logs, "c": []}, tmp_path)
    with pytest.raises(ValueError, match="--as-of: host c has an empty log, got offset 0"):
        audit(tmp_path, as_of="c:0")


def test_audit_as_of_a_record_deep_in_a_long_log(tmp_path):
    # more instance records on one host than small ints Python keeps one copy of
    h = History(hosts=("a",))
    h.boot("a", U, TINY)
    for _ in range(150):
        h.inst("a", ev.PoweredOff, U)
        h.inst("a", ev.PoweredOn, U)
    h.inst("a", ev.PoweredOff, U)
    s.write_state_dir(h.logs, tmp_path)
    last = len(h.logs["a"]) - 1
    assert last % 2 == 1        # an odd offset: its size is not `offset | 1`
    report = audit(tmp_path, as_of=f"a:{last}")
    assert report.records == {"a": last + 1} and report.ok


def test_audit_closes_every_log_it_opened(state_dir):
    import os
    before = sorted(os.listdir("/proc/self/fd"))
    audit(state_dir)
    audit(state_dir, as_of="sim-1:3")
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_audit_as_of_a_record_follows_its_first_dependency(tmp_path):
    # b's first record after its capacity is a claim, version 3 of an instance on a
    h = resized()
    h.claim(M)
    s.write_state_dir(h.logs, tmp_path)
    assert audit(tmp_path, as_of="b:1").records == {"a": 3, "b": 2}


def test_audit_as_of_a_record_far_into_a_log_stops_there(tmp_path):
    # a record past offset 256 whose later neighbours depend on another host
    h = History()
    h.boot("a", U, TINY)
    for _ in range(140):
        h.inst("a", ev.PoweredOff, U)
        h.inst("a", ev.PoweredOn, U)
    h.boot("b", "w", TINY)
    h.inst("a", ev.PoweredOff, "w")              # w's version 3, written on a
    s.write_state_dir(h.logs, tmp_path)
    cut = len(h.logs["a"]) - 2
    assert cut > 256
    assert audit(tmp_path, as_of=f"a:{cut}").records == {"a": cut + 1, "b": 0}


def test_audit_as_of_a_time_includes_the_records_written_at_that_time(tmp_path):
    h = resized()
    h.full_resize(M)
    s.write_state_dir(h.logs, tmp_path)
    claimed = h.logs["b"][1]
    moment = datetime.fromtimestamp(claimed.wall_time, tz=timezone.utc).isoformat()
    report = audit(tmp_path, as_of=moment)
    assert report.records["b"] == 2
    assert report.events == sum(1 for envs in h.logs.values() for env in envs
                                if env.wall_time <= claimed.wall_time)


def test_audit_as_of_a_record_stops_at_it_when_the_next_one_is_not_an_instances(tmp_path):
    h = History()
    h.boot("b", "w", TINY)
    h.boot("a", U, TINY)
    h.add("a", ev.ClaimRejected(migration_id="x", instance_uuid=U, dest="a",
                                reason="full"))
    h.inst("a", ev.PoweredOff, "w")              # w's version 3, written on a
    s.write_state_dir(h.logs, tmp_path)
    assert audit(tmp_path, as_of="a:2").records == {"a": 3, "b": 0}


# --------------------------------------------------------------------------- two processes
#
# `audit(processes=2)` splits the checker between a helper process (host side) and this
# one (instance side); its report must be the one process's, violations, their order,
# hosts and offsets included.

split_module = importlib.import_module("vmresize.offline.split_audit")


def _write_state(state_dir, logs) -> None:
    """Each host's events into a real segment log, offsets stamped anew from 0."""
    for host, envs in logs.items():
        log = SegmentLog(state_dir / "hosts" / host / "log", fsync=False)
        log.append(list(envs), lambda offset, env, host=host: encode(
            msgspec.structs.replace(env, host=host, offset=offset)))
        log.close()


def _same_on_two_processes(state_dir, chunk_records: int = 3):
    """...and the same whether what ended is kept in memory or spilled at once."""
    one = audit(state_dir, processes=1, keep=None)
    others = [audit(state_dir, processes=1, keep=0)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_module, "CHUNK_RECORDS", chunk_records)   # many chunks
        others += [audit(state_dir, processes=2, keep=None),
                   audit(state_dir, processes=2, keep=0)]
    for other in others:
        assert other.violations == one.violations
        assert msgspec.msgpack.encode(other) == msgspec.msgpack.encode(one)
    return one


@st.composite
def injured_histories(draw):
    """A simulated history with records dropped, copied to another host, given another
    version, or made to claim far more than any host has."""
    logs = {h: list(envs) for h, envs in draw(s.protocol_histories()).items()}
    hosts = sorted(logs)
    for _ in range(draw(st.integers(0, 4))):
        host = draw(st.sampled_from(hosts))
        if not logs[host]:
            continue
        i = draw(st.integers(0, len(logs[host]) - 1))
        env = logs[host][i]
        kind = draw(st.sampled_from(["drop", "copy", "version", "greedy"]))
        if kind == "drop":
            del logs[host][i]
        elif kind == "copy":
            other = logs[draw(st.sampled_from(hosts))]
            other.insert(draw(st.integers(0, len(other))), env)
        elif kind == "version" and isinstance(env.event, ev.InstanceEvent):
            v = env.event.instance_version + draw(st.sampled_from([-1, 1, 2]))
            logs[host][i] = msgspec.structs.replace(env, event=msgspec.structs.replace(
                env.event, instance_version=v))
        elif kind == "greedy" and type(env.event) is ev.SpawnStarted:
            logs[host][i] = msgspec.structs.replace(env, event=msgspec.structs.replace(
                env.event, resources=Resources(10_000, 1 << 30, 1 << 20)))
    return logs


@settings(max_examples=8, deadline=None)
@given(logs=injured_histories())
def test_two_processes_report_what_one_does(tmp_path_factory, logs):
    state_dir = tmp_path_factory.mktemp("state")
    _write_state(state_dir, logs)
    _same_on_two_processes(state_dir)


def test_two_processes_put_capacity_findings_where_one_does(tmp_path):
    h = History(limit=Resources(4, 4096, 100))
    h.boot("a", U, TINY)
    h.boot("b", "u2", TINY)
    h.resize(M, U, "a", "b", TINY, ev.Flavor(name="huge", vcpus=2, memory_mb=8192,
                                                root_gb=20))
    h.claim(M)
    h.boot("a", "u3", ev.Flavor(name="big", vcpus=8, memory_mb=512, root_gb=1))
    _write_state(tmp_path, h.logs)
    report = _same_on_two_processes(tmp_path, chunk_records=2)
    assert [(v.invariant, v.host) for v in report.violations] == [
        ("capacity", "a"), ("capacity", "b")]


def test_two_processes_report_a_torn_tail_and_cut_as_of(tmp_path, monkeypatch):
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    _write_state(tmp_path, h.logs)
    with open(next((tmp_path / "hosts" / "b" / "log").glob("*.seg")), "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    report = _same_on_two_processes(tmp_path)
    assert [t.host for t in report.torn_tails] == ["b"]
    monkeypatch.setattr(split_module, "CHUNK_RECORDS", 2)
    for as_of in ("b:3", datetime.fromtimestamp(h.logs["b"][2].wall_time,
                                                timezone.utc).isoformat()):
        assert audit(tmp_path, as_of, processes=2) == audit(tmp_path, as_of, processes=1)
    for hosts in (["a", "b"], ["a", "b", "c"]):
        assert audit(tmp_path, expected_hosts=hosts, processes=2) == audit(
            tmp_path, expected_hosts=hosts, processes=1)


def test_two_processes_raise_what_one_does_on_a_corrupt_log(tmp_path):
    h = resized()
    h.full_resize(M)
    _write_state(tmp_path, h.logs)
    seg = next((tmp_path / "hosts" / "a" / "log").glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[12] ^= 0xFF               # inside the first record: its CRC no longer matches
    seg.write_bytes(bytes(data))
    errors = []
    for processes in (1, 2):
        with pytest.raises(CorruptLog) as exc:
            audit(tmp_path, processes=processes)
        errors.append((exc.value.path, exc.value.offset))
    assert errors[0] == errors[1] == (str(seg), 0)


def test_a_split_audit_of_many_logs_keeps_few_records_of_each_in_flight():
    split_module = importlib.import_module("vmresize.offline.split_audit")
    assert split_module.chunk_records_for(1) == split_module.MERGED_RECORDS
    assert split_module.chunk_records_for(100) * 100 <= split_module.MERGED_RECORDS
    assert split_module.chunk_records_for(100_000) == 16


# --------------------------------------------------------------------------- spilling
#
# `audit` keeps the last KEEP_IN_MEMORY ended migrations and deleted instances in memory
# and spills the rest to a temporary file (and reads where an allocation was released
# from the log again), so that its memory follows live state, not history. Every test above checks its history both ways
# (`violations`); these make sure each kind is spilled, and found there at the end.

def test_a_deleted_instance_still_held_is_found_in_the_spill():
    # Given u deleted by the wrong host: a still holds it, and u is spilled at once
    h = History()
    h.boot("a", U, TINY)
    h.boot("a", "u2", TINY)
    gone = h.inst("b", ev.Deleted, U)
    spill = MemorySpill()
    report = check(h.logs, spill=spill, keep=0)
    assert spill.count(INSTANCE) == 1
    found = [v for v in report.violations if v.invariant == "no-leak"]
    assert [(v.host, v.offset) for v in found] == [("b", gone.offset)]
    assert "should be held by 0 host(s), is held by ['a']" in found[0].message
    assert report == check(h.logs) and report.instances == 2


def test_a_record_of_a_spilled_instance_takes_it_back_with_its_version_chain():
    h = History()
    h.boot("a", U, TINY)
    h.inst("a", ev.Deleted, U)
    h.inst("a", ev.PoweredOn, U)          # its next version: no gap
    spill = MemorySpill()
    checker = _Checker(spill=spill, keep=0)
    for env in merge_logs(h.logs):
        checker.feed(env)
        if type(env.event) is ev.Deleted:
            assert spill.count(INSTANCE) == 1 and U not in checker.p.instances
    assert spill.count(INSTANCE) == 0 and checker.versions[U].last == h.versions[U]
    assert checker.violations == []
    gap = h.add("b", ev.PoweredOff(instance_uuid=U, instance_version=9))
    assert [(v.invariant, v.host, v.offset) for v in check(h.logs).violations] == [
        ("version-chain", "b", gap.offset)]
    assert check(h.logs, spill=MemorySpill(), keep=0) == check(h.logs)


def test_an_ended_migration_is_found_in_the_spill():
    # Given M ended, but its destination's release written by the wrong host; then m2
    h = resized(old=SMALL, new=TINY)
    claim = h.claim(M)
    h.fail(M, "resize_instance")
    last = h.release(M, "dest", host="a")
    h.resize("m2", U, "a", "b", SMALL, SMALL)
    h.full_resize("m2")
    h.confirm("m2")
    spill = MemorySpill()
    report = check(h.logs, spill=spill, keep=1)
    assert spill.count(MIGRATION) == 1 and spill.get(MIGRATION, M) is not None
    assert [(v.invariant, v.host, v.offset) for v in report.violations] == [
        ("no-leak", "a", last.offset), ("ledger-matches", "b", claim.offset)]
    assert report == check(h.logs) and report.migrations == 2


def test_a_deleted_instance_with_an_open_migration_is_not_spilled():
    # Given u deleted while b still holds M's claim: what b should hold depends on u
    h = resized()
    h.claim(M)
    h.inst("a", ev.Deleted, U)
    report, _ = violations(h)           # the same with everything spilled it can be
    spill = MemorySpill()
    check(h.logs, spill=spill, keep=0)
    assert spill.count(INSTANCE) == 0
    assert [(v.invariant, v.host) for v in report.violations] == [("ledger-matches", "b")]


def test_the_offline_audit_spills_to_a_temporary_file_and_reports_the_same(tmp_path):
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    h.resize("m2", U, "b", "a", SMALL, TINY)
    h.full_resize("m2")
    h.revert_dest("m2")
    h.finish_revert("m2")
    h.inst("b", ev.Deleted, U)
    s.write_state_dir(h.logs, tmp_path)
    for processes in (1, 2):
        assert audit(tmp_path, processes=processes, keep=0) == audit(
            tmp_path, processes=processes, keep=None) == check(h.logs)


@pytest.mark.parametrize("kind_of_spill, batch", [("memory", 0), ("sqlite", 1),
                                                  ("sqlite", 5), ("sqlite", 1000)])
def test_a_spill_gives_back_what_was_put_whether_written_yet_or_not(kind_of_spill, batch,
                                                                      monkeypatch):
    from vmresize.offline import spill as spill_module
    monkeypatch.setattr(spill_module, "BATCH", batch)   # all, some or none written yet
    spill = MemorySpill() if kind_of_spill == "memory" else spill_module.SqliteSpill()
    h = resized()
    h.claim(M)
    view = fold_module.fold(h.merged())
    mig, inst = view.migrations[M], view.instances[U]
    from vmresize.projections.audit import DeletedInstance, EndedMigration
    for i in range(5):
        spill.put(MIGRATION, f"m{i}", EndedMigration(mig, ("a", i)))
        spill.put(INSTANCE, f"u{i}", DeletedInstance(inst, i, []))
    spill.put(INSTANCE, U, DeletedInstance(inst, 3, [("a", 0), ("b", 2)]))
    spill.put(INSTANCE, "u0", DeletedInstance(inst, 7, []))   # replaced
    assert spill.get(MIGRATION, "m3") == EndedMigration(mig, ("a", 3))
    assert spill.get(INSTANCE, "u0").version == 7 and spill.get(INSTANCE, "nope") is None
    assert spill.take(MIGRATION, "m1").last == ("a", 1)
    assert spill.take(MIGRATION, "m4").last == ("a", 4)
    assert spill.take(MIGRATION, "m4") is None and spill.get(MIGRATION, "m1") is None
    assert sorted(d.last[1] for d in spill.values(MIGRATION)) == [0, 2, 3]
    assert spill.count(MIGRATION) == 3 and spill.count(INSTANCE) == 6
    assert spill.get(INSTANCE, U).recent == [("a", 0), ("b", 2)]
    if kind_of_spill == "sqlite":
        spill.close()


def test_a_spilling_checker_keeps_where_held_allocations_changed_and_no_more():
    h = resized()
    h.full_resize(M)
    h.confirm(M)
    h.inst("b", ev.Deleted, U)
    c = _Checker(spill=MemorySpill(), keep=0, forget_released=True)
    for env in merge_logs(h.logs):
        c.feed(env)
    held = {(host, key) for host, ledger in c.p.ledgers.items()
            for key in ledger.allocations}
    assert set(c.changed) == held
    keeps_all = _Checker()
    for env in merge_logs(h.logs):
        keeps_all.feed(env)
    assert len(keeps_all.changed) > len(held)
