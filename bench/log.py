"""Benchmark of the durable log (DESIGN §8): group-commit appends against the disk's raw
fsync rate and against SQLite (WAL, synchronous=FULL) storing the same payloads, and the
replay rate from disk.

    .venv/bin/python bench/log.py [--quick] [--dir DIR] [--rounds N] [--profile]

Prints a table for people, then as its last line one JSON object with every figure.
Payloads are real msgspec-encoded host envelopes, one of every host event type in turn.
The headline pair (64 async appenders against SQLite with 64 events per transaction) is
measured `--rounds` times, alternating, and the medians reported: on a shared machine
one run of either says little. `--profile` prints the event loop's cProfile top lines
for 64 async appenders (the writer thread is not in it: it waits in fsync).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table

from vmresize.events import codec
from vmresize.events.log import SegmentLog
from vmresize.events.schema import HOST_EVENT_TYPES, Envelope

HOST = "compute-1"
SQLITE_BATCH = 64
TARGET_VS_SQLITE_BATCH = 1.0    # DESIGN §8: 64 async appenders at least SQLite's batched rate
WRITE_BATCH = 1000          # records per append when filling the replay log (fsync=False)


# --------------------------------------------------------------------------- payloads

def _sample(t: msgspec.inspect.Type, name: str):
    """A plausible value of type `t` for a field called `name`, whatever the schema is
    today: the benchmark builds every event type from its declared fields."""
    mi = msgspec.inspect
    if isinstance(t, mi.StructType):
        return t.cls(**{f.name: _sample(f.type, f.name) for f in t.fields})
    if isinstance(t, mi.StrType):
        if name.endswith(("uuid", "_id")):
            return str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        return {"dest": "compute-2", "source": HOST}.get(name, f"{name}-value")
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.IntType):
        return max(7, (t.ge or 0), (t.gt or 0) + 1)
    if isinstance(t, mi.FloatType):
        return 1.7e9
    if isinstance(t, (mi.VarTupleType, mi.ListType)):
        value = [_sample(t.item_type, name)]
        return tuple(value) if isinstance(t, mi.VarTupleType) else value
    if isinstance(t, mi.UnionType):
        return _sample(next(u for u in t.types if not isinstance(u, mi.NoneType)), name)
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    if isinstance(t, (mi.DictType, mi.NoneType)):
        return {} if isinstance(t, mi.DictType) else None
    raise TypeError(f"no sample for {name}: {t}")


def sample_events() -> list:
    events = [_sample(msgspec.inspect.type_info(cls), cls.__name__)
              for cls in HOST_EVENT_TYPES]
    for event in events:                       # they must be what a host would write
        assert codec.decode_host(codec.encode(Envelope(HOST, 0, 0.0, event))).event == event
    return events


def make_encode():
    def encode(offset: int, event) -> bytes:
        return codec.encode(Envelope(HOST, offset, time.time(), event))
    return encode


# --------------------------------------------------------------------------- helpers

def bench_dir(requested: str | None) -> Path:
    """A directory on a real disk: /var/tmp unless it is tmpfs, else under the repo."""
    if requested:
        base = Path(requested)
    elif fs_type("/var/tmp") not in ("tmpfs", "ramfs"):
        base = Path("/var/tmp")
    else:
        base = Path(__file__).resolve().parent.parent / ".bench-tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="vmresize-bench-log-", dir=base))


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) \
                    and len(point) > len(best):
                best, kind = point, fstype
    return kind


def percentile_ms(latencies_s: list[float], q: float) -> float:
    ordered = sorted(latencies_s)
    return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(count: int, elapsed_s: float, latencies_s: list[float]) -> dict:
    return {"per_s": count / elapsed_s, "p50_ms": percentile_ms(latencies_s, 0.50),
            "p99_ms": percentile_ms(latencies_s, 0.99), "count": count}


# --------------------------------------------------------------------------- measurements

def raw_fsync(directory: Path, duration_s: float) -> dict:
    path = directory / "raw-fsync"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    latencies, record = [], b"x" * 100
    start = time.perf_counter()
    try:
        while (now := time.perf_counter()) - start < duration_s:
            os.write(fd, record)
            os.fsync(fd)
            latencies.append(time.perf_counter() - now)
    finally:
        os.close(fd)
        path.unlink()
    return summary(len(latencies), time.perf_counter() - start, latencies)


def log_async(directory: Path, events: list, appenders: int, duration_s: float,
              batch: int = 1) -> dict:
    """`appenders` coroutines on one event loop, each appending `batch` events at a time."""
    log = SegmentLog(directory / f"async-{appenders}-{batch}")
    encode, latencies, fsyncs = make_encode(), [], [0]

    async def appender(k: int, deadline: float) -> int:
        done = 0
        while (t0 := time.perf_counter()) < deadline:
            await log.append_async([events[(k + done + i) % len(events)]
                                    for i in range(batch)], encode)
            latencies.append(time.perf_counter() - t0)
            done += batch
        return done

    async def main() -> tuple[int, float]:
        await asyncio.gather(*(appender(k, time.perf_counter() + 0.1)
                               for k in range(appenders)))           # warm-up
        latencies.clear()
        fsyncs[0] = log.fsyncs
        start = time.perf_counter()
        counts = await asyncio.gather(*(appender(k, start + duration_s)
                                        for k in range(appenders)))
        return sum(counts), time.perf_counter() - start

    try:
        count, elapsed = asyncio.run(main())
    finally:
        log.close()
    result = summary(count, elapsed, latencies)   # latency: per append call
    result["records_per_fsync"] = count / max(1, log.fsyncs - fsyncs[0])
    return result


def log_threads(directory: Path, events: list, appenders: int, duration_s: float) -> dict:
    log = SegmentLog(directory / f"threads-{appenders}")
    encode, latencies, counts = make_encode(), [], [0] * appenders
    barrier = threading.Barrier(appenders + 1)
    deadline = [0.0]

    def appender(k: int) -> None:
        mine = []
        barrier.wait()
        while (t0 := time.perf_counter()) < deadline[0]:
            log.append([events[(k + len(mine)) % len(events)]], encode)
            mine.append(time.perf_counter() - t0)
        counts[k] = len(mine)
        latencies.extend(mine)                 # list.extend is atomic under the GIL

    threads = [threading.Thread(target=appender, args=(k,)) for k in range(appenders)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    deadline[0] = start + duration_s
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    log.close()
    result = summary(sum(counts), elapsed, latencies)
    result["records_per_fsync"] = sum(counts) / max(1, log.fsyncs)
    return result


def sqlite(directory: Path, events: list, batch: int, duration_s: float) -> dict:
    conn = sqlite3.connect(directory / f"sqlite-{batch}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE events (offset INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    encode, latencies, offset = make_encode(), [], 0
    start = time.perf_counter()
    while (t0 := time.perf_counter()) - start < duration_s:
        rows = [(offset + i, encode(offset + i, events[(offset + i) % len(events)]))
                for i in range(batch)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t0)
        offset += batch
    elapsed = time.perf_counter() - start
    conn.close()
    return summary(offset, elapsed, latencies)   # latency: per transaction


# --------------------------------------------------------------------------- replay

def evict(directory: Path) -> None:
    """Drop the log's pages from the page cache (no root needed), so reads hit the disk."""
    for segment in directory.glob("*.seg"):
        fd = os.open(segment, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def replay(directory: Path, events: list, count: int) -> dict:
    path, encode = directory / "replay", make_encode()
    start = time.perf_counter()
    with SegmentLog(path, fsync=False) as log:
        for first in range(0, count, WRITE_BATCH):
            n = min(WRITE_BATCH, count - first)
            log.append([events[(first + i) % len(events)] for i in range(n)], encode)
        log.sync()
    write_s = time.perf_counter() - start
    log_bytes = sum(p.stat().st_size for p in path.glob("*.seg"))

    evict(path)
    start = time.perf_counter()
    log = SegmentLog(path, readonly=True)            # verifies every record's CRC
    open_s = time.perf_counter() - start
    assert log.next_offset == count and log.torn_tail is None

    start = time.perf_counter()
    read = sum(1 for _ in log.read())
    read_s = time.perf_counter() - start

    evict(path)
    decode, start = codec.decode_host, time.perf_counter()
    decoded = 0
    for offset, payload in log.read():
        assert decode(payload).offset == offset
        decoded += 1
    decode_s = time.perf_counter() - start
    assert read == decoded == count
    return {"events": count, "log_mb": log_bytes / 1e6, "write_nosync_per_s": count / write_s,
            "open_verify_s": open_s, "open_verify_per_s": count / open_s,
            "read_per_s": count / read_s, "read_decode_per_s": count / decode_s}


# --------------------------------------------------------------------------- report

def median_run(runs: list[dict]) -> dict:
    """The run with the median rate, and every run's rate beside it."""
    ordered = sorted(runs, key=lambda r: r["per_s"])
    return {**ordered[(len(ordered) - 1) // 2],
            "runs_per_s": [round(r["per_s"]) for r in runs]}


def headline(directory: Path, events: list, duration_s: float, rounds: int) -> dict:
    """64 async appenders and SQLite per 64-event transaction, alternating."""
    ours, theirs = [], []
    for i in range(rounds):
        here = directory / f"round-{i}"            # fresh files: a new log, a new database
        here.mkdir()
        pair = [lambda: ours.append(log_async(here, events, 64, duration_s)),
                lambda: theirs.append(sqlite(here, events, SQLITE_BATCH, duration_s))]
        for measure in (pair if i % 2 == 0 else pair[::-1]):
            measure()
        shutil.rmtree(here)
    return {"log_async_64": median_run(ours),
            f"sqlite_batch_{SQLITE_BATCH}": median_run(theirs)}


def profile(directory: Path, events: list, duration_s: float, lines: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    log_async(directory, events, 64, duration_s)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def run(quick: bool, requested_dir: str | None, rounds: int, want_profile: bool) -> dict:
    duration_s = 0.7 if quick else 2.5
    directory = bench_dir(requested_dir)
    events = sample_events()
    encode = make_encode()
    payload_bytes = [len(encode(123456, e)) for e in events]
    figures: dict = {"quick": quick, "dir": str(directory), "fs_type": fs_type(str(directory)),
                     "payload_bytes_mean": sum(payload_bytes) / len(payload_bytes),
                     "rounds": rounds, "load_avg_1m": os.getloadavg()[0]}
    try:
        if want_profile:
            print(profile(directory, events, duration_s), file=sys.stderr)
        figures["raw_fsync"] = raw_fsync(directory, 1.0 if quick else 2.0)
        for n in (1, 8):
            figures[f"log_async_{n}"] = log_async(directory, events, n, duration_s)
        figures.update(headline(directory, events, duration_s, rounds))
        figures[f"log_async_1_batch_{SQLITE_BATCH}"] = log_async(directory, events, 1,
                                                                duration_s, SQLITE_BATCH)
        for n in (8, 64):
            figures[f"log_threads_{n}"] = log_threads(directory, events, n, duration_s)
        figures["sqlite_per_event"] = sqlite(directory, events, 1, duration_s)
        figures["replay"] = replay(directory, events, 200_000 if quick else 1_000_000)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ours = figures["log_async_64"]["per_s"]
    figures["ratio_log_async_64_vs_sqlite_per_event"] = ours / figures["sqlite_per_event"]["per_s"]
    figures[f"ratio_log_async_64_vs_sqlite_batch_{SQLITE_BATCH}"] = (
        ours / figures[f"sqlite_batch_{SQLITE_BATCH}"]["per_s"])
    figures["ratio_log_async_64_vs_raw_fsync"] = ours / figures["raw_fsync"]["per_s"]
    figures["target_vs_sqlite_batch"] = TARGET_VS_SQLITE_BATCH
    figures["target_met"] = (figures[f"ratio_log_async_64_vs_sqlite_batch_{SQLITE_BATCH}"]
                             >= TARGET_VS_SQLITE_BATCH)
    figures["load_avg_1m_end"] = os.getloadavg()[0]
    return figures


def table(figures: dict) -> Table:
    t = Table(title=f"durable log: {figures['dir']} ({figures['fs_type']}), "
                    f"payload {figures['payload_bytes_mean']:.0f} B mean")
    for column in ("what", "events/s", "p50 ms", "p99 ms", "events/fsync"):
        t.add_column(column, justify="left" if column == "what" else "right")
    rows = [("raw fsync (100 B write + fsync)", "raw_fsync")]
    rows += [(f"SegmentLog, {n} async appender{'s' * (n > 1)}", f"log_async_{n}")
             for n in (1, 8, 64)]
    rows += [(f"SegmentLog, 1 async appender, {SQLITE_BATCH} events/append "
              "(latency per append)", f"log_async_1_batch_{SQLITE_BATCH}")]
    rows += [(f"SegmentLog, {n} threads", f"log_threads_{n}") for n in (8, 64)]
    rows += [("SQLite WAL FULL, 1 event/txn", "sqlite_per_event"),
             (f"SQLite WAL FULL, {SQLITE_BATCH} events/txn (latency per txn)",
              f"sqlite_batch_{SQLITE_BATCH}")]
    for label, key in rows:
        f = figures[key]
        per_fsync = f.get("records_per_fsync")
        t.add_row(label, f"{f['per_s']:,.0f}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}",
                  "" if per_fsync is None else f"{per_fsync:.1f}")
    return t


def replay_table(figures: dict) -> Table:
    r = figures["replay"]
    t = Table(title=f"replay: {r['events']:,} events, {r['log_mb']:.0f} MB of segments")
    t.add_column("what")
    t.add_column("events/s", justify="right")
    t.add_row("write, fsync=False (encode included)", f"{r['write_nosync_per_s']:,.0f}")
    t.add_row(f"open read-only, CRC check (cold cache, {r['open_verify_s']:.2f} s)",
              f"{r['open_verify_per_s']:,.0f}")
    t.add_row("read (warm cache)", f"{r['read_per_s']:,.0f}")
    t.add_row("read + decode_host (cold cache)", f"{r['read_decode_per_s']:,.0f}")
    t.caption = "fold and audit rates of a protocol history: bench/audit.py"
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, 200k replay")
    parser.add_argument("--dir", help="parent directory for the temp files (a real disk)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating runs of the headline pair (default 3, 1 quick)")
    parser.add_argument("--profile", action="store_true",
                        help="print the event loop's profile of 64 async appenders first")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    figures = run(args.quick, args.dir, rounds, args.profile)
    console = Console(file=sys.stdout)
    console.print(table(figures))
    console.print(replay_table(figures))
    console.print(f"64 async appenders: {figures['ratio_log_async_64_vs_sqlite_per_event']:.1f}x"
                  f" SQLite per event, "
                  f"{figures[f'ratio_log_async_64_vs_sqlite_batch_{SQLITE_BATCH}']:.2f}x SQLite"
                  f" per {SQLITE_BATCH}-batch, "
                  f"{figures['ratio_log_async_64_vs_raw_fsync']:.1f}x raw fsync")
    console.print(f"target >= {TARGET_VS_SQLITE_BATCH:.2f}x SQLite per {SQLITE_BATCH}-batch: "
                  f"{'met' if figures['target_met'] else 'MISSED'} (load average "
                  f"{figures['load_avg_1m']:.1f} at the start, "
                  f"{figures['load_avg_1m_end']:.1f} at the end)")
    sys.stdout.flush()
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
