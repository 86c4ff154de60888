"""The log contract, run over every backend; then what only the file backend promises."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmresize.events.log import (LOCK_NAME, CorruptLog, LogError, MemoryLog, SegmentLog,
                                 TornTail, load_snapshot, save_snapshot, segment_name)

TINY_SEGMENT_BYTES = 256


def payload(tag: str, i: int) -> bytes:
    return f"{tag}-{i}".encode()


class LogContract:
    """Every log backend passes these. Subclasses provide the `make` fixture."""

    @pytest.fixture
    def make(self):
        raise NotImplementedError

    def test_round_trip(self, make):
        log = make()
        assert log.next_offset == 0
        assert log.append([b"a", b"bb"]) == 0
        assert log.append([b"ccc"]) == 2
        assert list(log.read()) == [(0, b"a"), (1, b"bb"), (2, b"ccc")]
        assert log.next_offset == 3
        assert log.torn_tail is None

    def test_empty_batch_and_empty_log(self, make):
        log = make()
        assert list(log.read()) == []
        assert log.append([]) == 0
        assert log.next_offset == 0

    def test_refuses_empty_and_non_bytes_payloads(self, make):
        log = make()
        with pytest.raises(ValueError):
            log.append([b""])
        with pytest.raises(TypeError):
            log.append(["text"])
        assert log.next_offset == 0

    def test_gapless_across_batches_and_segments(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        expected = []
        for batch in range(40):
            items = [payload("b", batch * 10 + i) * (1 + i % 4) for i in range(batch % 5 + 1)]
            assert log.append(items) == len(expected)
            expected.extend(items)
        assert list(log.read()) == list(enumerate(expected))

    def test_read_from_any_offset(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        items = [payload("r", i) * 3 for i in range(60)]
        for i in range(0, 60, 7):
            log.append(items[i:i + 7])
        for start in range(0, 62):
            assert list(log.read(start)) == list(enumerate(items))[start:]
        assert list(log.read(13, 29)) == list(enumerate(items))[13:29]
        assert list(log.read(5, 5)) == []

    def test_encode_receives_the_offset(self, make):
        log = make()
        log.append([b"x"])
        first = log.append(["a", "b", "c"], encode=lambda offset, item: f"{offset}:{item}".encode())
        assert first == 1
        assert [p for _, p in log.read(1)] == [b"1:a", b"2:b", b"3:c"]

    def test_concurrent_thread_appends_are_gapless(self, make):
        log = make(segment_bytes=4096)
        threads_n, per_thread = 16, 50
        barrier = threading.Barrier(threads_n)
        returned: dict[bytes, int] = {}

        def appender(t: int) -> None:
            barrier.wait()
            for j in range(per_thread):
                item = payload(f"t{t}", j)
                returned[item] = log.append([item])

        threads = [threading.Thread(target=appender, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records = list(log.read())
        assert [offset for offset, _ in records] == list(range(threads_n * per_thread))
        assert sorted(p for _, p in records) == sorted(returned)
        assert all(returned[p] == offset for offset, p in records)
        for t in range(threads_n):     # each thread's records keep its order
            mine = [p for _, p in records if p.startswith(f"t{t}-".encode())]
            assert mine == [payload(f"t{t}", j) for j in range(per_thread)]

    def test_append_async_from_64_coroutines(self, make):
        log = make()
        coroutines_n, per_coroutine = 64, 5

        async def appender(c: int) -> list[tuple[int, bytes]]:
            got = []
            for j in range(per_coroutine):
                items = [payload(f"c{c}", j), payload(f"c{c}", j) + b"!"]
                first = await log.append_async(
                    items, encode=lambda offset, item: item + b"@" + str(offset).encode())
                got.extend((first + k, item) for k, item in enumerate(items))
            return got

        async def main():
            return await asyncio.gather(*(appender(c) for c in range(coroutines_n)))

        results = [pair for got in asyncio.run(main()) for pair in got]
        records = dict(log.read())
        assert sorted(records) == list(range(coroutines_n * per_coroutine * 2))
        for offset, item in results:
            assert records[offset] == item + b"@" + str(offset).encode()

    def test_append_async_then_sync_append_again(self, make):
        log = make()
        assert asyncio.run(log.append_async([b"one"])) == 0
        assert asyncio.run(log.append_async([b"two"])) == 1   # a second event loop
        assert log.append([b"three"]) == 2
        assert [p for _, p in log.read()] == [b"one", b"two", b"three"]

    def test_reading_while_appending(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        total = 400
        items = [payload("w", i) for i in range(total)]
        done = threading.Event()

        def writer() -> None:
            for i in range(0, total, 4):
                log.append(items[i:i + 4])
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        seen_lengths = []
        while True:                # every read is a gapless prefix of what is written
            finished = done.is_set()
            records = list(log.read())
            assert records == list(enumerate(items))[:len(records)]
            seen_lengths.append(len(records))
            if finished:
                break
        thread.join()
        assert seen_lengths[-1] == total

    def test_follow_yields_records_as_they_come(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        total = 120
        log.append([payload("f", 0)])
        stop = threading.Event()
        got = []

        def writer() -> None:
            for i in range(1, total):
                log.append([payload("f", i)])

        thread = threading.Thread(target=writer)
        thread.start()
        for offset, item in log.follow(0, poll_s=0.01, stop_event=stop):
            got.append((offset, item))
            if offset == total - 1:
                stop.set()
        thread.join()
        assert got == [(i, payload("f", i)) for i in range(total)]

    def test_closed_log_refuses_appends(self, make):
        log = make()
        log.append([b"kept"])
        log.close()
        log.close()                                   # idempotent
        with pytest.raises(LogError):
            log.append([b"late"])
        assert list(log.read()) == [(0, b"kept")]


class TestMemoryLog(LogContract):
    @pytest.fixture
    def make(self):
        logs = []

        def factory(**_file_options):
            logs.append(MemoryLog())
            return logs[-1]

        yield factory
        for log in logs:
            log.close()


class TestSegmentLog(LogContract):
    @pytest.fixture
    def make(self, tmp_path):
        logs = []

        def factory(**options):
            logs.append(SegmentLog(tmp_path / f"log{len(logs)}", **options))
            return logs[-1]

        yield factory
        for log in logs:
            log.close()

    def test_reopen_keeps_everything(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        items = [payload("k", i) * 5 for i in range(50)]
        for i in range(0, 50, 3):
            log.append(items[i:i + 3])
        log.close()
        again = SegmentLog(log.directory, segment_bytes=TINY_SEGMENT_BYTES)
        assert again.torn_tail is None
        assert again.next_offset == 50
        assert list(again.read()) == list(enumerate(items))
        assert again.append([b"more"]) == 50
        again.close()
        assert len(list(SegmentLog(log.directory, readonly=True).read())) == 51

    def test_segment_files_are_named_by_first_offset(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        for i in range(30):
            log.append([payload("n", i) * 10])
        firsts = sorted(int(n[:20]) for n in os.listdir(log.directory) if n.endswith(".seg"))
        assert firsts[0] == 0 and len(firsts) > 3
        for first in firsts:
            assert next(iter(log.read(first)))[0] == first
            assert (log.directory / segment_name(first)).stat().st_size <= TINY_SEGMENT_BYTES

    def test_append_async_groups_commits(self, make):
        log = make()

        async def main():
            await asyncio.gather(*(log.append_async([payload("g", i)]) for i in range(64)))

        asyncio.run(main())
        assert log.next_offset == 64
        assert log.fsyncs < 64


# --------------------------------------------------------------------------- files only

def record_positions(segment: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the records in a segment file."""
    data, out, pos = segment.read_bytes(), [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "little")
        out.append((pos, pos + 8 + length))
        pos += 8 + length
    return out


