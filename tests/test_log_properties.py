"""Properties of SegmentLog recovery: a cut keeps exactly the whole records before it; a
flipped bit is always caught, never read back as a wrong payload; a power cut on the
simulated disk never loses an acknowledged record."""
from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmresize.events.disk import SimDisk
from vmresize.events.log import CorruptLog, SegmentLog, TornTail, segment_name

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)

payloads = st.binary(min_size=1, max_size=48)
batches = st.lists(st.lists(payloads, min_size=1, max_size=6), min_size=1, max_size=12)
segment_sizes = st.sampled_from([64, 200, 4096])


def write(directory: Path, batches: list[list[bytes]], segment_bytes: int) -> list[bytes]:
    # Durability is not under test here, and fsync would only make the test slow.
    with SegmentLog(directory, fsync=False, segment_bytes=segment_bytes) as log:
        for batch in batches:
            log.append(batch)
    return [item for batch in batches for item in batch]


def layout(directory: Path) -> list[tuple[Path, int, int]]:
    """(segment file, start, end) of every record, in offset order."""
    out = []
    for segment in sorted(directory.glob("*.seg")):
        data, pos = segment.read_bytes(), 0
        while pos < len(data):
            end = pos + 8 + int.from_bytes(data[pos:pos + 4], "little")
            out.append((segment, pos, end))
            pos = end
    return out


@PROPERTY_SETTINGS
@given(batches=batches, segment_bytes=segment_sizes, data=st.data())
def test_cut_last_segment_keeps_the_records_before_the_cut(batches, segment_bytes, data):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "log"
        items = write(directory, batches, segment_bytes)
        records = layout(directory)
        last = sorted(directory.glob("*.seg"))[-1]
        cut = data.draw(st.integers(0, last.stat().st_size), label="cut")
        last.write_bytes(last.read_bytes()[:cut])

        kept = [i for i, (seg, _, end) in enumerate(records) if seg != last or end <= cut]
        assert kept == list(range(len(kept)))           # the survivors are a prefix
        with SegmentLog(directory, segment_bytes=segment_bytes) as log:
            assert list(log.read()) == list(enumerate(items[:len(kept)]))
            assert log.next_offset == len(kept)
            boundary = max([end for seg, _, end in records if seg == last and end <= cut],
                           default=0)
            if boundary == cut:
                assert log.torn_tail is None
            else:
                assert log.torn_tail == TornTail(segment=str(last), offset=len(kept),
                                                 position=boundary,
                                                 bytes_dropped=cut - boundary)
            assert last.stat().st_size == boundary      # the writer truncated the tail


