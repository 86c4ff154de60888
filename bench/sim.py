"""Benchmark: the deterministic simulator at scale.

Runs `Simulator` on 100 hosts, 2,000 instances and 20,000 operations with all faults
(and, for comparison in the same run, without crashes and with no faults), and a size
sweep to show how memory grows with events. Prints a table, then one JSON line.

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


def run(hosts, instances, operations, faults, trace=False) -> dict:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        out = subprocess.run([sys.executable, "-c", RUN, str(hosts), str(instances),
                              str(operations), ",".join(faults), f"{tmp}/state",
                              "1" if trace else "0", str(ROOT / "cluster.yaml")],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    sweep = [run(100, inst, int(ops * f), crashless, trace=True) for f in (0.25, 0.5, 1.0)]
    per_event = [s["traced_peak_bytes"] / max(1, s["events"]) for s in sweep]
    figures["memory_sweep"] = [{"events": s["events"], "traced_peak_bytes":
                                s["traced_peak_bytes"]} for s in sweep]
    figures["bytes_per_event"] = [round(b) for b in per_event]
    # Peak memory when the history grows four-fold (target: flat, within 20%).
    figures["memory_growth_4x"] = round(
        sweep[-1]["traced_peak_bytes"] / max(1, sweep[0]["traced_peak_bytes"]), 3)
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
    m = Table(title="memory against events (tracemalloc peak, no crashes)")
    for col in ("events", "peak MB", "bytes/event"):
        m.add_column(col)
    for s, b in zip(sweep, per_event):
        m.add_row(str(s["events"]), f"{s['traced_peak_bytes'] / 2**20:.1f}", f"{b:.0f}")
    console.print(m)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