def make_log(directory: Path, count: int, **options) -> list[bytes]:
    items = [payload("item", i) * 4 for i in range(count)]
    with SegmentLog(directory, **options) as log:
        for i in range(0, count, 3):
            log.append(items[i:i + 3])
    return items


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_torn_tail_is_truncated_and_reported(tmp_path):
    directory = tmp_path / "log"
    items = make_log(directory, 10)
    segment = directory / segment_name(0)
    size = segment.stat().st_size
    with open(segment, "ab") as f:                 # a record cut short by a crash
        f.write((100).to_bytes(4, "little") + b"\0\0\0\0" + b"partial")
    with SegmentLog(directory) as log:
        assert log.torn_tail == TornTail(segment=str(segment), offset=10, position=size,
                                         bytes_dropped=15)
        assert segment.stat().st_size == size
        assert [p for _, p in log.read()] == items
        assert log.append([b"next"]) == 10
    with SegmentLog(directory) as log:
        assert log.torn_tail is None
        assert log.next_offset == 11


def test_torn_header_and_bad_crc_in_final_record_are_tails(tmp_path):
    directory = tmp_path / "log"
    items = make_log(directory, 6)
    segment = directory / segment_name(0)
    last_start, last_end = record_positions(segment)[-1]
    data = bytearray(segment.read_bytes())
    data[last_end - 1] ^= 0x01                     # the final record's payload
    segment.write_bytes(bytes(data) + b"\x05\x00")  # and a torn header after it
    with SegmentLog(directory) as log:
        assert log.torn_tail.offset == 5
        assert log.torn_tail.position == last_start
        assert log.torn_tail.bytes_dropped == len(data) + 2 - last_start
        assert [p for _, p in log.read()] == items[:5]


