"""The pure folds, row by row of the protocol table (DESIGN §2), and their properties.

Each test: given a history built by hand (tests/strategies.History), when it is folded,
then the ledger holds exactly these keys and the instance and migration these fields.
"""
from __future__ import annotations

import gc

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies as s
from strategies import MEDIUM, SMALL, TINY, History
from vmresize.actors.host import HostPolicy
from vmresize.actors.shell import HostEventLog, HostShell
from vmresize.drivers.fake import FakeDriver
from vmresize.events import schema as ev
from vmresize.events.codec import decode_host, encode
from vmresize.events.log import MemoryLog
from vmresize.events.schema import RUNNING, SHUTDOWN, Envelope
from vmresize.projections import (Ledger, evolve_instance, evolve_ledger,
                                  evolve_migration, fold, server_status)
from vmresize.projections.fold import Projection, apply

U, M = "u", "m"


def allocs(p: Projection, host: str) -> dict:
    return p.ledgers[host].allocations


def booted(host="a", flavor=TINY, stopped=False) -> History:
    h = History()
    h.boot(host, U, flavor, stopped=stopped)
    return h


def resizing(old=TINY, new=SMALL, source="a", dest="b", stopped=False) -> History:
    h = booted(source, old, stopped)
    h.resize(M, U, source, dest, old, new, "stopped" if stopped else "active")
    return h


# --------------------------------------------------------------------------- evolve_* units

def test_evolve_ledger_spawn_started_holds_the_instance():
    env = Envelope("a", 1, 1.0, ev.SpawnStarted(instance_uuid=U, instance_version=1,
                                                name="vm", flavor=TINY,
                                                resources=TINY.resources()))
    ledger = evolve_ledger(Ledger(host="a"), env)
    assert ledger.allocations == {"i:u": TINY.resources()}
    assert ledger.used == TINY.resources()


def test_evolve_ledger_migration_started_moves_the_source_allocation():
    h = resizing()
    given = Ledger(host="a", allocations={"i:u": TINY.resources()}, used=TINY.resources())
    env = Envelope("a", 3, 1.0, ev.MigrationStarted(instance_uuid=U, instance_version=4,
                                                    migration_id=M, spec=h.spec(M)))
    then = evolve_ledger(given, env)
    assert then.allocations == {"m:m:old": TINY.resources()}
    assert then.used == given.used
    assert given.allocations == {"i:u": TINY.resources()}     # not mutated


def test_evolve_ledger_ignores_events_without_allocations():
    given = Ledger(host="a", allocations={"i:u": TINY.resources()}, used=TINY.resources())
    env = Envelope("a", 3, 1.0, ev.DiskMigrated(instance_uuid=U, instance_version=5,
                                                migration_id=M, shared_storage=False))
    assert evolve_ledger(given, env) is given


def test_evolve_migration_claimed_creates_pre_migrating():
    h = resizing()
    env = h.claim(M)
    mig = evolve_migration(None, env)
    assert (mig.status, mig.source_compute, mig.dest_compute) == ("pre-migrating", "a", "b")
    assert mig.old_flavor == TINY and mig.new_flavor == SMALL
    assert mig.migration_type == "resize"
    assert mig.created_at == env.wall_time
    assert not mig.final


def test_evolve_migration_ignores_unknown_migration():
    env = Envelope("a", 0, 1.0, ev.Finished(instance_uuid=U, instance_version=7,
                                            migration_id="nope"))
    assert evolve_migration(None, env) is None


def test_evolve_instance_unknown_instance_stays_unknown():
    env = Envelope("b", 0, 1.0, ev.Spawned(instance_uuid=U, instance_version=2))
    assert evolve_instance(None, env) is None


# --------------------------------------------------------------------------- rows of §2

def test_boot_row():
    p = fold(booted().merged())
    inst = p.instances[U]
    assert (inst.host, inst.flavor, inst.version) == ("a", TINY, 2)
    assert (inst.vm_state, inst.task_state, inst.power_state) == ("active", None, RUNNING)
    assert server_status(inst) == inst.status == "ACTIVE"
    assert allocs(p, "a") == {"i:u": TINY.resources()}
    assert allocs(p, "b") == {}


