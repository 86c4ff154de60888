"""Properties of SegmentLog recovery: a cut keeps exactly the whole records before it; a
flipped bit is always caught, never read back as a wrong payload."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

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
