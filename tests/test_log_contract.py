"""The log contract, run over every backend; then what only the file backend promises."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmresize.events import log as log_module
from vmresize.events.disk import OsDisk, SimDisk
from vmresize.events.log import (LOCK_NAME, CorruptLog, DiskFull, LogError, LogFailed,
                                 MemoryLog, SegmentLog, TornTail, load_snapshot,
                                 save_snapshot, segment_name)

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


class SpyDisk(OsDisk):
    """The real file system, remembering what each file held at its last fsync (the
    log writes into preallocated zeros, so a size would say nothing)."""

    def __init__(self) -> None:
        self.fsyncs = 0
        self._paths: dict[int, str] = {}
        self._synced: dict[str, bytes] = {}

    def open(self, path, mode: str) -> int:
        fd = super().open(path, mode)
        self._paths[fd] = str(path)
        return fd

    def fsync(self, fd: int) -> None:
        with open(self._paths[fd], "rb") as f:
            content = f.read()
        os.fsync(fd)
        self.fsyncs += 1
        self._synced[self._paths[fd]] = content

    def durable_bytes(self, path) -> bytes:
        return self._synced.get(str(path), b"")


def durable_payloads(log: SegmentLog) -> bytes:
    """Every segment's bytes that an fsync covered, joined."""
    names = sorted(n for n in log.disk.list_dir(log.directory) if n.endswith(".seg"))
    return b"".join(log.disk.durable_bytes(log.directory / n) for n in names)