def test_boot_stopped_row():
    inst = fold(booted(stopped=True).merged()).instances[U]
    assert (inst.vm_state, inst.power_state, inst.status) == ("stopped", SHUTDOWN, "SHUTOFF")


def test_spawn_started_is_building_until_its_outcome():
    h = History()
    h.inst("a", ev.SpawnStarted, U, name="vm", flavor=TINY, resources=TINY.resources())
    inst = fold(h.merged()).instances[U]
    assert (inst.vm_state, inst.task_state, inst.status) == ("building", "spawning", "BUILD")


def test_spawn_failed_releases_the_instance():
    h = History()
    h.inst("a", ev.SpawnStarted, U, name="vm", flavor=TINY, resources=TINY.resources())
    h.inst("a", ev.SpawnFailed, U, reason="boom")
    p = fold(h.merged())
    assert p.instances[U].vm_state == "error" and p.instances[U].status == "ERROR"
    assert allocs(p, "a") == {}


def test_row1_claim_holds_the_new_flavor_on_the_destination():
    h = resizing()
    h.claim(M)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "pre-migrating"
    assert (inst.vm_state, inst.task_state, inst.status) == ("active", "resize_prep", "RESIZE")
    assert (inst.host, inst.version, inst.migration_id) == ("a", 3, M)
    assert allocs(p, "a") == {"i:u": TINY.resources()}
    assert allocs(p, "b") == {"m:m:new": SMALL.resources()}


def test_row1_claim_rejected_holds_nothing_and_bumps_no_version():
    h = resizing()
    h.reject(M)
    p = fold(h.merged())
    assert M not in p.migrations
    assert p.instances[U].version == 2 and p.instances[U].task_state is None
    assert allocs(p, "b") == {}


def test_row2_migration_started_moves_the_source_allocation_to_the_migration():
    h = resizing()
    h.claim(M)
    h.start(M)
    p = fold(h.merged())
    assert p.migrations[M].status == "migrating"
    assert p.instances[U].task_state == "resize_migrating"
    assert allocs(p, "a") == {"m:m:old": TINY.resources()}
    assert allocs(p, "b") == {"m:m:new": SMALL.resources()}


def test_row3_disk_migrated_moves_the_instance_and_powers_it_off():
    h = resizing()
    h.claim(M)
    h.start(M)
    h.disks(M, shared=False)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "post-migrating"
    assert (mig.disk_migrated, mig.resize_dir, mig.dest_copy) == (True, True, True)
    assert (inst.host, inst.power_state, inst.task_state) == ("b", SHUTDOWN, "resize_migrated")
    assert inst.flavor == TINY and inst.status == "RESIZE"
    assert allocs(p, "a") == {"m:m:old": TINY.resources()}
    assert allocs(p, "b") == {"m:m:new": SMALL.resources()}


def test_row3_shared_storage_has_no_destination_copy():
    h = resizing()
    h.claim(M)
    h.start(M)
    h.disks(M, shared=True)
    mig = fold(h.merged()).migrations[M]
    assert (mig.shared_storage, mig.dest_copy, mig.resize_dir) == (True, False, True)


@pytest.mark.parametrize("stopped", [False, True])
def test_row4_finish_makes_the_instance_resized_on_the_destination(stopped):
    h = resizing(stopped=stopped)
    h.full_resize(M)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "finished"
    assert (inst.vm_state, inst.task_state, inst.status) == ("resized", None, "VERIFY_RESIZE")
    assert (inst.host, inst.flavor, inst.resources) == ("b", SMALL, SMALL.resources())
    assert inst.power_state == (SHUTDOWN if stopped else RUNNING)
    assert inst.version == 7
    assert allocs(p, "a") == {"m:m:old": TINY.resources()}
    assert allocs(p, "b") == {"i:u": SMALL.resources()}


def test_row4_finish_started_is_still_a_resize():
    h = resizing()
    h.claim(M)
    h.start(M)
    h.disks(M)
    h.mig("b", ev.FinishStarted, M)
    p = fold(h.merged())
    assert p.instances[U].task_state == "resize_finish"
    assert p.instances[U].status == "RESIZE"
    assert p.migrations[M].status == "post-migrating"


