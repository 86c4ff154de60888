"""The deterministic simulator: a seed sweep with every fault kind must find nothing
wrong, must hit every crash window of every step and the compensation paths, the same
seed must give the same history, and a broken rule must be caught.

Every failure names its seed and the command line that reproduces it; every sweep checks
every seed it was asked to (a simulation that raises is a violation, never a skip).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import msgspec
import pytest

from vmresize.config import load
from vmresize.actors.host import Effect
from vmresize.actors.shell import HostShell
from vmresize.protocol import commands as c
from vmresize.sim.simulator import (CELLS, FAULT_KINDS, SimConfig, SimResult, Simulator,
                                    reproduce)
from vmresize.events import schema as ev

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = load(ROOT / "cluster.yaml")
SWEEP = dict(hosts=4, instances=12, operations=60)
SEEDS = 200
STUCK_P = 0.3       # hosts with a cleanup driver call that keeps failing: abandoned cleanups
STORAGE_FAULTS = ("power_loss", "torn_write", "disk_full", "io_error", "corrupt_snapshot")

HEAVY = dict(crash_p=0.02, driver_fail_p=0.05, driver_hang_p=0.01, driver_crash_p=0.01,
             controller_crash_p=0.003, drop_p=0.05, duplicate_p=0.05)


def command(seed: int, hosts: int, instances: int, operations: int, **extra) -> str:
    return reproduce(SimConfig(seed=seed, hosts=hosts, instances=instances,
                               operations=operations, **{"stuck_p": STUCK_P, **extra}))


def simulate(seed: int, tmp: str | Path, cluster=CLUSTER, shell_class=HostShell,
             **options) -> tuple[Simulator, SimResult]:
    sizes = {**SWEEP, **{k: options.pop(k) for k in list(options) if k in SWEEP}}
    options.setdefault("stuck_p", STUCK_P)
    sim = Simulator(cluster, SimConfig(seed=seed, **sizes, **options),
                    Path(tmp) / "state", shell_class=shell_class)
    result = sim.run()      # never raises: whatever goes wrong is a violation
    print(f"seed {seed}: {result.command}")
    return sim, result


def _explain(seed: int, result: SimResult) -> str:
    return (f"seed {seed}: {result.violations} violation(s)\n  "
            + "\n  ".join(result.violation_list[:10]) + f"\nreproduce: {result.command}")


# The main sweep's results, kept for the coverage test (which runs any seed missing,
# so that it holds on its own too).
_SWEEP_RESULTS: dict[int, SimResult] = {}


def _sweep_result(seed: int, tmp: Path) -> SimResult:
    if seed not in _SWEEP_RESULTS:
        _SWEEP_RESULTS[seed] = simulate(seed, tmp / f"sweep-{seed}")[1]
    return _SWEEP_RESULTS[seed]


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(SEEDS)])
def test_seed_sweep_with_every_fault_finds_nothing(seed, tmp_path):
    result = _sweep_result(seed, tmp_path)
    assert result.violations == 0, _explain(seed, result)
    assert result.operations == SWEEP["operations"]
    assert result.events > 0


def test_the_sweep_hits_every_crash_window_and_every_recovery_path(tmp_path):
    results = {seed: _sweep_result(seed, tmp_path) for seed in range(SEEDS)}
    assert sorted(results) == list(range(SEEDS))        # every seed requested, checked
    windows = {cell: sum(r.windows.get(cell, 0) for r in results.values())
               for cell in CELLS}
    missed = [cell for cell, n in windows.items() if n == 0]
    assert not missed, f"crash windows never hit in {SEEDS} seeds: {missed}"
    reached = {k: sum(r.reached.get(k, 0) for r in results.values())
               for k in results[0].reached}
    for path in ("compensation", "abandoned", "released_dest", "released_source", "restored",
                 "snapshots_rebuilt", "disk_full_refusals", "own_recoveries"):
        assert reached[path] > 0, f"{path} never reached in {SEEDS} seeds: {reached}"
    faults = {k: sum(r.faults.get(k, 0) for r in results.values()) for k in FAULT_KINDS}
    assert all(n > 0 for n in faults.values()), faults


def test_a_restarted_host_recovers_with_no_resend(tmp_path):
    """No resend reaches a restarted host's open intents: each host closes them itself."""
    seeds = range(500, 540)
    results = {s: simulate(s, tmp_path / str(s), resend=False)[1] for s in seeds}
    assert sorted(results) == list(seeds)
    bad = {s: r for s, r in results.items() if r.violations}
    assert not bad, "\n".join(_explain(s, r) for s, r in bad.items())
    assert sum(r.reached["own_recoveries"] for r in results.values()) > 0
    assert all("--no-resend" in r.command for r in results.values())