def preallocations(log: SegmentLog) -> int:
    """At most how many fsyncs of zero-filled space the log's segments took: one per
    `preallocate` bytes, one short of it at the segment's end, one cut off when it
    rolled over."""
    if not log.disk.preallocate:
        return 0
    names = [n for n in log.disk.list_dir(log.directory) if n.endswith(".seg")]
    return sum(-(-log.disk.file_size(log.directory / n) // log.disk.preallocate) + 2
               for n in names)


class TestSegmentLog(LogContract):
    @pytest.fixture
    def disk(self):
        return SpyDisk()

    @pytest.fixture
    def base(self, tmp_path):
        return tmp_path

    @pytest.fixture
    def make(self, disk, base):
        logs = []

        def factory(**options):
            logs.append(SegmentLog(base / f"log{len(logs)}", disk=disk, **options))
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
        again = SegmentLog(log.directory, segment_bytes=TINY_SEGMENT_BYTES, disk=log.disk)
        assert again.torn_tail is None
        assert again.next_offset == 50
        assert list(again.read()) == list(enumerate(items))
        assert again.append([b"more"]) == 50
        again.close()
        readonly = SegmentLog(log.directory, readonly=True, disk=log.disk)
        assert len(list(readonly.read())) == 51

    def test_segment_files_are_named_by_first_offset(self, make):
        log = make(segment_bytes=TINY_SEGMENT_BYTES)
        for i in range(30):
            log.append([payload("n", i) * 10])
        firsts = sorted(int(n[:20]) for n in log.disk.list_dir(log.directory)
                        if n.endswith(".seg"))
        assert firsts[0] == 0 and len(firsts) > 3
        for first in firsts:
            assert next(iter(log.read(first)))[0] == first
            assert log.disk.file_size(log.directory / segment_name(first)) <= TINY_SEGMENT_BYTES

    def test_append_async_groups_commits_and_acknowledges_only_durable_records(self, make):
        log = make()
        not_durable_when_acknowledged = []

        async def append(i: int) -> None:
            item = payload("g", i) + b"#"
            await log.append_async([item])
            if item not in durable_payloads(log):
                not_durable_when_acknowledged.append(item)

        async def main():
            await asyncio.gather(*(append(i) for i in range(64)))

        asyncio.run(main())
        assert log.next_offset == 64
        assert not_durable_when_acknowledged == []
        assert log.disk.fsyncs >= 1
        assert log.disk.fsyncs - preallocations(log) < 64, "one fsync must cover many appends"

    def test_threads_are_acknowledged_only_once_durable(self, make):
        log = make()
        missing = []

        def appender(t: int) -> None:
            for j in range(20):
                item = payload(f"t{t}", j) + b"#"
                log.append([item])
                if item not in durable_payloads(log):
                    missing.append(item)

        threads = [threading.Thread(target=appender, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert log.next_offset == 160 and missing == []
        assert 1 <= log.disk.fsyncs and log.disk.fsyncs - preallocations(log) <= 160


class TestSegmentLogOnSimDisk(TestSegmentLog):
    """The same contract on the simulated disk, with a writer thread as on a real one."""

    @pytest.fixture
    def disk(self):
        return SimDisk(random.Random(0), inline=False)

    @pytest.fixture
    def base(self):
        return Path("/sim")


class TestSegmentLogOnPreallocatingSimDisk(TestSegmentLogOnSimDisk):
    """The same contract when segments are zero-filled ahead of the appends, a little at
    a time so that the appends cross from preallocated space into new space often."""

    @pytest.fixture
    def disk(self):
        return SimDisk(random.Random(0), inline=False, preallocate=48)


class TestSegmentLogOnInlineSimDisk(LogContract):
    """The simulator's mode: every operation on the caller's thread, no writer thread."""

    @pytest.fixture
    def make(self):
        disk, logs = SimDisk(random.Random(0)), []

        def factory(**options):
            logs.append(SegmentLog(f"/sim/log{len(logs)}", disk=disk, **options))
            return logs[-1]

        yield factory
        for log in logs:
            assert log._writer is None, "an inline disk needs no writer thread"
            log.close()


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


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_readers_read_in_chunks_of_any_size(tmp_path, chunk):
    """A chunk smaller than a record, or than a header, still reads every record once."""
    items = make_log(tmp_path / "log", 20, segment_bytes=600)
    log = SegmentLog(tmp_path / "log", readonly=True, verify=False, read_chunk_bytes=chunk)
    assert [p for _, p in log.read()] == items
    assert [p for _, p in log.read(13, 17)] == items[13:17]


def test_read_chunk_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="read_chunk_bytes"):
        SegmentLog(tmp_path / "log", read_chunk_bytes=0)


def test_logs_read_together_share_a_bounded_buffer():
    from vmresize.events.store import MERGED_READ_BYTES, merged_chunk_bytes
    assert merged_chunk_bytes(1) == 1 << 20
    assert merged_chunk_bytes(100) * 100 <= MERGED_READ_BYTES
    assert merged_chunk_bytes(10_000) == 16 << 10       # never less than this


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


def test_a_preallocated_tail_is_the_end_of_the_log_not_a_torn_tail(tmp_path):
    directory, copy = tmp_path / "log", tmp_path / "copy"
    items = [payload("z", i) * 4 for i in range(10)]
    log = SegmentLog(directory)
    log.append(items[:6])
    segment = directory / segment_name(0)
    records_end = record_positions_before_zeros(segment)[-1][1]
    assert segment.stat().st_size == OsDisk.preallocate > records_end
    shutil.copytree(directory, copy)                # what a power cut now would leave
    log.close()
    assert segment.stat().st_size == records_end    # a closed log's files: records only
    with SegmentLog(copy) as again:
        assert again.torn_tail is None
        assert [p for _, p in again.read()] == items[:6]
        assert again.append(items[6:]) == 6         # written over the zeros in place
        assert (copy / segment_name(0)).stat().st_size == OsDisk.preallocate
        reader = SegmentLog(copy, readonly=True)
        assert reader.torn_tail is None and [p for _, p in reader.read()] == items
    assert (copy / segment_name(0)).stat().st_size == segment.stat().st_size + sum(
        8 + len(item) for item in items[6:])


class ReadCountingDisk(OsDisk):
    def __init__(self) -> None:
        self.read_bytes = 0

    def pread(self, handle, size: int, offset: int) -> bytes:
        data = super().pread(handle, size, offset)
        self.read_bytes += len(data)
        return data


def test_the_writer_reads_its_records_and_not_the_zeros_after_them(tmp_path):
    """A host serves its events from its own log again and again: each read must cost
    the records asked for, not the preallocated space after them."""
    disk = ReadCountingDisk()
    items = [payload("r", i) for i in range(20)]
    with SegmentLog(tmp_path / "log", disk=disk) as log:
        log.append(items)
        records_end = record_positions_before_zeros(tmp_path / "log" / segment_name(0))[-1][1]
        for start in (0, 10, 19, 20):
            disk.read_bytes = 0
            assert [p for _, p in log.read(start)] == items[start:]
            assert disk.read_bytes <= records_end, (start, disk.read_bytes)


@pytest.mark.parametrize("reopen", [False, True])
def test_a_read_of_a_few_records_starts_near_them_not_at_the_segment_start(
        tmp_path, monkeypatch, reopen):
    """A host answers a repeated command from the records it wrote: reading them must
    cost about those records, however long the segment has grown (and across a
    segment's roll-over, and after the log is opened again)."""
    monkeypatch.setattr(log_module, "MARK_EVERY", 8)
    disk = ReadCountingDisk()
    items = [payload("record", i) * 8 for i in range(3000)]      # ~100 bytes each
    segment_bytes = 200_000                                       # rolls over once
    log = SegmentLog(tmp_path / "log", disk=disk, segment_bytes=segment_bytes)
    for i in range(0, 1500, 3):
        log.append(items[i:i + 3])
    if reopen:
        log.close()
        log = SegmentLog(tmp_path / "log", disk=disk, segment_bytes=segment_bytes)
    for i in range(1500, 3000, 3):
        log.append(items[i:i + 3])
    with log:
        assert len(list(log_module._segments(disk, tmp_path / "log"))) == 2
        for start in (0, 7, 8, 1499, 1500, 1501, 2000, 2999):
            disk.read_bytes = 0
            assert [p for _, p in log.read(start, start + 1)] == [items[start]]
            if start >= 2200:       # marks in the last segment
                assert disk.read_bytes < 3_000, (start, disk.read_bytes)
        assert [p for _, p in log.read(1490, 2910)] == items[1490:2910]
        assert [p for _, p in log.read(2995)] == items[2995:]


def record_positions_before_zeros(segment: Path) -> list[tuple[int, int]]:
    data = segment.read_bytes()
    out, pos = [], 0
    while pos + 8 <= len(data) and (length := int.from_bytes(data[pos:pos + 4], "little")):
        out.append((pos, pos + 8 + length))
        pos += 8 + length
    return out


def preallocated_log(directory: Path, sizes: list[int]) -> tuple[list[bytes], Path]:
    """A log left open as a power cut would leave it: records, then preallocated zeros."""
    items = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
    work = directory.parent / (directory.name + "-open")
    log = SegmentLog(work)
    log.append(items)
    shutil.copytree(work, directory)
    log.close()
    return items, directory / segment_name(0)


def test_zero_pages_inside_the_last_write_make_a_torn_tail(tmp_path):
    """A power cut during an overwrite of preallocated space may keep a later page of
    the write and lose an earlier one: the records after the zeroed page were never
    acknowledged, so they are dropped with it rather than refusing to open."""
    directory = tmp_path / "log"
    items, segment = preallocated_log(directory, [100, 200, 5000, 3000, 200])
    spans = record_positions_before_zeros(segment)
    page = -(-spans[2][0] // 4096) * 4096           # a page inside records 2 and 3
    assert spans[2][0] < page and page + 4096 < spans[4][0]
    data = bytearray(segment.read_bytes())
    data[page:page + 4096] = bytes(4096)            # that page never reached the disk
    segment.write_bytes(bytes(data))
    for readonly in (True, False):
        with SegmentLog(directory, readonly=readonly) as log:
            assert log.torn_tail == TornTail(segment=str(segment), offset=2,
                                             position=spans[2][0],
                                             bytes_dropped=len(data) - spans[2][0])
            assert [p for _, p in log.read()] == items[:2]


def test_zeros_short_of_a_page_before_a_valid_record_refuse_to_open(tmp_path):
    """Only whole zero pages are a lost overwrite: a zeroed header with valid records
    after it is damage before the tail."""
    directory = tmp_path / "log"
    items, segment = preallocated_log(directory, [100, 200, 5000, 3000, 200])
    spans = record_positions_before_zeros(segment)
    data = bytearray(segment.read_bytes())
    data[spans[1][0]:spans[1][0] + 8] = bytes(8)
    segment.write_bytes(bytes(data))
    for readonly in (False, True):
        with pytest.raises(CorruptLog) as caught:
            SegmentLog(directory, readonly=readonly)
        assert (caught.value.path, caught.value.offset) == (str(segment), 1)


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


class CountingDisk(OsDisk):
    """The real file system, counting the bytes read from each file."""

    def __init__(self):
        self.read_bytes: dict[str, int] = {}
        self.paths: dict[int, str] = {}

    def open(self, path, mode: str):
        handle = super().open(path, mode)
        self.paths[handle] = str(path)
        return handle

    def pread(self, handle, size: int, offset: int) -> bytes:
        data = super().pread(handle, size, offset)
        path = self.paths[handle]
        self.read_bytes[path] = self.read_bytes.get(path, 0) + len(data)
        return data


def _torn_log(directory: Path, records: int, segment_bytes: int | None = None) -> list:
    kw = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
    items = make_log(directory, records, **kw)
    last = max(directory.glob("*.seg"))
    with open(last, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    return items


@pytest.mark.parametrize("segment_bytes", [None, TINY_SEGMENT_BYTES])
def test_readonly_unverified_reads_each_record_once_and_finds_the_tail_on_the_way(
        tmp_path, segment_bytes):
    directory = tmp_path / "log"
    items = _torn_log(directory, 30, segment_bytes)
    eager = SegmentLog(directory, readonly=True)
    disk = CountingDisk()
    log = SegmentLog(directory, readonly=True, verify=False, disk=disk)
    assert disk.read_bytes == {}                      # nothing scanned on open
    assert [p for _, p in log.read()] == items
    # every record read once; the torn bytes once more, to tell a tail from corruption
    sizes = {str(f): f.stat().st_size for f in directory.glob("*.seg")}
    last = str(max(directory.glob("*.seg")))
    read_once = sizes | {last: sizes[last] + 8}
    assert disk.read_bytes == read_once
    assert log.torn_tail == eager.torn_tail and log.torn_tail.offset == 30
    assert log.next_offset == eager.next_offset == 30
    assert disk.read_bytes == read_once               # the read found both


def test_readonly_unverified_finds_the_tail_when_asked_or_after_a_partial_read(tmp_path):
    directory = tmp_path / "log"
    items = _torn_log(directory, 12)
    eager = SegmentLog(directory, readonly=True)
    asked = SegmentLog(directory, readonly=True, verify=False)
    assert asked.torn_tail == eager.torn_tail and asked.torn_tail.bytes_dropped == 8
    partial = SegmentLog(directory, readonly=True, verify=False)
    assert [p for _, p in partial.read(0, 5)] == items[:5]
    assert [p for _, p in partial.read(3, 12)] == items[3:]    # stops at 12: the end unseen
    assert partial.next_offset == 12 and partial.torn_tail == eager.torn_tail
    clean = tmp_path / "clean"
    make_log(clean, 4)
    log = SegmentLog(clean, readonly=True, verify=False)
    assert len(list(log.read(2))) == 2
    assert log.torn_tail is None and log.next_offset == 4


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
    skipped = []
    report = lambda path, reason: skipped.append((path, reason))       # noqa: E731
    assert load_snapshot(snapshots, report=report) == (30, b"state@30")
    assert skipped == [(str(newest), "CRC mismatch")]
    assert tree(snapshots) == before                              # load writes nothing
    (snapshots / f"{30:020d}.snap").write_bytes(b"short")
    assert load_snapshot(snapshots, report=report) == (20, b"state@20")
    assert len(skipped) == 3 and "shorter than its header" in skipped[-1][1]


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


# --------------------------------------------------------------------------- durability and faults
# On the simulated disk: a blocking fsync, a full disk, a failing fsync, a power cut.

SIM_LOG = Path("/sim/log")


class PowerCut(Exception):
    """Raised from inside an fsync: the machine lost power before the fsync returned."""


class HeldFsync:
    """An `on_fsync` hook that holds every fsync of a segment until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: str) -> None:
        if path.endswith(".seg"):
            self.entered.set()
            assert self.release.wait(30), "the test never released the fsync"


def sim_log(inline: bool = False, **options) -> tuple[SimDisk, SegmentLog]:
    disk = SimDisk(random.Random(1), inline=inline)
    return disk, SegmentLog(SIM_LOG, disk=disk, **options)


def reopened(disk: SimDisk, **options) -> SegmentLog:
    return SegmentLog(SIM_LOG, disk=disk, **options)


def test_append_returns_only_after_its_fsync_returned():
    disk, log = sim_log()
    log.append([b"first"])
    held = HeldFsync()
    disk.on_fsync = held
    returned = {}

    def append(item: bytes) -> None:
        returned[item] = log.append([item])

    leader = threading.Thread(target=append, args=(b"a",))
    leader.start()
    assert held.entered.wait(10)                # "a" is in flight, its fsync held
    held.entered.clear()
    others = [threading.Thread(target=append, args=(item,)) for item in (b"b", b"c")]
    for thread in others:
        thread.start()
    # "b" and "c" queue behind "a"; none of the three may return while an fsync is held.
    for thread in [leader, *others]:
        thread.join(0.1)
    assert returned == {} and all(t.is_alive() for t in [leader, *others])
    held.release.set()
    for thread in [leader, *others]:
        thread.join(10)
    assert sorted(returned) == [b"a", b"b", b"c"]
    disk.crash(keep_bytes=0)                    # every acknowledged record was durable
    with reopened(disk) as log:
        assert sorted(p for _, p in log.read()) == [b"a", b"b", b"c", b"first"]


def test_append_async_resolves_only_after_its_fsync_returned():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(log.append_async([payload("a", i)])) for i in range(8)]
        entered = loop.run_in_executor(None, held.entered.wait, 10)
        first, _ = await asyncio.wait([entered, *tasks], timeout=10,
                                      return_when=asyncio.FIRST_COMPLETED)
        assert first == {entered}, "acknowledged before any fsync was called"
        done, _ = await asyncio.wait(tasks, timeout=0.2)   # the loop runs on meanwhile
        assert done == set(), "resolved while its fsync was held"
        held.release.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert sorted(asyncio.run(main())) == list(range(8))
    log.close()
    disk.crash(keep_bytes=0)
    with reopened(disk) as again:
        assert sorted(p for _, p in again.read()) == sorted(payload("a", i) for i in range(8))


def test_a_coroutine_queued_behind_a_thread_is_written():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held
    thread = threading.Thread(target=log.append, args=([b"thread"],))
    thread.start()
    assert held.entered.wait(10)                # the thread leads; its fsync is held

    async def main():
        task = asyncio.create_task(log.append_async([b"coroutine"]))
        await asyncio.sleep(0)                  # queued behind the thread's batch
        held.release.set()
        await asyncio.wait([task], timeout=10)
        return task.result()

    assert asyncio.run(main()) == 1
    thread.join(10)
    log.close()


def test_a_cancelled_appender_does_not_cancel_the_rest_of_its_batch():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        tasks = [asyncio.create_task(log.append_async([payload("c", i)])) for i in range(4)]
        await asyncio.get_running_loop().run_in_executor(None, held.entered.wait, 10)
        tasks[1].cancel()
        # The cancelled appender returns at once; the others wait for the held fsync.
        done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done == {tasks[1]}
        done, _ = await asyncio.wait(tasks, timeout=0.2)
        assert done == {tasks[1]}, "acknowledged while its fsync was held"
        held.release.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 1] == [0, 2, 3]
    assert [p for _, p in log.read()] == [payload("c", i) for i in range(4)]   # kept
    log.close()


def test_appenders_cancelled_together_leave_the_rest_of_their_batch_waiting():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        tasks = [asyncio.create_task(log.append_async([payload("t", i)])) for i in range(6)]
        await asyncio.get_running_loop().run_in_executor(None, held.entered.wait, 10)
        tasks[0].cancel()
        await asyncio.sleep(0)            # the others have seen the first cancellation
        tasks[4].cancel()
        done, _ = await asyncio.wait(tasks, timeout=0.2)
        assert done == {tasks[0], tasks[4]}
        held.release.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert all(isinstance(results[i], asyncio.CancelledError) for i in (0, 4))
    assert [r for i, r in enumerate(results) if i not in (0, 4)] == [1, 2, 3, 5]
    assert [p for _, p in log.read()] == [payload("t", i) for i in range(6)]
    log.close()


def test_an_appender_cancelled_after_its_batch_is_durable_leaves_no_one_waiting():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        tasks = [asyncio.create_task(log.append_async([payload("d", i)])) for i in range(4)]
        await asyncio.get_running_loop().run_in_executor(None, held.entered.wait, 10)
        held.release.set()
        log.sync()      # blocks this loop until the batch is durable: its wake-up waits
        tasks[2].cancel()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3]
    log.close()


def test_append_async_from_two_event_loops_at_once_is_refused():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held
    first = {}

    def other_loop() -> None:
        first["offset"] = asyncio.run(log.append_async([b"loop-1"]))

    thread = threading.Thread(target=other_loop)
    thread.start()
    assert held.entered.wait(10)                # its batch is in flight, its loop waits
    with pytest.raises(LogError, match="two event loops"):
        asyncio.run(log.append_async([b"loop-2"]))
    held.release.set()
    thread.join(10)
    assert first == {"offset": 0}
    assert asyncio.run(log.append_async([b"loop-3"])) == 1     # that loop is gone now
    assert [p for _, p in log.read()] == [b"loop-1", b"loop-3"]
    log.close()


def test_a_full_disk_refuses_the_append_and_the_log_goes_on():
    disk, log = sim_log(inline=True)
    log.append([b"before-1", b"before-2"])
    segment = SIM_LOG / segment_name(0)
    size = disk.file_size(segment)
    disk.set_free_bytes(20)                              # room for part of the batch
    with pytest.raises(DiskFull) as caught:
        log.append([b"x" * 8, b"y" * 8, b"z" * 8])
    assert str(SIM_LOG) in str(caught.value) and caught.value.directory == str(SIM_LOG)
    assert disk.file_size(segment) == size, "the partial write is truncated away"
    assert log.next_offset == 2
    assert [p for _, p in log.read()] == [b"before-1", b"before-2"]
    with pytest.raises(DiskFull):                        # still full: refused again
        log.append([b"w" * 30])
    disk.set_free_bytes(None)
    assert log.append([b"after"]) == 2                   # the offsets did not move
    disk.crash()
    with reopened(disk) as again:
        assert again.torn_tail is None
        assert [p for _, p in again.read()] == [b"before-1", b"before-2", b"after"]


def test_a_full_disk_appends_into_preallocated_space_then_grows_without_it():
    disk = SimDisk(random.Random(1), preallocate=1024)
    log = SegmentLog(SIM_LOG, disk=disk)
    segment = SIM_LOG / segment_name(0)
    items = [payload("p", i) * 10 for i in range(40)]
    ends = [sum(8 + len(item) for item in items[:i + 1]) for i in range(len(items))]
    fit = sum(1 for end in ends if end <= 1024)               # records inside 1024 bytes
    log.append(items[:1])
    assert disk.file_size(segment) == 1024
    disk.set_free_bytes(0)
    for i in range(1, fit):
        assert log.append([items[i]]) == i                     # no space needed
    with pytest.raises(DiskFull):                              # no room to grow at all
        log.append([items[fit]])
    # What the refused append wrote is cut, and the zeros after the records with it.
    assert disk.file_size(segment) == ends[fit - 1]
    disk.set_free_bytes(ends[fit] - ends[fit - 1])             # room for the record only
    assert log.append([items[fit]]) == fit
    assert disk.file_size(segment) == ends[fit]
    disk.set_free_bytes(None)
    assert log.append(items[fit + 1:]) == fit + 1
    disk.crash(keep_bytes=0)
    with reopened(disk) as again:
        assert again.torn_tail is None
        assert [p for _, p in again.read()] == items


def test_a_refused_append_never_comes_back_after_a_crash():
    for seed in range(30):
        disk = SimDisk(random.Random(seed))
        with SegmentLog(SIM_LOG, disk=disk) as log:
            log.append([b"kept"])
            disk.set_free_bytes(8 + 4 + 8 + 2)           # one whole record fits, not two
            with pytest.raises(DiskFull):
                log.append([b"lost", b"also-lost"])
        disk.crash()
        with reopened(disk) as again:
            assert [p for _, p in again.read()] == [b"kept"], f"seed {seed}"


def test_a_full_disk_fails_every_appender_queued_behind_the_batch():
    disk, log = sim_log()
    log.append([b"zero"])
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        first = asyncio.create_task(log.append_async([b"one"]))
        await asyncio.get_running_loop().run_in_executor(None, held.entered.wait, 10)
        queued = [asyncio.create_task(log.append_async([payload("q", i)])) for i in range(3)]
        await asyncio.sleep(0)                           # they are queued now
        disk.set_free_bytes(0)
        held.release.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        disk.set_free_bytes(None)
        return results, await log.append_async([b"two"])

    results, offset = asyncio.run(main())
    assert results[0] == 1
    assert all(isinstance(r, DiskFull) for r in results[1:])
    assert offset == 2
    assert [p for _, p in log.read()] == [b"zero", b"one", b"two"]
    log.close()


def test_a_full_disk_when_a_segment_rolls_over():
    disk, log = sim_log(inline=True, segment_bytes=64)
    items = [payload("r", i) * 3 for i in range(6)]
    for item in items[:4]:
        log.append([item])
    disk.set_free_bytes(0)
    with pytest.raises(DiskFull):
        log.append([items[4]])
    disk.set_free_bytes(None)
    assert log.append([items[4], items[5]]) == 4
    log.close()
    disk.crash(keep_bytes=0)
    with reopened(disk, segment_bytes=64) as again:
        assert again.torn_tail is None
        assert [p for _, p in again.read()] == items


def test_a_failed_fsync_stops_the_log_until_it_is_reopened():
    disk, log = sim_log(inline=True)
    log.append([b"acknowledged"])
    disk.fail_fsync()
    with pytest.raises(LogFailed) as caught:
        log.append([b"unknown"])
    assert "fsync failed" in str(caught.value) and str(SIM_LOG) in str(caught.value)
    fsyncs = disk.fsyncs
    for _ in range(2):                     # fsync works again, but the log never retries
        with pytest.raises(LogFailed):
            log.append([b"later"])
    with pytest.raises(LogFailed):
        asyncio.run(log.append_async([b"later"]))
    with pytest.raises(LogFailed):
        log.sync()
    assert disk.fsyncs == fsyncs
    log.close()
    disk.crash(keep_bytes=10 ** 6)          # the kernel dropped the pages it failed to write
    with reopened(disk) as again:
        assert [p for _, p in again.read()] == [b"acknowledged"]
        assert again.append([b"next"]) == 1


def test_a_failed_fsync_fails_every_pending_appender():
    disk, log = sim_log()
    held = HeldFsync()
    disk.on_fsync = held

    async def main():
        first = asyncio.create_task(log.append_async([b"one"]))
        await asyncio.get_running_loop().run_in_executor(None, held.entered.wait, 10)
        queued = [asyncio.create_task(log.append_async([payload("q", i)])) for i in range(3)]
        await asyncio.sleep(0)
        disk.fail_fsync()
        held.release.set()
        return await asyncio.gather(first, *queued, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, LogFailed) for r in results), results
    with pytest.raises(LogFailed):
        log.append([b"later"])
    log.close()
    disk.crash()                            # nothing was acknowledged, nothing survives
    with reopened(disk) as again:
        assert list(again.read()) == [] and again.append([b"after"]) == 0


def test_power_cut_during_the_fsync_keeps_every_acknowledged_record():
    disk, log = sim_log(inline=True, segment_bytes=200)
    acknowledged = []
    for i in range(12):
        batch = [payload("p", i * 3 + k) * (1 + k) for k in range(3)]
        log.append(batch)
        acknowledged += batch

    def cut(path: str) -> None:
        if path.endswith(".seg"):
            disk.crash()
            raise PowerCut()

    disk.on_fsync = cut
    with pytest.raises(PowerCut):
        log.append([b"in-flight-1", b"in-flight-2"])
    disk.on_fsync = None
    with reopened(disk, segment_bytes=200) as again:
        records = [p for _, p in again.read()]
        assert records[:len(acknowledged)] == acknowledged
        assert records[len(acknowledged):] in ([], [b"in-flight-1"],
                                               [b"in-flight-1", b"in-flight-2"])


SIM_SNAPSHOTS = Path("/sim/snapshots")


def test_a_corrupt_snapshot_is_reported_and_an_older_one_used():
    disk = SimDisk(random.Random(3))
    for offset in (10, 20, 30):
        save_snapshot(SIM_SNAPSHOTS, offset, b"state@%d" % offset * 50, disk=disk)
    skipped = []
    report = lambda path, reason: skipped.append((path, reason))       # noqa: E731
    disk.corrupt(SIM_SNAPSHOTS / f"{30:020d}.snap")                      # any bit of it
    assert load_snapshot(SIM_SNAPSHOTS, disk=disk, report=report) == (20, b"state@20" * 50)
    assert [p for p, _ in skipped] == [str(SIM_SNAPSHOTS / f"{30:020d}.snap")]
    for offset in (20, 10):
        disk.corrupt(SIM_SNAPSHOTS / f"{offset:020d}.snap")
    skipped.clear()
    assert load_snapshot(SIM_SNAPSHOTS, disk=disk, report=report) is None   # replay the log
    assert len(skipped) == 3


def test_a_corrupt_snapshot_is_logged_by_default(caplog):
    disk = SimDisk(random.Random(4))
    save_snapshot(SIM_SNAPSHOTS, 5, b"five", disk=disk)
    disk.corrupt(SIM_SNAPSHOTS / f"{5:020d}.snap", offset=0)
    with caplog.at_level("WARNING", logger="vmresize.events.log"):
        assert load_snapshot(SIM_SNAPSHOTS, disk=disk) is None
    assert "00000000000000000005.snap skipped" in caplog.text


@pytest.mark.parametrize("seed", range(6))
def test_power_cut_at_any_point_of_a_snapshot_save(seed):
    """Whatever a power cut leaves of a save, loading finds the new snapshot or the old
    one, never a broken one, and never raises."""
    calls = 0
    while True:
        disk = SimDisk(random.Random(seed))
        save_snapshot(SIM_SNAPSHOTS, 10, b"old" * 100, disk=disk)
        seen = []

        def cut(path: str) -> None:
            seen.append(path)
            if len(seen) > calls:
                disk.crash()
                raise PowerCut()

        disk.on_fsync = cut
        try:
            save_snapshot(SIM_SNAPSHOTS, 20, b"new" * 100, disk=disk)
        except PowerCut:
            pass
        else:
            break                                     # no fsync left to cut at
        finally:
            disk.on_fsync = None
        assert load_snapshot(SIM_SNAPSHOTS, disk=disk, report=lambda *a: None) in (
            (10, b"old" * 100), (20, b"new" * 100))
        calls += 1
    assert calls >= 2                                 # the file's fsync and the directory's