@pytest.mark.parametrize("stopped", [False, True])
def test_row5_confirm_releases_the_source(stopped):
    h = resizing(stopped=stopped)
    h.full_resize(M)
    h.mig("a", ev.ConfirmStarted, M)
    assert fold(h.merged()).migrations[M].status == "confirming"
    h.mig("a", ev.Confirmed, M)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "confirmed" and mig.final
    assert (mig.resize_dir, mig.dest_copy) == (False, False)
    assert inst.vm_state == ("stopped" if stopped else "active")
    assert inst.status == ("SHUTOFF" if stopped else "ACTIVE")
    assert (inst.host, inst.flavor, inst.migration_id, inst.version) == ("b", SMALL, "", 9)
    assert allocs(p, "a") == {}
    assert allocs(p, "b") == {"i:u": SMALL.resources()}


def test_row6_revert_releases_the_destination():
    h = resizing()
    h.full_resize(M)
    h.mig("b", ev.RevertStarted, M)
    p = fold(h.merged())
    assert p.instances[U].task_state == "resize_reverting"
    assert p.instances[U].status == "REVERT_RESIZE"
    assert p.migrations[M].status == "reverting"
    h.mig("b", ev.DestReverted, M)
    p = fold(h.merged())
    assert p.migrations[M].dest_reverted and not p.migrations[M].dest_copy
    assert allocs(p, "b") == {}
    assert allocs(p, "a") == {"m:m:old": TINY.resources()}


@pytest.mark.parametrize("stopped", [False, True])
def test_row7_finish_revert_gives_the_source_its_allocation_back(stopped):
    h = resizing(stopped=stopped)
    h.full_resize(M)
    h.revert_dest(M)
    h.finish_revert(M)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "reverted" and mig.final and not mig.resize_dir
    assert (inst.host, inst.flavor, inst.resources) == ("a", TINY, TINY.resources())
    assert inst.vm_state == ("stopped" if stopped else "active")
    assert inst.power_state == (SHUTDOWN if stopped else RUNNING)
    assert (inst.task_state, inst.migration_id, inst.version) == (None, "", 11)
    assert allocs(p, "a") == {"i:u": TINY.resources()}
    assert allocs(p, "b") == {}


def test_cold_migration_keeps_the_flavor():
    h = resizing(old=SMALL, new=SMALL)
    h.full_resize(M)
    h.confirm(M)
    p = fold(h.merged())
    assert p.migrations[M].migration_type == "migration"
    assert (p.instances[U].host, p.instances[U].flavor) == ("b", SMALL)


# --------------------------------------------------------------------------- failure rows

def test_disk_shrink_refused_on_the_source_then_dest_released():
    h = resizing(old=SMALL, new=TINY)
    h.claim(M)
    h.fail(M, "resize_instance", rolled_back=True)
    p = fold(h.merged())
    mig, inst = p.migrations[M], p.instances[U]
    assert mig.status == "error" and mig.source_settled and not mig.dest_settled
    assert not mig.final
    assert (inst.host, inst.flavor, inst.vm_state, inst.task_state) == ("a", SMALL, "active",
                                                                         None)
    assert allocs(p, "a") == {"i:u": SMALL.resources()}
    assert allocs(p, "b") == {"m:m:new": TINY.resources()}
    h.release(M, "dest")
    p = fold(h.merged())
    assert p.migrations[M].final
    assert allocs(p, "b") == {}


@pytest.mark.parametrize("rolled_back,vm_state", [(True, "active"), (False, "error")])
def test_migrate_failed_puts_the_allocation_back_on_the_source(rolled_back, vm_state):
    h = resizing()
    h.claim(M)
    h.start(M)
    h.fail(M, "migrate", rolled_back=rolled_back)
    h.release(M, "dest")
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.status == "error" and mig.final and mig.failed_step == "migrate"
    assert (inst.host, inst.flavor, inst.vm_state, inst.task_state) == ("a", TINY, vm_state,
                                                                         None)
    assert server_status(inst) == ("ACTIVE" if rolled_back else "ERROR")
    assert allocs(p, "a") == {"i:u": TINY.resources()}
    assert allocs(p, "b") == {}