def test_flipped_bit_in_a_middle_record_refuses_to_open(tmp_path):
    directory = tmp_path / "log"
    make_log(directory, 10)
    segment = directory / segment_name(0)
    start, end = record_positions(segment)[4]
    data = bytearray(segment.read_bytes())
    data[start + 10] ^= 0x10
    segment.write_bytes(bytes(data))
    before = tree(directory)
    for readonly in (False, True):
        with pytest.raises(CorruptLog) as caught:
            SegmentLog(directory, readonly=readonly)
        assert caught.value.path == str(segment)
        assert caught.value.offset == 4
        assert str(caught.value).startswith(f"{segment}: offset 4: ")
    assert tree(directory) == before               # nothing truncated


def test_reader_of_an_open_log_raises_on_a_middle_bad_record(tmp_path):
    directory = tmp_path / "log"
    with SegmentLog(directory) as log:
        log.append([payload("m", i) for i in range(5)])
        segment = directory / segment_name(0)
        start, _ = record_positions(segment)[2]
        data = bytearray(segment.read_bytes())
        data[start] ^= 0x04                        # the length field
        segment.write_bytes(bytes(data))
        with pytest.raises(CorruptLog) as caught:
            list(log.read())
        assert caught.value.offset == 2
        assert list(log.read(0, 2)) == [(0, payload("m", 0)), (1, payload("m", 1))]


def test_bad_record_in_an_older_segment_refuses_to_open(tmp_path):
    directory = tmp_path / "log"
    make_log(directory, 40, segment_bytes=TINY_SEGMENT_BYTES)
    firsts = sorted(int(p.name[:20]) for p in directory.glob("*.seg"))
    segment = directory / segment_name(firsts[1])
    start, _ = record_positions(segment)[-1]        # its final record: not a tail
    data = bytearray(segment.read_bytes())
    data[start + 9] ^= 0x80
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as caught:
        SegmentLog(directory, segment_bytes=TINY_SEGMENT_BYTES)
    assert caught.value.path == str(segment)
    assert caught.value.offset == firsts[2] - 1


def test_missing_segment_refuses_to_open(tmp_path):
    directory = tmp_path / "log"
    make_log(directory, 40, segment_bytes=TINY_SEGMENT_BYTES)
    firsts = sorted(int(p.name[:20]) for p in directory.glob("*.seg"))
    (directory / segment_name(firsts[1])).unlink()
    with pytest.raises(CorruptLog) as caught:
        SegmentLog(directory, readonly=True)
    assert caught.value.offset == firsts[1]