def test_the_sweep_injects_every_fault_kind(tmp_path):
    seen = {k: 0 for k in FAULT_KINDS}
    driver_faults = 0
    for seed in range(10):
        sim, result = simulate(seed, tmp_path / str(seed), **HEAVY)
        for kind, n in result.faults.items():
            seen[kind] += n
        driver_faults += sum(sum(h.driver.injected.values()) for h in sim.hosts.values())
    assert all(seen[k] > 0 for k in FAULT_KINDS), seen
    assert driver_faults > 0


def test_result_counts_driver_faults(tmp_path):
    sim, result = simulate(1, tmp_path, **HEAVY)
    injected = {}
    for host in sim.hosts.values():
        for action, n in host.driver.injected.items():
            injected[action] = injected.get(action, 0) + n
    assert injected.get("fail", 0) + injected.get("hang", 0) > 0
    assert result.faults["driver"] == injected.get("fail", 0) + injected.get("hang", 0)
    assert set(CELLS) == set(result.windows)
    assert sum(result.windows.values()) <= result.crashes


def test_result_shape(tmp_path):
    _, result = simulate(1, tmp_path)
    assert isinstance(result.digest, str) and len(result.digest) == 32
    assert set(result.faults) == set(FAULT_KINDS)
    assert result.crashes >= 0 and result.events > 0
    # its logs are real logs that `vmresize audit` reads
    from vmresize.offline import audit
    report = audit(tmp_path / "state")
    assert report.ok and report.events == result.events
    assert sorted(p.name for p in (tmp_path / "state" / "hosts").iterdir()) == [
        "sim-1", "sim-2", "sim-3", "sim-4"]


# --------------------------------------------------------------------------- determinism

def test_different_seeds_give_different_histories(tmp_path):
    digests = {simulate(seed, tmp_path / str(seed))[1].digest for seed in (1, 2, 3)}
    assert len(digests) == 3


def test_same_seed_same_digest_and_event_count(tmp_path):
    ballast = []
    for seed in (1, 4, 7):
        runs = set()
        for i in range(5):
            _, result = simulate(seed, tmp_path / f"{seed}-{i}", **HEAVY)
            runs.add((result.digest, result.events))
            ballast.append([object() for _ in range(997 * (i + 1))])   # move addresses
        assert len(runs) == 1, (f"seed {seed} gave {len(runs)} histories: {runs}\n"
                                f"reproduce: {command(seed, **SWEEP, **HEAVY)}")


def test_crash_while_a_host_first_starts(tmp_path):
    _, result = simulate(6, tmp_path)
    assert result.violations == 0


# --------------------------------------------------------------------------- no silent seeds

class _RaisesOnReboot(HostShell):
    """A broken host: a reboot raises an error no one expects."""

    async def _do_reboot(self, e):
        raise RuntimeError("reboot exploded")


def test_an_exception_in_a_simulation_is_a_violation_with_its_command(tmp_path):
    seed, result = _first_seed_with_violations(tmp_path, shell_class=_RaisesOnReboot)
    assert seed is not None, "an exception inside the simulation went unnoticed"
    assert any("RuntimeError" in v and "reboot exploded" in v
               for v in result.violation_list), result.violation_list
    assert result.command.startswith(f"vmresize simulate --seed {seed} --hosts 4 ")


def test_a_simulator_that_raises_reports_a_violation(tmp_path, monkeypatch):
    def explode(self, envs):
        raise ValueError("observer exploded")
    monkeypatch.setattr(Simulator, "observe", explode)
    _, result = simulate(3, tmp_path)
    assert result.violations >= 1
    assert "exception: the simulation raised: ValueError: observer exploded" in \
        result.violation_list[0]
    assert result.command.startswith("vmresize simulate --seed 3 ")


def test_data_the_driver_lost_is_a_violation(tmp_path, monkeypatch):
    from vmresize.drivers.fake import FakeDriver
    real = FakeDriver.finish_migration

    async def loses_data(self, instance, disks, shared_storage, power_on):
        await real(self, instance, disks, shared_storage, power_on)
        self.data_loss.append(f"{instance.uuid}: disk.qcow2 shrunk (planted)")
    monkeypatch.setattr(FakeDriver, "finish_migration", loses_data)
    _, result = simulate(1, tmp_path)
    assert any(v.startswith("data loss: ") for v in result.violation_list)


