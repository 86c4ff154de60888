"""Benchmark: replay, fold and audit rates over a large state directory.

Writes a protocol-valid history (boot, then resize + confirm or revert, again and
again, across hosts) of N events into real segment logs, then measures in one run:
read + decode from disk; read + decode + fold (one host's log into a projection);
the full offline audit (merge of all hosts' logs, all six invariants).

    .venv/bin/python bench/audit.py [--events 1000000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from vmresize.events import schema as ev
from vmresize.events.codec import decode_host, encode
from vmresize.events.log import SegmentLog
from vmresize.events.store import open_host_logs
from vmresize.projections.audit import audit
from vmresize.projections.fold import fold

SMALL = ev.Flavor("m1.small", 1, 2048, 20)
MEDIUM = ev.Flavor("m1.medium", 2, 4096, 40)
CAPACITY = ev.Resources(10_000, 10_000_000, 10_000_000)


class Writer:
    """Appends events to per-host logs, stamping envelopes with gapless offsets."""

    def __init__(self, state: Path, hosts: list[str]):
        self.logs = {h: SegmentLog(state / "hosts" / h / "log", fsync=False) for h in hosts}
        self.clock = 1_767_225_600.0
        self.count = 0

    def put(self, host: str, *events) -> None:
        def stamp(offset, event):
            self.clock += 0.001
            return encode(ev.Envelope(host, offset, self.clock, event))
        self.logs[host].append(list(events), stamp)
        self.count += len(events)

    def close(self) -> None:
        for log in self.logs.values():
            log.close()


def _resize(w: Writer, uuid: str, v: int, n: int, src: str, dst: str, old, new,
            confirm: bool) -> int:
    mid = f"{uuid}-m{n}"
    spec = ev.MigrationSpec(name=uuid, source=src, dest=dst, old_flavor=old, new_flavor=new,
                            old_resources=old.resources(), new_resources=new.resources(),
                            migration_type="resize", vm_state="active")
    k = dict(instance_uuid=uuid, migration_id=mid, command_id=mid)
    w.put(dst, ev.Claimed(instance_version=v + 1, spec=spec, probe="p", **k))
    w.put(src, ev.MigrationStarted(instance_version=v + 2, spec=spec, **k),
          ev.DiskMigrated(instance_version=v + 3, shared_storage=False, **k))
    w.put(dst, ev.FinishStarted(instance_version=v + 4, **k),
          ev.Finished(instance_version=v + 5, **k))
    if confirm:
        w.put(src, ev.ConfirmStarted(instance_version=v + 6, **k),
              ev.Confirmed(instance_version=v + 7, **k))
        return v + 7
    w.put(dst, ev.RevertStarted(instance_version=v + 6, **k),
          ev.DestReverted(instance_version=v + 7, **k))
    w.put(src, ev.RevertFinishStarted(instance_version=v + 8, **k),
          ev.Reverted(instance_version=v + 9, **k))
    return v + 9


def write_history(state: Path, target: int, hosts: int = 16, instances: int = 2000,
                  names: list[str] | None = None) -> int:
    names = names or [f"h{i}" for i in range(hosts)]
    hosts = len(names)
    w = Writer(state, names)
    for h in names:
        w.put(h, ev.HostConfigured(driver="FakeDriver", capacity=CAPACITY, limit=CAPACITY))
    where, version, flavor = {}, {}, {}
    for i in range(instances):
        uuid, h = f"i{i:06d}", names[i % hosts]
        w.put(h, ev.SpawnStarted(instance_uuid=uuid, instance_version=1, name=uuid,
                                 flavor=SMALL, resources=SMALL.resources()),
              ev.Spawned(instance_uuid=uuid, instance_version=2))
        where[uuid], version[uuid], flavor[uuid] = h, 2, SMALL
    n = 0
    while w.count < target:
        uuid = f"i{n % instances:06d}"
        src = where[uuid]
        dst = names[(names.index(src) + 1 + n % (hosts - 1)) % hosts]
        confirm = n % 3 != 0
        old = flavor[uuid]
        new = MEDIUM if old is SMALL else ev.Flavor("m1.medium", 2, 4096, 40 + n % 7 + 1)
        version[uuid] = _resize(w, uuid, version[uuid], n, src, dst, old, new, confirm)
        if confirm:
            where[uuid], flavor[uuid] = dst, new
        n += 1
    w.close()
    return w.count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmr-audit-"))
    try:
        t = time.perf_counter()
        written = write_history(tmp, args.events)
        write_s = time.perf_counter() - t
        readers = open_host_logs(tmp)
        t = time.perf_counter()
        decoded = sum(1 for r in readers.values() for _ in r.log.read()
                      if True)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        decoded = sum(1 for r in readers.values() for _, p in r.log.read()
                      if decode_host(p))
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        folded = 0
        for r in readers.values():
            p = fold(r.envelopes())
            folded += p.events
        fold_s = time.perf_counter() - t
        t = time.perf_counter()
        report = audit(tmp)
        audit_s = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {"events": written, "write_per_s": round(written / write_s),
               "read_per_s": round(decoded / read_s),
               "read_decode_per_s": round(decoded / decode_s),
               "read_decode_fold_per_s": round(folded / fold_s),
               "audit_s": round(audit_s, 3), "audit_events": report.events,
               "audit_ok": report.ok, "audit_per_s": round(report.events / audit_s),
               "targets": {"fold_per_s": 500_000, "audit_1m_s": 5.0}}
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"replay and audit of {written:,} events (16 hosts)")
    table.add_column("what")
    table.add_column("figure")
    table.add_row("write (fsync off)", f"{figures['write_per_s']:,} events/s")
    table.add_row("read", f"{figures['read_per_s']:,} events/s")
    table.add_row("read + decode", f"{figures['read_decode_per_s']:,} events/s")
    table.add_row("read + decode + fold", f"{figures['read_decode_fold_per_s']:,} events/s "
                                          f"(target 500,000)")
    table.add_row("audit (merge + 6 invariants)", f"{audit_s:.2f} s, "
                  f"{figures['audit_per_s']:,} events/s, ok={report.ok} (target: 1M < 5 s)")
    Console().print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
