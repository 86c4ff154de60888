"""Benchmark: the control plane on Ray with fake hosts.

In one run: the raw round trip of a Ray async actor call (sequential and 1,000 in
flight); end-to-end boot -> resize -> confirm with many migrations in flight on 10
(and, with --hosts 100, 100) fake hosts, as resizes/s; p50/p99 of each protocol step
read back from the hosts' logs; host actor calls per resize against the minimum; and
the time from a host actor's crash to it answering again, by log length, with and
without a snapshot.

    .venv/bin/python bench/ray_cluster.py [--hosts 10,100] [--migrations 1000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import write_history  # noqa: E402

from vmresize.actors import Cluster  # noqa: E402
from vmresize.config import parse  # noqa: E402
from vmresize.events import schema as ev  # noqa: E402
from vmresize.events.store import open_host_logs  # noqa: E402
from vmresize.projections.fold import merge_logs  # noqa: E402

# prep (dest), resize_instance (source), finish (dest), confirm (source), spawn (host)
MIN_HOST_CALLS_PER_RESIZE = 4


def config(hosts: int, state: Path):
    lines = ["options: {step_timeout_s: 120}",
             "allocation_ratios: {vcpus: 16.0, memory_mb: 1.5, disk_gb: 1.0}",
             "flavors:", "  m1.tiny: {vcpus: 1, memory_mb: 512, root_gb: 1}",
             "  m1.small: {vcpus: 1, memory_mb: 2048, root_gb: 20}", "hosts:"]
    lines += [f"  - {{name: h{i}, vcpus: 64, memory_mb: 1048576, disk_gb: 100000}}"
              for i in range(hosts)]
    cfg = parse("\n".join(lines) + "\n", "bench")
    return msgspec.structs.replace(cfg, state_dir=str(state))


@ray.remote(num_cpus=0)
class Echo:
    async def ping(self, x):
        return x


def raw_round_trip() -> dict:
    echo = Echo.remote()
    ray.get(echo.ping.remote(0))
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        ray.get(echo.ping.remote(i))
    seq_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    ray.get([echo.ping.remote(i) for i in range(1000)])
    par_s = time.perf_counter() - start
    ray.kill(echo)
    return {"sequential_ms": round(seq_s * 1000, 3),
            "in_flight_1000_calls_per_s": round(1000 / par_s)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def step_latencies(state: Path) -> dict:
    """p50/p99 (ms) of each step, from intent to outcome, read from the hosts' logs."""
    readers = open_host_logs(state)
    first: dict[tuple, float] = {}
    spans: dict[str, list[float]] = {}
    pairs = {ev.Claimed: ("prep", None), ev.MigrationStarted: ("resize", "start"),
             ev.DiskMigrated: ("resize", "end"), ev.FinishStarted: ("finish", "start"),
             ev.Finished: ("finish", "end"), ev.ConfirmStarted: ("confirm", "start"),
             ev.Confirmed: ("confirm", "end"), ev.SpawnStarted: ("spawn", "start"),
             ev.Spawned: ("spawn", "end")}
    for env in merge_logs({h: r.envelopes() for h, r in readers.items()}):
        step, edge = pairs.get(type(env.event), (None, None))
        if step is None or edge is None:
            continue
        key = (step, env.event.instance_uuid, getattr(env.event, "migration_id", ""))
        if edge == "start":
            first[key] = env.wall_time
        elif key in first:
            spans.setdefault(step, []).append((env.wall_time - first.pop(key)) * 1000)
    return {step: {"p50_ms": round(pct(v, 0.5), 2), "p99_ms": round(pct(v, 0.99), 2),
                   "n": len(v)} for step, v in spans.items()}