def test_readonly_writes_nothing_and_reports_the_torn_tail(tmp_path):
    directory = tmp_path / "log"
    items = make_log(directory, 8)
    (directory / LOCK_NAME).unlink()
    segment = directory / segment_name(0)
    with open(segment, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    before = tree(directory)
    log = SegmentLog(directory, readonly=True)
    assert log.torn_tail.offset == 8
    assert log.torn_tail.bytes_dropped == 8
    assert log.next_offset == 8
    assert [p for _, p in log.read()] == items
    with pytest.raises(LogError):
        log.append([b"no"])
    log.sync()
    log.close()
    assert tree(directory) == before
    assert not (directory / LOCK_NAME).exists()


def test_readonly_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(LogError):
        SegmentLog(tmp_path / "absent" / "log", readonly=True)
    with pytest.raises(LogError):
        SegmentLog(tmp_path / "absent" / "log", create=False)
    assert list(tmp_path.iterdir()) == []


def test_second_writer_is_refused(tmp_path):
    directory = tmp_path / "log"
    first = SegmentLog(directory)
    with pytest.raises(LogError, match="lock"):
        SegmentLog(directory)
    reader = SegmentLog(directory, readonly=True)  # readers need no lock
    first.append([b"a"])
    assert list(reader.read()) == [(0, b"a")]
    first.close()
    with SegmentLog(directory) as second:
        assert second.next_offset == 1


def test_sync_and_fsync_false(tmp_path):
    directory = tmp_path / "log"
    with SegmentLog(directory, fsync=False) as log:
        for i in range(100):
            log.append([payload("s", i)])
        assert log.fsyncs == 0
        log.sync()
        assert log.fsyncs == 1
        assert asyncio.run(log.append_async([b"fast"])) == 100
    with SegmentLog(directory) as log:
        assert log.next_offset == 101


def test_snapshots_save_load_newest_and_skip_corrupt(tmp_path):
    snapshots = tmp_path / "snapshots"
    assert load_snapshot(snapshots) is None
    assert not snapshots.exists()
    for offset in (10, 20, 30, 40):
        save_snapshot(snapshots, offset, f"state@{offset}".encode())
    names = sorted(p.name for p in snapshots.iterdir())
    assert names == [f"{o:020d}.snap" for o in (20, 30, 40)]   # at most 3, no temp files
    assert load_snapshot(snapshots) == (40, b"state@40")
    newest = snapshots / f"{40:020d}.snap"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0x01
    newest.write_bytes(bytes(data))
    before = tree(snapshots)
    assert load_snapshot(snapshots) == (30, b"state@30")
    assert tree(snapshots) == before                              # load writes nothing
    (snapshots / f"{30:020d}.snap").write_bytes(b"short")
    assert load_snapshot(snapshots) == (20, b"state@20")


def test_snapshot_offset_must_match_its_name(tmp_path):
    snapshots = tmp_path / "snapshots"
    save_snapshot(snapshots, 7, b"seven")
    (snapshots / f"{7:020d}.snap").rename(snapshots / f"{9:020d}.snap")
    assert load_snapshot(snapshots) is None


def test_readonly_follow_while_another_process_appends(tmp_path):
    directory = tmp_path / "log"
    directory.mkdir()
    total = 3000
    writer = subprocess.Popen([sys.executable, "-c", f"""
from vmresize.events.log import SegmentLog
with SegmentLog({str(directory)!r}, fsync=False, segment_bytes=4096) as log:
    for i in range({total}):
        log.append([b"p-%d" % i])
"""])
    try:
        reader = SegmentLog(directory, readonly=True)
        stop = threading.Event()
        # Never hang: a failed writer or a minute without the end stops the follow.
        def watch() -> None:
            try:
                failed = writer.wait(timeout=60) != 0
            except subprocess.TimeoutExpired:
                failed = True
            if failed:
                stop.set()

        threading.Thread(target=watch, daemon=True).start()
        got = []
        for offset, item in reader.follow(0, poll_s=0.005, stop_event=stop):
            got.append((offset, item))
            if offset == total - 1:
                stop.set()
        assert got == [(i, b"p-%d" % i) for i in range(total)]
    finally:
        assert writer.wait(timeout=60) == 0