def test_a_disk_that_loses_synced_records_is_a_durability_violation(tmp_path, monkeypatch):
    """The durability oracle: a crash that takes the last synced record of a log with it
    (an fsync that lied) loses a record the controller was told of."""
    from vmresize.events.disk import SimDisk
    real = SimDisk._settle_after_crash

    def loses_synced_bytes(self, inode, keep_bytes):
        real(self, inode, keep_bytes)
        if inode.durable_size > 64:
            inode.make_durable([(inode.durable_size - 1, None)])     # cut a byte
            inode.settle()
    monkeypatch.setattr(SimDisk, "_settle_after_crash", loses_synced_bytes)
    _, result = simulate(1, tmp_path, crash_p=0.02)
    assert any(v.startswith("durability: ") and "is gone" in v
               for v in result.violation_list), _explain(1, result)


# --------------------------------------------------------------------------- broken on purpose

def _first_seed_with_violations(tmp_path, seeds=range(5), **kw):
    for seed in seeds:
        _, result = simulate(seed, tmp_path / str(seed), **kw)
        if result.violations:
            return seed, result
    return None, None


def test_a_broken_ledger_rule_is_caught(tmp_path, monkeypatch):
    # the package's `fold` attribute is the function, which hides the module
    fold_module = importlib.import_module("vmresize.projections.fold")
    real = fold_module._ledger_changes

    def forgets_dest_reverted(allocs, e):
        if type(e) is ev.DestReverted:
            return fold_module._NONE    # the destination never lets go of a reverted instance
        return real(allocs, e)

    monkeypatch.setattr(fold_module, "_ledger_changes", forgets_dest_reverted)
    seed, result = _first_seed_with_violations(tmp_path)
    assert seed is not None, "the broken rule went unnoticed for seeds 0..4"
    assert any("no-leak" in v or "ledger-matches" in v for v in result.violation_list)


def test_a_host_without_its_version_check_is_caught(tmp_path, monkeypatch):
    """A stale command (fault `stale`: an earlier command again under a new id) reaches
    a host that no longer compares versions: it runs it, and the sweep says so."""
    host_module = importlib.import_module("vmresize.actors.host")
    monkeypatch.setattr(host_module, "check_version", lambda state, cmd: None)
    seed, result = _first_seed_with_violations(tmp_path)
    assert seed is not None, "the missing version check went unnoticed for seeds 0..4"
    assert any(v.startswith("stale: ") for v in result.violation_list), result.violation_list


def test_stale_commands_are_refused_and_counted(tmp_path):
    results = [simulate(seed, tmp_path / str(seed))[1] for seed in range(3)]
    assert sum(r.faults["stale"] for r in results) > 0
    assert all(r.violations == 0 for r in results), [r.violation_list for r in results]


shell_module = importlib.import_module("vmresize.actors.shell")


class _ReleasesAsSource(HostShell):
    """A broken host: a failed migration's destination claim is 'released' under the
    source role, so the destination keeps holding it."""

    async def _run(self, cmd):
        if isinstance(cmd, c.ReleaseClaim) and cmd.role == "dest":
            cmd = msgspec.structs.replace(cmd, role="source")
        return await super()._run(cmd)


class _RevertsWithoutCleanup(HostShell):
    """A broken host: logs DestReverted without asking the driver to remove the
    destination's domain and disk copy."""

    async def _do_revert(self, e):
        return Effect()


def test_a_broken_host_shell_is_caught(tmp_path):
    seed, result = _first_seed_with_violations(tmp_path, shell_class=_ReleasesAsSource)
    assert seed is not None, "the broken shell went unnoticed for seeds 0..4"
    assert any(v.startswith("liveness") or "no-leak" in v for v in result.violation_list)


class _AnswersWithItsIntent(HostShell):
    """A broken host: answers `resize_instance` with its intent alone, as if the step
    were still under way, so the controller would plan on a source it thinks busy."""

    async def handle(self, cmd):
        reply = await super().handle(cmd)
        if isinstance(cmd, c.ResizeInstance) and len(reply.events) > 1:
            return msgspec.structs.replace(reply, events=reply.events[:1])
        return reply