def end_to_end(hosts: int, migrations: int) -> dict:
    state = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmr-raybench-"))
    try:
        t0 = time.perf_counter()
        cluster = Cluster.start(config(hosts, state), snapshot_every=0)
        start_s = time.perf_counter() - t0
        ctl = cluster.controller
        names = [f"vm-{i}" for i in range(migrations)]
        t0 = time.perf_counter()
        _all(ctl, [("boot", (n, "m1.tiny"), {}) for n in names])
        boot_s = time.perf_counter() - t0
        calls_before = cluster.round_trips()
        t0 = time.perf_counter()
        migs = _all(ctl, [("resize", (n, "m1.small"), {}) for n in names])
        resize_s = time.perf_counter() - t0
        _all(ctl, [("confirm", (n,), {}) for n in names])
        total_s = time.perf_counter() - t0
        host_calls = cluster.round_trips() - calls_before
        report = cluster.audit()
        cluster.stop()
        steps = step_latencies(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert all(m.status == "finished" for m in migs) and report.ok
    return {"hosts": hosts, "migrations": migrations, "cluster_start_s": round(start_s, 2),
            "boots_per_s": round(migrations / boot_s, 1),
            "resize_to_verify_per_s": round(migrations / resize_s, 1),
            "resize_and_confirm_per_s": round(migrations / total_s, 1),
            "host_calls_per_resize": round(host_calls / migrations, 2),
            "min_host_calls_per_resize": MIN_HOST_CALLS_PER_RESIZE,
            "steps": steps, "audit_ok": report.ok}


def _all(ctl, calls) -> list:
    refs = [ctl.call.remote(m, *a, **kw) for m, a, kw in calls]
    out = ray.get(refs)
    bad = [o.error for o in out if not o.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} calls failed, first: {bad[0]}")
    return [o.value for o in out]


def recovery(events: int, snapshot: bool) -> dict:
    state = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmr-recovery-"))
    try:
        cfg = config(2, state)
        write_history(state, events, instances=200, names=["h0", "h1"])
        t0 = time.perf_counter()
        cluster = Cluster.start(cfg, snapshot_every=0)
        first_start_s = time.perf_counter() - t0
        handle = ray.get_actor("vmresize-host-h0", namespace=cluster.namespace)
        length = ray.get(handle.ready.remote())["offset"]
        if snapshot:
            ray.get(handle.snapshot.remote())
        crash_s = cluster.crash_host("h0")
        cluster.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return {"log_events": length, "snapshot": snapshot,
            "crash_to_answer_s": round(crash_s, 3), "cold_start_s": round(first_start_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="10")
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--recovery", default="10000,100000")
    args = ap.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    figures = {"raw_ray": raw_round_trip(), "end_to_end": [], "recovery": []}
    for hosts in (int(h) for h in args.hosts.split(",")):
        figures["end_to_end"].append(end_to_end(hosts, args.migrations))
    for n in (int(x) for x in args.recovery.split(",") if x):
        for snap in (False, True):
            figures["recovery"].append(recovery(n, snap))
    ray.shutdown()
    report(figures)
    print(json.dumps(figures))


def report(f: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    c = Console()
    raw = f["raw_ray"]
    c.print(f"raw Ray actor round trip: {raw['sequential_ms']} ms sequential, "
            f"{raw['in_flight_1000_calls_per_s']} calls/s with 1,000 in flight")
    t = Table(title="boot -> resize -> confirm, all migrations in flight")
    for col in ("hosts", "migrations", "resizes/s (to VERIFY)", "resize+confirm/s",
                "host calls/resize (min)", "prep p50/p99 ms", "resize p50/p99",
                "finish p50/p99", "confirm p50/p99"):
        t.add_column(col)
    for e in f["end_to_end"]:
        s = e["steps"]
        cell = lambda k: f"{s.get(k, {}).get('p50_ms', '-')}/{s.get(k, {}).get('p99_ms', '-')}"
        t.add_row(str(e["hosts"]), str(e["migrations"]), str(e["resize_to_verify_per_s"]),
                  str(e["resize_and_confirm_per_s"]),
                  f"{e['host_calls_per_resize']} ({e['min_host_calls_per_resize']})",
                  cell("prep"), cell("resize"), cell("finish"), cell("confirm"))
    c.print(t)
    r = Table(title="host actor crash -> answering again")
    for col in ("log events", "snapshot", "seconds"):
        r.add_column(col)
    for x in f["recovery"]:
        r.add_row(str(x["log_events"]), str(x["snapshot"]), str(x["crash_to_answer_s"]))
    c.print(r)


if __name__ == "__main__":
    main()