@PROPERTY_SETTINGS
@given(batches=batches, segment_bytes=segment_sizes, data=st.data())
def test_a_flipped_bit_is_always_detected(batches, segment_bytes, data):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "log"
        items = write(directory, batches, segment_bytes)
        records = layout(directory)
        victim = data.draw(st.integers(0, len(records) - 1), label="record")
        segment, start, end = records[victim]
        bit = data.draw(st.integers(0, (end - start) * 8 - 1), label="bit")
        content = bytearray(segment.read_bytes())
        content[start + bit // 8] ^= 1 << (bit % 8)
        segment.write_bytes(bytes(content))

        is_tail = (segment == sorted(directory.glob("*.seg"))[-1]
                   and end == len(content))
        for readonly in (True, False):
            try:
                log = SegmentLog(directory, readonly=readonly, segment_bytes=segment_bytes)
            except CorruptLog as caught:
                assert not is_tail, "the final record's damage is a torn tail"
                assert (caught.path, caught.offset) == (str(segment), victim)
                continue
            assert is_tail, "damage before the tail must refuse to open"
            with log:
                assert log.torn_tail == TornTail(segment=str(segment), offset=victim,
                                                 position=start, bytes_dropped=end - start)
                assert list(log.read()) == list(enumerate(items[:victim]))


# --------------------------------------------------------------------------- crash harness
# In the manner of SQLite's crash tests: build a log, cut it at every byte of its last
# batches (a power cut on the simulated disk, and real files truncated), reopen through
# the real recovery path, and check what comes back.

SIM_DIR = Path("/sim/log")
HEADER_BYTES = 8


class PowerCut(Exception):
    pass


def acked_batches(n: int) -> list[list[bytes]]:
    return [[b"ack-%d-%d-" % (i, k) + b"x" * (i % 5) for k in range(1 + i % 3)]
            for i in range(n)]


def record_ends(items: list[bytes]) -> list[int]:
    """Byte position, from the batch's start, where each of its records ends."""
    ends, pos = [], 0
    for item in items:
        pos += HEADER_BYTES + len(item)
        ends.append(pos)
    return ends


def cut_during_last_fsync(keep_bytes: int | None, keep_changes: int | None, seed: int,
                          acked: list[list[bytes]], last: list[bytes],
                          segment_bytes: int, preallocate: int = 0) -> SimDisk:
    """Append `acked` (each acknowledged), then `last`, whose fsync the power cuts."""
    disk = SimDisk(random.Random(seed), preallocate=preallocate)
    log = SegmentLog(SIM_DIR, disk=disk, segment_bytes=segment_bytes)
    for batch in acked:
        log.append(batch)

    def cut(path: str) -> None:
        if path.endswith(".seg"):
            disk.crash(keep_bytes, keep_changes)
            raise PowerCut()

    disk.on_fsync = cut
    try:
        log.append(last)
    except PowerCut:
        pass
    else:
        raise AssertionError("the last batch was acknowledged without an fsync")
    disk.on_fsync = None
    return disk


@pytest.mark.parametrize("segment_bytes", [4096, 150], ids=["same-segment", "rolls-over"])
def test_power_cut_at_every_byte_of_the_last_batch(segment_bytes):
    acked = acked_batches(12)
    last = [b"last-%d-" % k + b"y" * k for k in range(4)]
    expected = [item for batch in acked for item in batch]
    ends = record_ends(last)
    for keep in range(ends[-1] + 1):
        disk = cut_during_last_fsync(keep, 0, 0, acked, last, segment_bytes)
        with SegmentLog(SIM_DIR, disk=disk, segment_bytes=segment_bytes) as log:
            whole = sum(1 for end in ends if end <= keep)
            assert [p for _, p in log.read()] == expected + last[:whole], f"keep {keep}"
            if keep in (0, *ends):
                assert log.torn_tail is None, f"keep {keep}"
            else:
                assert log.torn_tail.offset == len(expected) + whole, f"keep {keep}"
                assert log.torn_tail.bytes_dropped == keep - ([0, *ends][whole])
            assert log.append([b"after"]) == len(expected) + whole
        with SegmentLog(SIM_DIR, disk=disk, segment_bytes=segment_bytes) as log:
            assert log.torn_tail is None
            assert [p for _, p in log.read()][-1] == b"after"


def test_power_cut_at_every_byte_of_the_last_batch_into_preallocated_space():
    """The same cuts when the last batch overwrites zeros the log preallocated: what the
    cut kept of the batch, then zeros to the end of the file."""
    acked = acked_batches(12)
    last = [b"last-%d-" % k + b"y" * k for k in range(4)]
    expected = [item for batch in acked for item in batch]
    start = sum(HEADER_BYTES + len(item) for item in expected)
    ends = record_ends(last)
    for keep in range(ends[-1] + 1):
        disk = cut_during_last_fsync(keep, 0, 0, acked, last, 4096, preallocate=4096)
        assert disk.file_size(SIM_DIR / segment_name(0)) == 4096
        with SegmentLog(SIM_DIR, disk=disk, segment_bytes=4096) as log:
            whole = sum(1 for end in ends if end <= keep)
            assert [p for _, p in log.read()] == expected + last[:whole], f"keep {keep}"
            boundary = start + [0, *ends][whole]
            if keep in (0, *ends):
                assert log.torn_tail is None, f"keep {keep}"
            else:
                assert log.torn_tail == TornTail(segment=str(SIM_DIR / segment_name(0)),
                                                 offset=len(expected) + whole,
                                                 position=boundary,
                                                 bytes_dropped=4096 - boundary)
            assert log.append([b"after"]) == len(expected) + whole
        with SegmentLog(SIM_DIR, disk=disk, segment_bytes=4096) as log:
            assert log.torn_tail is None
            assert [p for _, p in log.read()][-1] == b"after"


@PROPERTY_SETTINGS
@given(batches=batches, last=st.lists(payloads, min_size=1, max_size=6),
       segment_bytes=segment_sizes, seed=st.integers(0, 2 ** 32 - 1),
       preallocate=st.sampled_from([0, 16, 4096]))
def test_random_power_cuts_keep_every_acknowledged_record(batches, last, segment_bytes,
                                                          seed, preallocate):
    disk = cut_during_last_fsync(None, None, seed, batches, last, segment_bytes,
                                 preallocate)
    acked = [item for batch in batches for item in batch]
    with SegmentLog(SIM_DIR, disk=disk, segment_bytes=segment_bytes) as log:
        records = [p for _, p in log.read()]
    assert records[:len(acked)] == acked, f"seed {seed}: acknowledged records lost"
    assert records[len(acked):] == last[:len(records) - len(acked)], f"seed {seed}"


@pytest.mark.parametrize("zeros", [0, 3, 5000], ids=["cut", "cut+3-zeros", "cut+zeros"])
@pytest.mark.parametrize("segment_bytes", [4096, 150], ids=["one-segment", "segments"])
def test_real_files_cut_at_every_byte_of_the_last_batches(tmp_path, segment_bytes, zeros):
    """A cut keeps exactly the whole records before it: the acknowledged prefix when the
    cut is past it, and never a garbled record; so does a cut followed by zeros, which
    is what a power cut leaves of a write into preallocated space."""
    origin = tmp_path / "origin"
    all_batches = acked_batches(15)
    items = write(origin, all_batches, segment_bytes)
    records = layout(origin)
    last = sorted(origin.glob("*.seg"))[-1]
    in_last = [(start, end) for seg, start, end in records if seg == last]
    tail_batches_bytes = sum(HEADER_BYTES + len(i) for b in all_batches[-3:] for i in b)
    first_cut = max(0, in_last[-1][1] - tail_batches_bytes)
    content = last.read_bytes()
    for cut in range(first_cut, len(content) + 1):
        directory = tmp_path / f"cut-{cut}"
        shutil.copytree(origin, directory)
        (directory / last.name).write_bytes(content[:cut] + bytes(zeros))
        kept = sum(1 for seg, _, end in records if seg != last or end <= cut)
        with SegmentLog(directory, segment_bytes=segment_bytes) as log:
            assert list(log.read()) == list(enumerate(items[:kept])), f"cut {cut}"
            boundary = max([0] + [end for _, end in in_last if end <= cut])
            assert (log.torn_tail is None) == (boundary == cut), f"cut {cut}"
        shutil.rmtree(directory)
