"""The states the projections build and the auditor judges (projections/state.py):
frozen views, what a new migration starts with, when a migration has ended, Nova's
server status. States also cross process boundaries (Ray, snapshots): every rule must
hold for a decoded copy, whose strings are equal but not the same objects."""
from __future__ import annotations

import itertools

import msgspec
import pytest

from strategies import SMALL, TINY, History
from vmresize.events import schema as ev
from vmresize.projections import check, fold
from vmresize.projections.state import Instance, Ledger, Migration, server_status

STATUSES = ["pre-migrating", "migrating", "post-migrating", "finished", "confirming",
            "confirmed", "reverting", "reverted", "error", "failed"]


def decoded(value):
    """`value` after a trip through msgpack, as a snapshot or an actor call returns it."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type(value))


def migration(status: str, **flags) -> Migration:
    return Migration(id="m", instance_uuid="u", source_compute="a", dest_compute="b",
                     status=status, migration_type="resize", old_flavor=TINY,
                     new_flavor=SMALL, created_at=1.0, updated_at=2.0, **flags)


def instance(vm_state: str, task_state: str | None = None, deleted: bool = False):
    return Instance(uuid="u", name="vm", host="a", flavor=TINY, vm_state=vm_state,
                    task_state=task_state, power_state=ev.RUNNING, version=1,
                    deleted=deleted)


@pytest.mark.parametrize("view", [instance("active"), migration("finished"),
                                  Ledger(host="a")])
def test_views_are_frozen(view):
    field = msgspec.structs.fields(view)[0].name
    with pytest.raises(AttributeError):
        setattr(view, field, getattr(view, field))


def test_a_claimed_migration_starts_with_nothing_done():
    h = History()
    h.boot("a", "u", TINY)
    h.resize("m", "u", "a", "b", TINY, SMALL)
    claimed = h.claim("m")
    m = fold(h.merged()).migrations["m"]
    assert (m.status, m.version) == ("pre-migrating", claimed.event.instance_version)
    done = {f: getattr(m, f) for f in ("shared_storage", "disk_migrated", "resize_dir",
                                       "dest_copy", "source_started", "source_settled",
                                       "dest_settled", "dest_reverted")}
    assert done == dict.fromkeys(done, False)
    assert (m.failed_step, m.reason, m.final) == ("", "", False)


def test_a_claim_released_before_the_source_acted_has_ended():
    # the controller gave the migration up before the source heard of it
    h = History()
    h.boot("a", "u", TINY)
    h.resize("m", "u", "a", "b", TINY, SMALL)
    h.claim("m")
    h.release("m", "dest")
    assert fold(h.merged()).migrations["m"].final
    report = check(h.logs)
    assert report.ok and report.open_migrations == 0, report.violations


@pytest.mark.parametrize("status", STATUSES)
def test_a_migration_has_ended_when_confirmed_reverted_or_failed_with_both_ends_settled(
        status):
    for dest_settled, source_settled, source_started in itertools.product((0, 1), repeat=3):
        m = migration(status, dest_settled=bool(dest_settled),
                      source_settled=bool(source_settled), source_started=bool(source_started))
        settled = dest_settled and (source_settled or not source_started)
        expected = status in ("confirmed", "reverted") or (status == "error" and settled)
        assert m.final == expected, (status, dest_settled, source_settled, source_started)
        assert decoded(m).final == expected


@pytest.mark.parametrize("vm_state, task_state, deleted, status", [
    ("active", None, True, "DELETED"),
    ("error", "resize_reverting", False, "ERROR"),
    ("resized", "resize_reverting", False, "REVERT_RESIZE"),
    ("active", "resize_prep", False, "RESIZE"),
    ("stopped", "resize_migrating", False, "RESIZE"),
    ("active", "resize_migrated", False, "RESIZE"),
    ("active", "resize_finish", False, "RESIZE"),
    ("active", None, False, "ACTIVE"),
    ("stopped", None, False, "SHUTOFF"),
    ("resized", None, False, "VERIFY_RESIZE"),
    ("building", "spawning", False, "BUILD"),
    ("active", "rebooting", False, "REBOOT"),
    ("active", "rebooting_hard", False, "HARD_REBOOT"),
    ("error", "rebooting", False, "ERROR"),
    ("active", "powering-off", False, "ACTIVE"),
    ("deleted", None, False, "DELETED"),
    ("paused", None, False, "PAUSED"),
])
def test_nova_server_status(vm_state, task_state, deleted, status):
    inst = instance(vm_state, task_state, deleted)
    assert server_status(inst) == status == inst.status
    assert server_status(decoded(inst)) == status


def test_an_instance_being_built_or_that_failed_to_spawn_has_no_power_state():
    h = History()
    started = h.inst("a", ev.SpawnStarted, "u", name="vm", flavor=TINY,
                     resources=TINY.resources())
    building = fold([started]).instances["u"]
    assert (building.power_state, building.status) == (0, "BUILD")    # Nova's NOSTATE
    failed = h.inst("a", ev.SpawnFailed, "u", reason="no image")
    assert fold([started, failed]).instances["u"].power_state == 0


def test_a_migration_first_seen_on_its_source_was_claimed_already():
    # the source's own log starts a migration at MigrationStarted: the destination's
    # claim, probe included, came before it
    h = History()
    h.boot("a", "u", TINY)
    h.resize("m", "u", "a", "b", TINY, SMALL)
    h.claim("m")
    started = h.start("m")
    m = fold([started]).migrations["m"]
    assert (m.status, m.claim_ready, m.source_started) == ("migrating", True, True)