def test_finish_failed_then_source_restored():
    h = resizing()
    h.claim(M)
    h.start(M)
    h.disks(M)
    h.mig("b", ev.FinishStarted, M)
    h.fail(M, "finish", rolled_back=True)
    p = fold(h.merged())
    assert p.instances[U].task_state == "resize_reverting"
    assert p.migrations[M].dest_settled and not p.migrations[M].dest_copy
    assert allocs(p, "b") == {}
    assert allocs(p, "a") == {"m:m:old": TINY.resources()}
    h.restore(M)
    p = fold(h.merged())
    inst, mig = p.instances[U], p.migrations[M]
    assert mig.final and not mig.resize_dir
    assert (inst.host, inst.flavor, inst.vm_state, inst.task_state, inst.power_state) == (
        "a", TINY, "active", None, RUNNING)
    assert allocs(p, "a") == {"i:u": TINY.resources()}


def test_prep_failed_releases_the_claim():
    h = resizing()
    h.claim(M)
    h.fail(M, "prep")
    p = fold(h.merged())
    assert allocs(p, "b") == {}
    assert p.migrations[M].dest_settled


def test_confirm_failed_leaves_the_instance_in_error_and_releases_the_source():
    h = resizing()
    h.full_resize(M)
    h.mig("a", ev.ConfirmStarted, M)
    h.fail(M, "confirm", rolled_back=False)
    p = fold(h.merged())
    inst = p.instances[U]
    assert (inst.vm_state, inst.status, inst.host) == ("error", "ERROR", "b")
    assert allocs(p, "a") == {}
    assert allocs(p, "b") == {"i:u": SMALL.resources()}


def test_release_of_the_source_role():
    h = resizing()
    h.claim(M)
    h.start(M)
    h.release(M, "source")
    p = fold(h.merged())
    assert allocs(p, "a") == {}
    assert p.migrations[M].source_settled


# --------------------------------------------------------------------------- same host

def test_same_host_resize_holds_old_and_new_together():
    h = resizing(old=TINY, new=SMALL, source="a", dest="a")
    h.claim(M)
    p = fold(h.merged())
    assert allocs(p, "a") == {"i:u": TINY.resources(), "m:m:new": SMALL.resources()}
    assert p.ledgers["a"].used == TINY.resources() + SMALL.resources()
    h.start(M)
    h.disks(M, shared=True)
    assert allocs(fold(h.merged()), "a") == {"m:m:old": TINY.resources(),
                                             "m:m:new": SMALL.resources()}
    h.finish(M)
    p = fold(h.merged())
    assert allocs(p, "a") == {"m:m:old": TINY.resources(), "i:u": SMALL.resources()}
    assert p.instances[U].host == "a"
    h.confirm(M)
    p = fold(h.merged())
    assert allocs(p, "a") == {"i:u": SMALL.resources()}


def test_same_host_revert():
    h = resizing(old=TINY, new=SMALL, source="a", dest="a")
    h.full_resize(M, shared=True)
    h.revert_dest(M)
    assert allocs(fold(h.merged()), "a") == {"m:m:old": TINY.resources()}
    h.finish_revert(M)
    p = fold(h.merged())
    assert allocs(p, "a") == {"i:u": TINY.resources()}
    assert (p.instances[U].flavor, p.instances[U].host) == (TINY, "a")


def test_host_configured_sets_capacity_and_limit():
    h = History(limit=ev.Resources(8, 16384, 400))
    ledger = fold(h.merged()).ledgers["a"]
    assert (ledger.capacity, ledger.limit, ledger.driver) == (
        ev.Resources(8, 16384, 400), ev.Resources(8, 16384, 400), "FakeDriver")


def test_two_instances_on_two_hosts_fold_independently():
    h = History()
    h.boot("a", "u1", TINY)
    h.boot("b", "u2", MEDIUM)
    h.resize("m1", "u1", "a", "b", TINY, SMALL)
    h.full_resize("m1")
    h.confirm("m1")
    p = fold(h.merged())
    assert allocs(p, "a") == {}
    assert allocs(p, "b") == {"i:u1": SMALL.resources(), "i:u2": MEDIUM.resources()}
    assert p.ledgers["b"].used == SMALL.resources() + MEDIUM.resources()


