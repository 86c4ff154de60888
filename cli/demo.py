"""`vmresize demo`: the main job on a fresh machine, end to end on a local Ray.

Fake hosts whose driver steps take a fraction of a second (so a crash can land in the
middle of one), four instances, then: a resize confirmed, a resize reverted, a cold
migration, a stopped instance resized (and still stopped), and a resize during which
the destination host's process is killed mid-finish and recovers from its log. The
audit runs last, offline, over the logs the demo wrote. A summary table says what
happened and how long each step took.
"""
from __future__ import annotations

import time
from pathlib import Path

from vmresize.cli.main import EXIT_FAILED, EXIT_OK, CliError, _config, instance_doc
from vmresize.config import default

STEP_LATENCY_S = 0.25


class _Steps:
    def __init__(self, console):
        self.console = console
        self.rows: list[tuple[str, str, str, float]] = []
        self.ok = True

    def run(self, what: str, fn, check=None):
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:      # noqa: BLE001 - the demo reports every failure
            self.rows.append((what, "FAILED", f"{type(exc).__name__}: {exc}",
                              time.monotonic() - start))
            self.ok = False
            self.console.print(f"[red]✗[/] {what}: {exc}")
            return None
        took = time.monotonic() - start
        result = check(value) if check else ""
        if result is False:
            self.ok = False
        self.rows.append((what, "ok" if result is not False else "UNEXPECTED",
                          _describe(value), took))
        self.console.print(f"[green]✓[/] {what} ({took:.2f} s) {_describe(value)}")
        return value


def _describe(value) -> str:
    if hasattr(value, "status") and hasattr(value, "source_compute"):
        return f"{value.status}: {value.source_compute} -> {value.dest_compute}"
    if hasattr(value, "vm_state"):
        d = instance_doc(value)
        return f"{d['status']} on {d['host']} ({d['flavor']})"
    if isinstance(value, float):
        return f"{value:.2f} s"
    if hasattr(value, "first"):
        return f"migration {value.id}: {value.first.status}"
    if hasattr(value, "violations"):
        return (f"{'ok' if value.ok else 'FAILED'}: {value.events} events, "
                f"{len(value.violations)} violations")
    return "" if value is None else str(value)[:80]


def _names(cluster) -> dict[str, str]:
    taken = {i.name for i in cluster.instances()}
    run = 1
    while f"web-{run}" in taken:
        run += 1
    return {k: f"{k}-{run}" for k in ("web", "api", "db", "batch")}


def run_demo(args, out) -> int:
    from rich.console import Console
    cfg = _config(args, required=False) or default(args.state_dir)
    if len(cfg.hosts) < 2:
        raise CliError("--config: the demo needs at least two hosts")
    console = Console(stderr=out.json)
    from vmresize.actors.api import Cluster
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]vmresize demo[/]: {len(cfg.hosts)} fake hosts, logs in "
                  f"{cfg.state_dir}")
    steps = _Steps(console)
    cluster = steps.run("start a local Ray cluster of host actors",
                        lambda: Cluster.start(cfg, latency_s=STEP_LATENCY_S))
    if cluster is None:
        return EXIT_FAILED
    try:
        _scenario(cluster, cfg, steps)
    finally:
        cluster.stop()
    report = steps.run("audit the logs offline (all six invariants)",
                       lambda: cluster.audit(), lambda r: r.ok)
    _summary(console, steps, report)
    return EXIT_OK if steps.ok and report is not None and report.ok else EXIT_FAILED