def test_a_reply_that_leaves_its_step_open_is_caught(tmp_path):
    seed, result = _first_seed_with_violations(tmp_path, shell_class=_AnswersWithItsIntent)
    assert seed == 0, "a reply with the intent alone went unnoticed"
    assert any(v.startswith("reply: ") and "MigrationStarted" in v and "still open" in v
               for v in result.violation_list), result.violation_list


def test_driver_check_catches_a_shell_that_skips_its_driver_call(tmp_path):
    sim, _ = simulate(0, tmp_path, shell_class=_RevertsWithoutCleanup)
    assert any("domains: extra" in p for p in driver_mismatches(sim))


def test_simulator_catches_a_shell_that_skips_its_driver_call(tmp_path):
    seed, result = _first_seed_with_violations(tmp_path, range(6),
                                               shell_class=_RevertsWithoutCleanup)
    assert seed is not None, "logging DestReverted without the cleanup went unnoticed"


# --------------------------------------------------------------------------- drivers vs logs

def driver_mismatches(sim: Simulator) -> list[str]:
    """What the fake hypervisors hold that the logs do not say, or the reverse."""
    return sim.driver_mismatches()


def test_driver_state_check_passes_on_a_quiet_run(tmp_path):
    sim, result = simulate(2, tmp_path, faults=("drop", "duplicate", "reorder", "delay"))
    assert result.violations == 0
    assert driver_mismatches(sim) == []


def test_drivers_hold_what_the_logs_say(tmp_path):
    bad = {}
    checked = []
    for seed in range(3000, 3060):
        sim, result = simulate(seed, tmp_path / str(seed), driver_fail_p=0.05)
        checked.append(seed)
        problems = driver_mismatches(sim)
        if problems:
            bad[seed] = problems
    assert checked == list(range(3000, 3060))
    assert not bad, "\n".join(f"seed {s}: {p}\n  reproduce: "
                              f"{command(s, **SWEEP, driver_fail_p=0.05)}"
                              for s, p in sorted(bad.items()))


# --------------------------------------------------------------------------- harsher sweeps

def _sweep(tmp_path, seeds, cluster=CLUSTER, **options) -> dict[int, list[str]]:
    bad, checked = {}, []
    for seed in seeds:
        _, result = simulate(seed, tmp_path / str(seed), cluster=cluster, **options)
        checked.append(seed)
        if result.violations:
            bad[seed] = result.violation_list[:3]
    assert checked == list(seeds)
    return bad


def _report(bad: dict, **options) -> str:
    return "\n".join(f"seed {s}: {v}\n  reproduce: {command(s, **SWEEP, **options)}"
                     for s, v in sorted(bad.items()))


def test_heavy_fault_sweep_finds_nothing(tmp_path):
    bad = _sweep(tmp_path, range(1000, 1200), **HEAVY)
    assert not bad, _report(bad, **HEAVY)


# A controller keeps a window of ended requests and migrations; with tiny windows, a
# confirm or revert still open named a migration the view had forgotten (it ended under
# another request meanwhile) and the controller failed on it. An ended migration an
# open request names stays until the request ends.
TINY_WINDOWS = msgspec.structs.replace(CLUSTER, options=msgspec.structs.replace(
    CLUSTER.options, retain_requests=16, retain_migrations=8))


@pytest.mark.parametrize("seed", [45, 46, 51, 56, 58])
def test_a_controller_with_tiny_windows_still_ends_every_request(seed, tmp_path):
    _, result = simulate(seed, tmp_path, cluster=TINY_WINDOWS)
    assert result.violations == 0, _explain(seed, result)


def test_a_controller_keeps_its_last_deleted_instances_and_forgets_the_rest(tmp_path):
    """Deleted instances stay in the view for the compute API's deleted listing, the
    last `retain_deleted` of them; the run is as correct with 2."""
    cluster = msgspec.structs.replace(CLUSTER, options=msgspec.structs.replace(
        CLUSTER.options, retain_deleted=2))
    # restarts from a snapshot: replaying the controller's log names every boot
    sim, result = simulate(3, tmp_path, cluster=cluster, operations=800,
                           controller_crash_p=0.001)
    assert result.violations == 0, _explain(3, result)
    from vmresize.events.store import open_host_logs
    deletes = sum(type(env.event) is ev.Deleted
                  for log in open_host_logs(tmp_path / "state").values()
                  for env in log.envelopes())
    kept = [i for i in sim.controller.view.instances.values() if i.deleted]
    assert deletes > 2 and len(kept) <= 2, (deletes, kept)
    assert set(sim.controller.created) <= set(sim.controller.view.instances) | set(
        sim.controller.open_boots)
