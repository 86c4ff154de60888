"""Benchmark: the deterministic simulator at scale.

Runs `Simulator` on 100 hosts, 2,000 instances and 20,000 operations with all faults
(and, for comparison in the same run, without crashes and with no faults), and two
memory sweeps: peak memory as the history grows four-fold with live state fixed (see
SWEEP_HOSTS), and the same on 100 hosts, where the bounded windows are still filling.
Prints tables, then one JSON line.

    .venv/bin/python bench/sim.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = r"""
import json, resource, sys, tracemalloc
from vmresize.config import load
from vmresize.sim.simulator import Simulator, SimConfig, FAULT_KINDS
hosts, instances, operations, faults, state, trace = sys.argv[1:7]
cfg = load(sys.argv[7])
faults = tuple(f for f in faults.split(",") if f)
if trace == "1":
    tracemalloc.start()
sim = Simulator(cfg, SimConfig(seed=1, hosts=int(hosts), instances=int(instances),
                               operations=int(operations), faults=faults), state)
r = sim.run()
peak = tracemalloc.get_traced_memory()[1] if trace == "1" else 0
print(json.dumps({"resizes": r.resizes_finished, "failed": r.resizes_failed,
                  "events": r.events, "wall_s": r.wall_s, "crashes": r.crashes,
                  "violations": r.violations, "resizes_per_s": r.resizes_per_s,
                  "events_per_s": r.events_per_s, "traced_peak_bytes": peak,
                  "windows_hit": sum(1 for n in r.windows.values() if n),
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


# The memory sweep: live state fixed (4 hosts, 20 instances), the history four times as
# long at its end as at its start, and its start past the point where every bounded
# window is full: a host's last 1,024 command ids (full at about 2,800 records a host,
# 2,500 operations), the controller's last 2,048 ended requests and 1,024 ended
# migrations, the checks' last 1,024 ended migrations. Before that point what grows is
# windows filling, which is what the same sweep on 100 hosts shows (printed beside it).
# It starts at 5,000 operations; with --quick at 2,500, where each host's log is about
# one read chunk (1 MiB) long, so that readers' buffers are still growing too.
SWEEP_HOSTS, SWEEP_INSTANCES, SWEEP_OPERATIONS = 4, 20, 5_000
SWEEP_FACTORS = (1, 2, 4)


def start(hosts, instances, operations, faults, trace=False):
    tmp = tempfile.TemporaryDirectory(dir="/var/tmp")
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(hosts), str(instances),
                             str(operations), ",".join(faults), f"{tmp.name}/state",
                             "1" if trace else "0", str(ROOT / "cluster.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, tmp


def result(started) -> dict:
    proc, tmp = started
    out, err = proc.communicate()
    tmp.cleanup()
    if proc.returncode:
        raise SystemExit(f"a simulator run failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def run(hosts, instances, operations, faults, trace=False) -> dict:
    return result(start(hosts, instances, operations, faults, trace))


def memory_sweep(runs: list[tuple[int, int, int]], faults) -> dict:
    """Peak traced memory of each run (hosts, instances, operations), two at a time
    (memory is per process: the runs do not disturb each other's figure)."""
    results, pending = [], list(runs)
    while pending:
        batch, pending = pending[:2], pending[2:]
        results += [result(s) for s in [start(h, i, o, faults, trace=True)
                                         for h, i, o in batch]]
    points = [{"events": r["events"], "traced_peak_bytes": r["traced_peak_bytes"]}
              for r in results]
    # Peak memory when the history grows four-fold (target: flat, within 20%).
    return {"points": points,
            "bytes_per_event": [round(p["traced_peak_bytes"] / max(1, p["events"]))
                                for p in points],
            "growth_4x": round(points[-1]["traced_peak_bytes"]
                               / max(1, points[0]["traced_peak_bytes"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    ops = int(20_000 * scale)
    inst = int(2_000 * scale)
    from vmresize.sim.simulator import FAULT_KINDS
    every = FAULT_KINDS         # storage faults included
    crashless = tuple(k for k in every
                      if k not in ("crash", "power_loss", "torn_write", "io_error"))
    figures = {
        "all_faults": run(100, inst, ops, every),
        "no_crashes": run(100, inst, ops, crashless),
        "no_faults": run(100, inst, ops, ()),
    }
    base = SWEEP_OPERATIONS // 2 if args.quick else SWEEP_OPERATIONS
    steady = memory_sweep([(SWEEP_HOSTS, SWEEP_INSTANCES, base * f)
                           for f in SWEEP_FACTORS], crashless)
    filling = memory_sweep([(100, inst, int(ops * f / 4)) for f in SWEEP_FACTORS],
                           crashless)
    figures["memory_sweep"] = steady["points"]
    figures["bytes_per_event"] = steady["bytes_per_event"]
    figures["memory_growth_4x"] = steady["growth_4x"]
    figures["memory_sweep_100_hosts"] = filling["points"]
    figures["memory_growth_4x_100_hosts"] = filling["growth_4x"]
    figures["target_resizes_per_s"] = 5000

    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"simulator: 100 hosts, {inst} instances, {ops} operations")
    for col in ("run", "resizes", "events", "crashes", "violations", "wall s",
                "resizes/s", "events/s"):
        t.add_column(col)
    for name in ("all_faults", "no_crashes", "no_faults"):
        f = figures[name]
        t.add_row(name, str(f["resizes"]), str(f["events"]), str(f["crashes"]),
                  str(f["violations"]), f"{f['wall_s']:.1f}", f"{f['resizes_per_s']:.0f}",
                  f"{f['events_per_s']:.0f}")
    console = Console()
    console.print(t)
    for title, points in ((f"memory against history: {SWEEP_HOSTS} hosts, "
                           f"{SWEEP_INSTANCES} instances (tracemalloc peak, no crashes)",
                           figures["memory_sweep"]),
                          (f"memory while the windows fill: 100 hosts, {inst} instances",
                           figures["memory_sweep_100_hosts"])):
        m = Table(title=title)
        for col in ("events", "peak MB", "bytes/event"):
            m.add_column(col)
        for p in points:
            m.add_row(str(p["events"]), f"{p['traced_peak_bytes'] / 2**20:.1f}",
                      f"{p['traced_peak_bytes'] / max(1, p['events']):.0f}")
        console.print(m)
    growth = figures["memory_growth_4x"]
    console.print(f"peak memory, history x4: x{growth} "
                  f"({'met' if growth <= 1.2 else 'MISSED'}: target x1.2 at most)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