def _scenario(cluster, cfg, steps: _Steps) -> None:
    h1 = cfg.hosts[0].name
    n = _names(cluster)
    small, medium = _flavor(cfg, 1), _flavor(cfg, 2)
    for key, stopped in (("web", False), ("api", False), ("db", False), ("batch", True)):
        steps.run(f"boot {n[key]} ({small}{', stopped' if stopped else ''}) on {h1}",
                  lambda k=key, s=stopped: cluster.boot(n[k], small, h1, stopped=s))
    steps.run(f"resize {n['web']} to {medium}",
              lambda: cluster.resize(n["web"], medium).wait(60),
              lambda m: m.status == "finished")
    steps.run(f"confirm {n['web']}", lambda: cluster.confirm(n["web"]),
              lambda m: m.status == "confirmed")
    steps.run(f"resize {n['api']} to {medium}",
              lambda: cluster.resize(n["api"], medium).wait(60))
    steps.run(f"revert {n['api']}", lambda: cluster.revert(n["api"]),
              lambda m: m.status == "reverted")
    steps.run(f"{n['api']} is back on {h1} with {small}",
              lambda: cluster.instance(n["api"]),
              lambda i: i.host == h1 and i.flavor.name == small)
    steps.run(f"cold-migrate {n['db']}", lambda: cluster.migrate(n["db"]).wait(60),
              lambda m: m.migration_type == "migration")
    steps.run(f"confirm {n['db']}", lambda: cluster.confirm(n["db"]))
    steps.run(f"resize stopped {n['batch']} to {medium} and confirm",
              lambda: (cluster.resize(n["batch"], medium).wait(60),
                       cluster.confirm(n["batch"]))[1])
    steps.run(f"{n['batch']} is still stopped", lambda: cluster.instance(n["batch"]),
              lambda i: i.vm_state == "stopped" and i.power_state == 4)
    steps.run(f"start {n['batch']} with its new flavor", lambda: cluster.start(n["batch"]),
              lambda i: i.status == "ACTIVE" and i.flavor.name == medium)
    steps.run(f"stop {n['api']}", lambda: cluster.stop(n["api"]),
              lambda i: i.status == "SHUTOFF")
    steps.run(f"reboot {n['db']}", lambda: cluster.reboot(n["db"]),
              lambda i: i.status == "ACTIVE")
    steps.run(f"delete {n['api']} (nothing of it stays held)",
              lambda: cluster.delete(n["api"]), lambda i: i.deleted)
    _crash_scenario(cluster, steps, n["web"], _flavor(cfg, 3))
    steps.run("hosts after the demo", lambda: ", ".join(
        f"{h.name}: {h.vcpus_used} vcpus / {h.memory_mb_used} MB used"
        for h in cluster.hosts()))


def _flavor(cfg, rank: int) -> str:
    names = sorted(cfg.flavors, key=lambda f: (cfg.flavors[f].memory_mb, f))
    return names[min(rank, len(names) - 1)]


def _crash_scenario(cluster, steps: _Steps, name: str, flavor: str) -> None:
    """Kill the destination's process while it finishes the resize (its FinishStarted
    is logged, Finished not yet): Ray restarts it, it replays its log and finishes."""
    handle = steps.run(f"resize {name} to {flavor} (a host will crash mid-resize)",
                       lambda: cluster.resize(name, flavor))
    if handle is None:
        return
    mig = steps.run("wait until the disks moved (DiskMigrated logged)",
                    lambda: _wait_status(handle, "post-migrating"))
    if mig is None:
        return
    steps.run(f"kill the destination {mig.dest_compute} mid-finish",
              lambda: cluster.crash_host(mig.dest_compute))
    steps.run(f"{name} recovers to VERIFY_RESIZE", lambda: handle.wait(60),
              lambda m: m.status == "finished")
    steps.run(f"confirm {name}", lambda: cluster.confirm(name),
              lambda m: m.status == "confirmed")


def _wait_status(handle, status: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        mig = handle.status()
        if mig.status == status:
            return mig
        time.sleep(0.02)     # polling a status for the demo's narration
    raise TimeoutError(f"migration {handle.id} did not reach {status}")


def _summary(console, steps: _Steps, report) -> None:
    from rich.table import Table
    table = Table(title="vmresize demo")
    for col in ("step", "result", "detail", "seconds"):
        table.add_column(col)
    for what, result, detail, took in steps.rows:
        colour = "green" if result == "ok" else "red"
        table.add_row(what, f"[{colour}]{result}[/]", detail, f"{took:.2f}")
    console.print(table)
    if report is not None:
        console.print(f"audit: {'ok' if report.ok else 'FAILED'} — {report.events} events "
                      f"from {report.hosts} hosts, {len(report.violations)} violations")
