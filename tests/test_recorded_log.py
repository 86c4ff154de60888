"""A recorded state directory of schema version 1 replays: audit, events and views.

`events/fixtures/v1/` was written once by the simulator (default cluster.yaml,
`SimConfig(seed=12, hosts=3, instances=6, operations=40, driver_fail_p=0.05,
crash_p=0.01)`, host crashes and recoveries included) and is never regenerated: it is
what a released version wrote. Every later schema version must keep replaying it
unchanged (msgspec's evolution rules: new fields last with defaults, no type changes,
no reused tags). When the schema version is bumped, record `events/fixtures/v<N>/` the
same way and add it to VERSIONS below; never edit or delete an older fixture.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import msgspec
import pytest

from vmresize.events import schema as ev
from vmresize.events.codec import to_builtins, to_json
from vmresize.events.store import host_names, open_host_logs, read_controller_log
from vmresize.offline import audit
from vmresize.projections import fold, merge_logs, server_status

FIXTURES = Path(__file__).resolve().parent.parent / "events" / "fixtures"

# version -> (host records, controller records, instances, migrations) as recorded.
VERSIONS = {1: (102, 77, 6, 18)}

# Event types the recorded v1 history holds (PoweredOff/On and Deleted are in the
# schema but nothing emits them yet).
V1_TYPES = {"HostConfigured", "SpawnStarted", "Spawned", "SpawnFailed", "Claimed",
            "ClaimRejected", "ClaimReleased", "MigrationStarted", "DiskMigrated",
            "FinishStarted", "Finished", "ConfirmStarted", "Confirmed", "RevertStarted",
            "DestReverted", "RevertFinishStarted", "Reverted", "Failed", "SourceRestored"}


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _host_envelopes(state_dir) -> dict[str, list]:
    readers = open_host_logs(state_dir)
    try:
        return {h: list(r.envelopes()) for h, r in readers.items()}
    finally:
        for r in readers.values():
            r.close()


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_recorded_state_dir_audits_clean(version):
    state_dir = FIXTURES / f"v{version}"
    host_records, _, instances, migrations = VERSIONS[version]
    before = _listing(state_dir)
    report = audit(state_dir)
    assert report.ok, report.violations
    assert report.violations == []
    assert report.events == host_records
    assert report.hosts == 3
    assert report.instances == instances
    assert report.migrations == migrations
    assert report.open_migrations == 0
    assert report.torn_tails == []
    # read-only: not even a lock file appears
    assert _listing(state_dir) == before


def test_v1_holds_every_emitted_event_type():
    logs = _host_envelopes(FIXTURES / "v1")
    types = {type(env.event).__name__ for envs in logs.values() for env in envs}
    assert types == V1_TYPES


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_recorded_events_stream_as_json_lines(version):
    """What `vmresize events --json` prints: one envelope per line, with its type tag."""
    state_dir = FIXTURES / f"v{version}"
    logs = _host_envelopes(state_dir)
    assert sorted(logs) == host_names(state_dir) == ["sim-1", "sim-2", "sim-3"]
    lines = 0
    for host, envs in logs.items():
        assert [e.offset for e in envs] == list(range(len(envs)))
        for env in envs:
            doc = msgspec.json.decode(to_json(to_builtins(env)))
            assert doc[0] == host and doc[1] == env.offset
            assert doc[3]["type"] == type(env.event).__name__
            lines += 1
    assert lines == VERSIONS[version][0]
    controller = list(read_controller_log(state_dir))
    assert len(controller) == VERSIONS[version][1]
    assert [e.offset for e in controller] == list(range(len(controller)))


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_recorded_views_are_consistent(version):
    """What `vmresize list` shows, rebuilt from the logs alone."""
    logs = _host_envelopes(FIXTURES / f"v{version}")
    p = fold(merge_logs(logs))
    assert len(p.instances) == VERSIONS[version][2]
    statuses = collections.Counter(m.status for m in p.migrations.values())
    assert set(statuses) <= {"confirmed", "reverted", "error"}
    assert all(m.final for m in p.migrations.values())
    for inst in p.instances.values():
        assert server_status(inst) in {"ACTIVE", "SHUTOFF", "ERROR"}
        assert inst.task_state is None
    for host, ledger in p.ledgers.items():
        assert ledger.used.fits_in(ledger.limit), host
        assert all(k.startswith("i:") for k in ledger.allocations), host


def test_recorded_as_of_a_record_replays_what_it_depends_on():
    report = audit(FIXTURES / "v1", as_of="sim-3:29")
    assert report.records == {"sim-1": 39, "sim-2": 22, "sim-3": 30}
    assert report.ok and report.events == 91


def test_fixture_is_small():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 300 * 1024
    stray = [p.name for p in FIXTURES.rglob("*") if p.is_file()
             and not p.name.endswith(".seg") and "lock" not in p.name
             and "meta" not in p.name]
    assert stray == [], "a state dir holds only segments, locks and meta files"
    assert os.access(FIXTURES / "v1", os.R_OK)


def test_recorded_history_covers_failures_and_recoveries():
    logs = _host_envelopes(FIXTURES / "v1")
    events = [env.event for envs in logs.values() for env in envs]
    failed_steps = {e.step for e in events if isinstance(e, ev.Failed)}
    assert failed_steps     # at least one failure with its compensation
    assert any(isinstance(e, ev.SourceRestored) for e in events)
    assert any(isinstance(e, ev.ClaimReleased) for e in events)