# --------------------------------------------------------------------------- properties

PROPS = settings(max_examples=30, deadline=None)


def _dump(p: Projection) -> bytes:
    return msgspec.msgpack.encode(p)


@PROPS
@given(history=s.merged_histories(), data=st.data())
def test_fold_of_a_concatenation_is_fold_of_the_fold(history, data):
    cut = data.draw(st.integers(0, len(history)))
    a, b = history[:cut], history[cut:]
    assert fold(a + b) == fold(b, fold(a))


@PROPS
@given(h=s.hand_histories(), data=st.data())
def test_fold_split_on_hand_histories(h, data):
    history = h.merged()
    cut = data.draw(st.integers(0, len(history)))
    assert fold(history) == fold(history[cut:], fold(history[:cut]))


@PROPS
@given(history=s.merged_histories(), data=st.data())
def test_folding_does_not_mutate_the_projection_it_is_given(history, data):
    cut = data.draw(st.integers(0, len(history)))
    first = fold(history[:cut])
    before = _dump(first)
    fold(history[cut:], first)
    assert _dump(first) == before


@PROPS
@given(history=s.merged_histories(), data=st.data())
def test_applying_one_by_one_keeps_the_views_equal_to_the_fold(history, data):
    """`apply` keeps a projection's frozen views in step with the records behind them,
    also across a snapshot (a decoded projection has views only)."""
    cut = data.draw(st.integers(0, len(history)))
    p = Projection()
    for env in history[:cut]:
        apply(p, env)
    assert p == fold(history[:cut])
    p = msgspec.msgpack.decode(_dump(p), type=Projection)
    for env in history[cut:]:
        apply(p, env)
    assert p == fold(history)
    assert _dump(p) == _dump(fold(history))


def _raw_log(envs) -> MemoryLog:
    raw = MemoryLog()
    raw.append(envs, lambda _offset, env: encode(env))
    return raw


def _shell(raw, host: str, snapshot_dir=None) -> HostShell:
    policy = HostPolicy(name=host, limit=s.BIG)
    return HostShell(policy, HostEventLog(raw, host, lambda: 0.0),
                     FakeDriver(host, s.BIG), capacity=s.BIG, snapshot_dir=snapshot_dir)


@settings(max_examples=20, deadline=None)
@given(logs=s.protocol_histories(), data=st.data())
def test_replay_from_a_snapshot_equals_replay_from_zero(tmp_path_factory, logs, data):
    host = data.draw(st.sampled_from(sorted(logs)))
    envs = list(logs[host])
    cut = data.draw(st.integers(0, len(envs)))
    snapshot_dir = tmp_path_factory.mktemp("snap")
    # Given a shell that replayed a prefix and saved a snapshot
    raw = _raw_log(envs[:cut])
    first = _shell(raw, host, snapshot_dir)
    assert first.replay() == cut
    first.save_snapshot()
    # When the rest of the log is appended and a new shell replays snapshot + tail
    raw.append(envs[cut:], lambda _offset, env: encode(env))
    from_snapshot = _shell(raw, host, snapshot_dir)
    assert from_snapshot.replay() == len(envs) - cut
    from_zero = _shell(raw, host)
    assert from_zero.replay() == len(envs)
    # Then both see the same state, commands and open intents
    assert _dump(from_snapshot.state) == _dump(from_zero.state)
    assert from_snapshot.commands == from_zero.commands
    assert from_snapshot.open_intents == from_zero.open_intents


def test_decoded_events_and_folded_state_stay_out_of_the_cycle_collector():
    """They cannot form cycles; tracked, the hundreds of thousands a long replay keeps
    alive made it spend most of its time in the cycle collector."""
    h = resizing()
    h.full_resize(M)
    h.confirm(M)
    envs = [decode_host(encode(env)) for env in h.merged()]
    assert not any(gc.is_tracked(env) or gc.is_tracked(env.event) for env in envs)
    p = fold(envs)
    values = [*p.instances.values(), *p.migrations.values(), *p.ledgers.values()]
    assert len(values) == 4
    assert not any(gc.is_tracked(v) for v in values)
