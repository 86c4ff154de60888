"""The durable append-only log: segment files of length + CRC + payload records.

Owns the on-disk record format, group commit (one fsync covers every record queued while
the previous fsync ran, for threads and for coroutines), recovery on open (a torn tail is
truncated and reported, a bad record before it refuses to open), readers that stream from
any offset while a writer appends, snapshots stored beside a log, and `MemoryLog`, the
in-memory twin with the same contract. Payloads are opaque bytes here; the codec is
`vmresize.events.codec`.

Every file operation goes through a `Disk` (vmresize.events.disk): the real file system
by default, or `SimDisk`, which loses unsynced writes at a simulated power cut.

Exceptions:

    LogError            the log cannot be used: missing directory, another writer holds
    │                   the lock, closed, read-only
    ├── CorruptLog      a bad record before the tail; `path` (segment file) and `offset`
    ├── DiskFull        an append found no space; nothing of it was kept, the log goes on
    └── LogFailed       a write or fsync failed: every pending and later append raises it
                        until the log is reopened (fail-stop; an fsync is never retried)

Snapshots: `load_snapshot` skips a snapshot whose CRC does not check (reporting it) and
falls back to an older one, or None: the caller then replays the log.

Record: 4-byte little-endian payload length, 4-byte little-endian zlib.crc32(payload),
payload. Segment files are named by the offset of their first record (20 digits, `.seg`).
The last segment may end in zeros: space the writer preallocated (`Disk.preallocate`) so
that an append's fsync overwrites allocated blocks instead of growing the file. A record
never has length 0, so zeros from a record boundary to the end of the file are the end
of the log, not a torn tail. Zeros cannot mask a lost record either: a power cut during
an overwrite may persist a later page of the batch and not an earlier one, leaving whole
zero pages between records; recovery then drops everything from the first bad record on
as a torn tail (the batch was not acknowledged), where any other bad record followed by a
valid one refuses to open.
"""
from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import msgspec

from vmresize.events.disk import OS_DISK, Disk

MAX_RECORD_BYTES = 16 * 1024 * 1024     # a longer length field is garbage, not a record
SEGMENT_BYTES_DEFAULT = 64 * 1024 * 1024
MARK_EVERY = 256        # records between two marks of where a record starts (see read)
NEAR_READ_BYTES = 64 * 1024     # what a read of a few records from a mark asks for at once
SNAPSHOTS_KEPT = 3
LOCK_NAME = "lock"

_HEADER = struct.Struct("<II")          # payload length, crc32(payload)
_SNAPSHOT_HEADER = struct.Struct("<QI")  # offset, crc32(offset bytes + data)
_CHUNK_BYTES = 1024 * 1024
_PAGE_BYTES = 4096                      # the unit a power cut persists or loses
_ZERO_PAGE = bytes(_PAGE_BYTES)
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_SNAPSHOT_NAME = re.compile(r"^(\d{20})\.snap$")
_SNAPSHOT_TEMP_SUFFIX = ".tmp-meta"     # DESIGN §7: stray files carry `lock` or `meta`

Encode = Callable[[int, object], bytes]
_logger = logging.getLogger(__name__)


class LogError(Exception):
    """The log cannot be used (see the module docstring for the tree)."""


class DiskFull(LogError):
    """An append found no space: none of its records were kept (what the disk let
    through was truncated away, durably) and the log goes on; appends succeed again
    once there is space."""

    def __init__(self, directory: str | os.PathLike, reason: str):
        self.directory = str(directory)
        super().__init__(f"{self.directory}: disk full: {reason}")


class LogFailed(LogError):
    """A write or an fsync failed. Whether the records in flight reached the disk is
    unknown, so the log stops: every pending and later append raises this, until the
    log is reopened and recovery reads what the disk really holds."""

    def __init__(self, directory: str | os.PathLike, reason: str):
        self.directory = str(directory)
        super().__init__(f"{self.directory}: {reason}; reopen the log")


class CorruptLog(LogError):
    """A bad record that is not a torn tail: data would be lost silently if we went on."""

    def __init__(self, path: str | os.PathLike, offset: int, reason: str):
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: offset {offset}: {reason}")


class TornTail(msgspec.Struct, frozen=True):
    """What an interrupted write left at the end of the last segment."""
    segment: str          # the segment file
    offset: int           # the first record offset lost
    position: int         # byte position in the file where the lost bytes start
    bytes_dropped: int


class Log(Protocol):
    """What `SegmentLog` and `MemoryLog` both offer."""
    torn_tail: TornTail | None

    @property
    def next_offset(self) -> int: ...
    def append(self, items: Iterable, encode: Encode | None = None) -> int: ...
    async def append_async(self, items: Iterable, encode: Encode | None = None) -> int: ...
    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]: ...
    def follow(self, start: int = 0, poll_s: float = 0.2,
               stop_event: threading.Event | None = None
               ) -> Iterator[tuple[int, bytes]]: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- helpers

def _payloads(first: int, items: list, encode: Encode | None) -> list[bytes]:
    """Encoded payloads for a batch whose first record gets offset `first`."""
    out = []
    for i, item in enumerate(items):
        payload = item if encode is None else encode(first + i, item)
        if type(payload) is not bytes:
            if not isinstance(payload, (bytearray, memoryview)):
                raise TypeError(f"a log payload must be bytes, got {type(payload).__name__}")
            payload = bytes(payload)
        # Empty payloads are refused so that a zero-filled region never reads as records.
        if not 0 < len(payload) <= MAX_RECORD_BYTES:
            raise ValueError(f"a log payload must be 1..{MAX_RECORD_BYTES} bytes, "
                             f"got {len(payload)}")
        out.append(payload)
    return out


def _write_all(disk: Disk, fd, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[disk.write(fd, view):]


def _pwrite_all(disk: Disk, fd, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = disk.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def segment_name(first_offset: int) -> str:
    return f"{first_offset:020d}.seg"


def _segments(disk: Disk, directory: Path) -> list[int]:
    """First offsets of the segment files in `directory`, ascending."""
    try:
        names = disk.list_dir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_SEGMENT_NAME.match, names) if m)


def _find_valid_record(buf: memoryview, start: int) -> int:
    """Byte position of the first well-formed record at or after `start`, or -1.

    This is what tells a torn tail (nothing valid after the bad record) from corruption
    in the middle (valid records follow), so it looks at every byte position up to the
    last non-zero byte (a record's length is never 0; a preallocated tail is all zeros).
    """
    unpack = _HEADER.unpack_from
    size = len(buf)
    last = len(bytes(buf).rstrip(b"\0"))    # a record starts before its last non-zero byte
    for q in range(start, min(size - _HEADER.size + 1, last)):
        length, crc = unpack(buf, q)
        body = q + _HEADER.size
        if 0 < length <= size - body and zlib.crc32(buf[body:body + length]) == crc:
            return q
    return -1


def _zeros_to_end(disk: Disk, fd, pos: int) -> bool:
    """Whether the file holds only zeros from byte `pos` to its end."""
    while chunk := disk.pread(fd, _CHUNK_BYTES, pos):
        if chunk.count(0) != len(chunk):
            return False
        pos += len(chunk)
    return True


def _has_zero_page(buf: memoryview, pos: int) -> bool:
    """Whether `buf`, the file's bytes from byte `pos` on, holds a whole page of zeros
    (aligned in the file): a page of preallocated space that a power cut kept from
    being overwritten, while a later page of the same write reached the disk."""
    first = -pos % _PAGE_BYTES
    return any(buf[q:q + _PAGE_BYTES] == _ZERO_PAGE
               for q in range(first, len(buf) - _PAGE_BYTES + 1, _PAGE_BYTES))


# --------------------------------------------------------------------------- reading

class _Cursor:
    """Where a reader stands: a segment, a byte position in it and the offset there.

    `problem` says why the last scan of a segment stopped before its end of file (a bad
    or incomplete record at `pos`), or is None when it stopped at a record boundary.
    """

    def __init__(self, disk: Disk, directory: Path, first: int,
                 chunk_bytes: int = _CHUNK_BYTES):
        self.disk = disk
        self.directory = directory
        self.first = first
        self.chunk_bytes = chunk_bytes      # how much one read of the segment asks for
        self.pos = 0
        self.offset = first
        self.problem: str | None = None
        # segment -> where its records end, as far as a writer knew: a hint that saves
        # reading the zeros after them, never a bound on what is read
        self.ends: dict[int, int] = {}

    @classmethod
    def at(cls, disk: Disk, directory: Path, start: int,
           chunk_bytes: int = _CHUNK_BYTES) -> "_Cursor | None":
        """A cursor at the start of the segment holding `start`; None if there is none."""
        firsts = _segments(disk, directory)
        if not firsts:
            return None
        if firsts[0] != 0:
            raise CorruptLog(directory / segment_name(firsts[0]), 0,
                             f"the first segment starts at offset {firsts[0]}, not 0")
        return cls(disk, directory, firsts[bisect.bisect_right(firsts, start) - 1],
                   chunk_bytes)

    @property
    def path(self) -> Path:
        return self.directory / segment_name(self.first)

    def records(self, stop: int | None) -> Iterator[tuple[int, bytes]]:
        """Records from here on, across segments, up to `stop` or the end of the log."""
        stop_at = (1 << 63) if stop is None else stop
        rescanned = False
        while self.offset < stop_at:
            yield from self._scan(stop_at)
            if self.offset >= stop_at:
                return
            later = [f for f in _segments(self.disk, self.directory) if f > self.first]
            if not later:
                self._check_tail()
                return
            if self.problem is None and later[0] == self.offset:
                self.first, self.pos, rescanned = later[0], 0, False
                continue
            # The writer may have finished this segment and rolled over since we read
            # it (a segment is complete before the next one exists): look once more.
            if rescanned:
                raise CorruptLog(self.path, self.offset, self.problem or
                                 f"the segment ends at offset {self.offset} but the next "
                                 f"one starts at {later[0]}")
            rescanned = True

    def _scan(self, stop_at: int) -> Iterator[tuple[int, bytes]]:
        """Records of the current segment from `pos`; sets `problem` when it stops."""
        self.problem = None
        pos, offset, header = self.pos, self.offset, _HEADER.size
        unpack, crc32, disk = _HEADER.unpack_from, zlib.crc32, self.disk
        chunk = self.chunk_bytes
        limit = self.ends.get(self.first, 1 << 63)        # read no byte past it
        fd = disk.open(self.path, "r")
        try:
            buf, i = disk.pread(fd, min(chunk, limit - pos), pos), 0    # buf[i]: `pos`
            end = pos + len(buf)                            # where the next read starts
            while offset < stop_at:
                avail = len(buf) - i
                need = header
                if avail >= header:
                    length, crc = unpack(buf, i)
                    if not 0 < length <= MAX_RECORD_BYTES:
                        if length == 0 and _zeros_to_end(disk, fd, pos):
                            return                  # preallocated space: the log ends
                        self.problem = f"bad record length {length}"
                        return
                    need = header + length
                if avail < need:
                    if end >= limit:        # records go on past the hint: read on
                        limit = 1 << 63
                    more = disk.pread(fd, min(max(chunk, need - avail), limit - end), end)
                    end += len(more)
                    if not more:
                        if avail and (avail >= header or buf.count(0, i) != avail):
                            self.problem = ("incomplete record header" if avail < header
                                            else "incomplete record")
                        return
                    buf, i = buf[i:] + more, 0
                    continue
                payload = buf[i + header:i + need]
                if crc32(payload) != crc:
                    self.problem = "CRC mismatch"
                    return
                i += need
                pos += need
                offset += 1
                yield offset - 1, payload
        finally:
            disk.close(fd)
            self.pos, self.offset = pos, offset

    def _check_tail(self) -> None:
        """At a problem in the last segment: a torn tail unless valid records follow."""
        if self.problem is None:
            return
        fd = self.disk.open(self.path, "r")
        try:
            rest = memoryview(self.disk.pread(fd, self.disk.size(fd) - self.pos, self.pos))
        finally:
            self.disk.close(fd)
        found = _find_valid_record(rest, 0)
        if found == 0:
            return      # a writer appended since the scan read zeros or a partial record
        if found > 0 and not _has_zero_page(rest[:found], self.pos):
            raise CorruptLog(self.path, self.offset, f"{self.problem}; a valid record "
                             f"follows at byte {self.pos + found}")

    def file_bytes(self) -> int:
        return self.disk.file_size(self.path)


def _recover(disk: Disk, directory: Path, verify: bool
             ) -> tuple[_Cursor | None, TornTail | None]:
    """Scan the log; return a cursor at its valid end, and the torn tail if any."""
    cursor = _Cursor.at(disk, directory, 0)
    if cursor is None:
        return None, None
    if not verify:
        # Older segments are checked when read; their record counts follow from names.
        cursor = _Cursor(disk, directory, _segments(disk, directory)[-1])
        cursor.offset = cursor.first
    for _ in cursor.records(None):
        pass
    return cursor, _torn_tail_at(cursor)


def _torn_tail_at(cursor: _Cursor) -> TornTail | None:
    """The torn tail of a cursor that read to the end of the log, if any."""
    if cursor.problem is None:
        return None
    return TornTail(segment=str(cursor.path), offset=cursor.offset, position=cursor.pos,
                    bytes_dropped=cursor.file_bytes() - cursor.pos)


# --------------------------------------------------------------------------- SegmentLog

class _Failure:
    """Why a batch was not written; each appender of it raises its own exception."""

    __slots__ = ("cls", "directory", "reason", "cause")

    def __init__(self, cls: type, directory: Path, reason: str, cause: BaseException):
        self.cls, self.directory, self.reason, self.cause = cls, directory, reason, cause

    def exception(self) -> "LogError":
        exc = self.cls(self.directory, self.reason)
        exc.__cause__ = self.cause
        return exc


class _Batch:
    """Records queued together: one write and one fsync make all of them durable, or
    none of them is acknowledged."""

    __slots__ = ("first", "end", "buf", "durable", "failure", "waiter", "loop")

    def __init__(self, first: int):
        self.first = self.end = first     # its records are [first, end)
        self.buf = bytearray()            # header, payload, header, payload, ...
        self.durable = False
        self.failure: _Failure | None = None
        # The future every coroutine of the batch awaits, on `loop`; None if none does.
        self.waiter: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, items: Iterable, encode: Encode | None) -> None:
        """Frame `items` with consecutive offsets from `end`; all of them or none."""
        buf, offset, mark = self.buf, self.end, len(self.buf)
        pack, crc32 = _HEADER.pack, zlib.crc32
        try:
            for item in items:
                payload = item if encode is None else encode(offset, item)
                if type(payload) is not bytes:
                    payload = _as_bytes(payload)
                length = len(payload)
                # Empty payloads are refused so a zero-filled region never reads as records.
                if not 0 < length <= MAX_RECORD_BYTES:
                    raise ValueError(f"a log payload must be 1..{MAX_RECORD_BYTES} bytes, "
                                     f"got {length}")
                buf += pack(length, crc32(payload))
                buf += payload
                offset += 1
        except BaseException:
            del buf[mark:]
            raise
        self.end = offset


def _as_bytes(payload) -> bytes:
    if not isinstance(payload, (bytearray, memoryview)):
        raise TypeError(f"a log payload must be bytes, got {type(payload).__name__}")
    return bytes(payload)


def _settle(batch: _Batch) -> None:
    """On the appenders' event loop: wake every coroutine waiting for `batch`."""
    waiter = batch.waiter
    if waiter is not None and not waiter.done():    # cancelled: see `_await_again`
        waiter.set_result(batch.failure)


def _cancelled_for_another(waiter: asyncio.Future) -> bool:
    """Whether `waiter`, the future every coroutine of a batch awaits, raised
    CancelledError in this coroutine because another coroutine of the batch was
    cancelled (which cancels the future it awaits), and not this one."""
    return waiter.cancelled() and not asyncio.current_task().cancelling()


async def _await_again(batch: _Batch, waiter: asyncio.Future) -> _Failure | None:
    """Wait for `batch` once more, its future `waiter` cancelled for another appender
    (whose records stay in the batch and are written): on a new future, shared by the
    appenders of the batch that were not cancelled. The batch's failure, or None once
    it is durable."""
    while True:
        if batch.durable or batch.failure is not None:
            return batch.failure          # settled meanwhile
        if batch.waiter is waiter:        # the first of the others to get here
            batch.waiter = waiter.get_loop().create_future()
        waiter = batch.waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            if not _cancelled_for_another(waiter):
                raise


class SegmentLog:
    """A directory of segment files; one writer (a lock file), any number of readers.

    A writer truncates a torn tail on open and reports it in `torn_tail`; a read-only log
    reports it and leaves the files alone (if a writer is appending at that moment, the
    "torn tail" may be a record in flight). `verify=False` checks only the last segment
    on open (older ones are checked as they are read): for restarts from a snapshot
    that should not read the whole log; a read-only log opened so scans nothing on open
    and finds its end and torn tail on the first read to the end, or when asked
    (`torn_tail`, `next_offset`), so a replay reads each record once. `disk` is the I/O
    boundary (vmresize.events.disk).

    Group commit: appenders add their records to the open batch; whoever finds no batch
    in flight takes the open batch and writes it with one write and one fsync, with the
    lock released, while later appenders fill the next one. Threads lead themselves;
    coroutines are served by one writer thread per log, which wakes their event loop
    once per batch; the coroutines of a batch all await one future. A batch is
    acknowledged only once its fsync returned.
    """

    def __init__(self, directory: str | os.PathLike, *, readonly: bool = False,
                 fsync: bool = True, segment_bytes: int = SEGMENT_BYTES_DEFAULT,
                 create: bool = True, verify: bool = True, disk: Disk = OS_DISK,
                 read_chunk_bytes: int = _CHUNK_BYTES):
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be > 0, got {segment_bytes}")
        if read_chunk_bytes <= 0:
            raise ValueError(f"read_chunk_bytes must be > 0, got {read_chunk_bytes}")
        self.directory = Path(directory)
        self.disk = disk
        self.readonly = readonly
        self._tail_pending = False        # read-only, verify=False: end not found yet
        self._torn_tail: TornTail | None = None
        self.fsyncs = 0                   # fsyncs of segment files, for benchmarks
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        # Readers ask the disk for this much at a time: a reader among many read
        # together (the audit merges every host's log) asks for less.
        self._read_chunk = read_chunk_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)    # batches settled
        self._work = threading.Condition(self._lock)    # the writer thread has work
        self._closed = False
        self._failure: _Failure | None = None           # fail-stop: reopen to go on
        self._lock_fd = None
        self._fd = None
        self._seg_first = 0
        self._seg_size = 0                # where the segment's records end
        # Where some records of the last segment start, (offset, byte position), one
        # every MARK_EVERY records or more: a read from offset N starts at the last mark
        # at or before N, not at the segment's first byte. (segment, marks): replaced
        # whole when the segment rolls over, so a reader sees the two together.
        self._marks: tuple[int, list[tuple[int, int]]] = (0, [])
        self._seg_alloc = 0               # its file's size: zeros from _seg_size on
        self._open = _Batch(0)            # where appends go
        self._inflight: _Batch | None = None
        self._flushed = 0                 # records below this are written (and fsync'd)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None             # the thread `_loop` ran in
        self._writer: threading.Thread | None = None
        self._writer_idle = False         # waiting for `_work`: notify it
        if readonly:
            self._open_readonly(verify)
        else:
            self._open_writer(create, verify)

    def _open_readonly(self, verify: bool) -> None:
        if not self.disk.is_dir(self.directory):
            raise LogError(f"{self.directory}: no such log directory")
        if verify:
            self._settle_end(*_recover(self.disk, self.directory, True))
        else:
            self._tail_pending = True     # see `_settle_end`
        self._closed = True               # nothing to write; reads stay available

    def _settle_end(self, cursor: _Cursor | None, torn: TornTail | None) -> None:
        """A read-only log's end and torn tail, found by `_recover` or by a read."""
        self._torn_tail = torn
        self._flushed = cursor.offset if cursor else 0
        self._open = _Batch(self._flushed)
        self._tail_pending = False

    def _find_end(self) -> None:
        if self._tail_pending:
            self._settle_end(*_recover(self.disk, self.directory, False))

    @property
    def torn_tail(self) -> TornTail | None:
        """The torn tail found on open (a writer truncated it; a reader left it)."""
        self._find_end()
        return self._torn_tail

    @torn_tail.setter
    def torn_tail(self, value: TornTail | None) -> None:
        self._torn_tail = value

    def _open_writer(self, create: bool, verify: bool) -> None:
        disk = self.disk
        if create and not disk.is_dir(self.directory):
            disk.make_dirs(self.directory)
            disk.fsync_dir(self.directory.parent)
        if not disk.is_dir(self.directory):
            raise LogError(f"{self.directory}: no such log directory")
        self._take_lock()
        try:
            cursor, self.torn_tail = _recover(disk, self.directory, verify)
            if cursor is None:
                self._create_segment(0)
            else:
                self._reopen_segment(cursor)
        except BaseException:
            disk.close(self._lock_fd)
            raise

    def _take_lock(self) -> None:
        try:
            self._lock_fd = self.disk.lock(self.directory / LOCK_NAME)
        except BlockingIOError:
            raise LogError(f"{self.directory}: another writer holds the log's lock") from None

    def _reopen_segment(self, cursor: _Cursor) -> None:
        disk = self.disk
        self._fd = disk.open(cursor.path, "r+")
        if self.torn_tail is not None:
            disk.truncate(self._fd, cursor.pos)
            disk.fsync(self._fd)          # the truncation must stick before we append
        self._seg_first, self._seg_size = cursor.first, cursor.pos
        self._marks = (cursor.first, [])
        self._seg_alloc = disk.size(self._fd)   # recovery read zeros from `pos` on
        self._flushed = cursor.offset
        self._open = _Batch(cursor.offset)
        assert self._seg_alloc >= cursor.pos

    def _create_segment(self, first: int) -> None:
        path = self.directory / segment_name(first)
        self._fd = self.disk.open(path, "x+")
        self.disk.fsync_dir(self.directory)
        self._seg_first, self._seg_size, self._seg_alloc = first, 0, 0

    # -- properties and lifecycle

    @property
    def next_offset(self) -> int:
        """The offset the next append gets (for a read-only log: its end when opened)."""
        self._find_end()
        with self._lock:
            return self._open.end

    def __enter__(self) -> "SegmentLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write what is queued, then release the files and the lock. Idempotent."""
        failure = None
        with self._lock:
            if self._closed:
                return
            try:
                while self._failure is None and (self._inflight is not None
                                                 or self._open.end > self._open.first):
                    if self._inflight is None:
                        batch = self._open
                        self._lead(self._fsync)
                        failure = failure or batch.failure
                    else:
                        self._cond.wait()
                if self._failure is None:
                    self._trim()
            finally:
                self._closed = True
                for fd in (self._fd, self._lock_fd):
                    if fd is not None:
                        self.disk.close(fd)
                self._fd = self._lock_fd = None
                self._cond.notify_all()
                self._work.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        if failure is not None:           # what close had to write was not kept
            raise failure.exception() from failure.cause

    def _trim(self) -> None:
        """Cut the zeros preallocated past the last record, so that a closed log's files
        hold its records only. Best effort: zeros left by a failure here, as by a crash,
        read as the end of the log."""
        if self._seg_alloc > self._seg_size:
            try:
                self.disk.truncate(self._fd, self._seg_size)
                if self._fsync:
                    self.disk.fsync(self._fd)
            except OSError as exc:
                _logger.warning("%s: preallocated space left at close: %s",
                                self.directory, exc)
            else:
                self._seg_alloc = self._seg_size

    def sync(self) -> None:
        """Write what is queued and fsync it, even with fsync=False."""
        if self.readonly:
            return
        with self._lock:
            self._check_writable()
            while self._inflight is not None:
                self._cond.wait()
            self._check_writable()
            batch = self._open
            self._lead(sync=True)
            if batch.failure is not None:
                raise batch.failure.exception() from batch.failure.cause

    def _check_writable(self) -> None:
        if self.readonly:
            raise LogError(f"{self.directory}: the log is open read-only")
        if self._failure is not None:
            raise self._failure.exception() from self._failure.cause
        if self._closed:
            raise LogError(f"{self.directory}: the log is closed")

    # -- appending

    def append(self, items: Iterable, encode: Encode | None = None) -> int:
        """Append a batch with consecutive offsets; return the first once it is durable."""
        with self._lock:
            self._check_writable()
            batch = self._open
            first = batch.end
            batch.add(items, encode)
            if batch.end == first:
                return first
            while not batch.durable:
                if batch.failure is not None:
                    raise batch.failure.exception() from batch.failure.cause
                if self._inflight is None:
                    self._lead(self._fsync)
                else:
                    self._cond.wait()
        return first

    async def append_async(self, items: Iterable, encode: Encode | None = None) -> int:
        """Append from a coroutine; the log's writer thread writes and fsyncs the batch
        while the event loop goes on, and wakes every coroutine of the batch at once."""
        if not self._fsync or self.disk.inline:
            # Nothing slow to wait for (page cache, or an in-memory disk): no thread hop.
            return self.append(items, encode)
        with self._lock:
            if self._closed or self._failure is not None:
                self._check_writable()
            # The loop bound is the caller's when it runs in this thread (a thread runs
            # one loop at a time): asyncio.get_running_loop() costs a getpid() here.
            if self._loop_thread != threading.get_ident() or not self._loop.is_running():
                self._bind_loop(asyncio.get_running_loop())
            loop = self._loop
            batch = self._open
            first = batch.end
            batch.add(items, encode)
            if batch.end == first:
                return first
            waiter = batch.waiter
            if waiter is None:            # the batch's first coroutine
                waiter = batch.waiter = loop.create_future()
                batch.loop = loop
                if self._writer_idle:
                    self._writer_idle = False
                    self._work.notify()
                elif self._writer is None:
                    self._start_writer()
        try:
            failure = await waiter
        except asyncio.CancelledError:
            if not _cancelled_for_another(waiter):
                raise
            failure = await _await_again(batch, waiter)
        if failure is not None:
            raise failure.exception() from failure.cause
        return first

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_thread = threading.get_ident()
        if loop is self._loop:
            return
        for batch in (self._open, self._inflight):
            if batch is not None and batch.waiter is not None:
                if not batch.loop.is_closed():
                    raise LogError(f"{self.directory}: append_async from two event loops "
                                   f"at once")
                batch.waiter = None       # its loop is gone, and its coroutines with it
        self._loop = loop

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"log-writer:{self.directory}")
        self._writer.start()

    def _write_loop(self) -> None:
        """The writer thread: lead every batch coroutines are waiting for."""
        with self._lock:
            while not self._closed and self._failure is None:
                if self._inflight is None and self._open.end > self._open.first:
                    self._lead(sync=True)
                else:
                    self._writer_idle = True
                    self._work.wait()
                    self._writer_idle = False

    def _lead(self, sync: bool) -> None:
        """Write the open batch (and fsync it when `sync`); settle it. Called with the
        lock held; released during the I/O when it may be slow (an fsync) so that
        appenders fill the next batch meanwhile."""
        batch = self._open
        self._open = _Batch(batch.end)
        self._inflight = batch
        if sync:
            self._lock.release()
        try:
            failure = self._write(batch, sync)
        finally:
            if sync:
                self._lock.acquire()
            self._inflight = None
        if failure is None:
            batch.durable = True
            self._flushed = batch.end
        else:
            self._lose(batch, failure)
        self._cond.notify_all()
        if self._writer_idle and (self._open.end > self._open.first
                                  or self._failure is not None):
            self._writer_idle = False
            self._work.notify()
        if batch.waiter is not None:
            self._wake(batch)

    def _lose(self, batch: _Batch, failure: _Failure) -> None:
        """`batch` was not written. The open batch behind it fails too: its records were
        encoded with the offsets that follow `batch`, which the next append reuses."""
        if failure.cls is LogFailed:
            self._failure = failure
        batch.failure = failure
        lost_too = self._open
        lost_too.failure = failure
        self._open = _Batch(batch.first)
        assert self._flushed == batch.first, "a lost batch must follow the durable ones"
        if lost_too.waiter is not None:
            self._wake(lost_too)

    @staticmethod
    def _wake(batch: _Batch) -> None:
        try:
            batch.loop.call_soon_threadsafe(_settle, batch)
        except RuntimeError:              # its loop is closed: no one is waiting any more
            pass

    def _write(self, batch: _Batch, sync: bool) -> _Failure | None:
        """Write one batch into one segment and fsync it when `sync`. The caller holds the
        writer role. A full disk undoes the partial write; any other error is fatal."""
        data, disk = batch.buf, self.disk
        if self._seg_size and self._seg_size + len(data) > self._segment_bytes:
            failure = self._roll(batch.first)
            if failure is not None:
                return failure
        start = self._seg_size
        end = start + len(data)
        if end > self._seg_alloc and self.disk.preallocate:
            failure = self._preallocate(end)
            if failure is not None:
                return failure
        try:
            _pwrite_all(disk, self._fd, data, start)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return self._undo_write(start, exc)
            return self._stop("write", exc)
        self._seg_size = end
        self._seg_alloc = max(self._seg_alloc, end)
        marks = self._marks[1]
        if batch.first - (marks[-1][0] if marks else self._seg_first) >= MARK_EVERY:
            marks.append((batch.first, start))      # a batch starts at a record
        if sync:
            try:
                disk.fsync(self._fd)
            except OSError as exc:
                # Never retried: the kernel may have dropped the pages it failed to
                # write, and a second fsync would report success over the loss.
                return self._stop("fsync", exc)
            self.fsyncs += 1
        return None

    def _preallocate(self, end: int) -> _Failure | None:
        """Zero-fill the segment file to at least `end` (`Disk.preallocate` bytes past
        the records, within the segment's size) and make that durable once, so that the
        appends filling it overwrite allocated blocks and their fsyncs need not commit a
        new file size. With no space for it the append grows the file as before."""
        disk, old = self.disk, self._seg_alloc
        new = max(end, min(old + disk.preallocate, self._segment_bytes))
        try:
            _pwrite_all(disk, self._fd, bytes(new - old), old)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                return self._stop("preallocating the segment", exc)
            try:
                disk.truncate(self._fd, old)
            except OSError as again:
                return self._stop("truncate after a full disk", again)
            return None
        if self._fsync:
            try:
                disk.fsync(self._fd)
                self.fsyncs += 1
            except OSError as exc:
                return self._stop("fsync", exc)
        self._seg_alloc = new
        return None

    def _undo_write(self, start: int, exc: OSError) -> _Failure:
        """Cut what a full disk let through, durably: a record of a refused append must
        never come back after a crash."""
        try:
            self.disk.truncate(self._fd, start)
            self.disk.fsync(self._fd)
        except OSError as again:
            return self._stop("truncate after a full disk", again)
        self._seg_alloc = start
        return _Failure(DiskFull, self.directory, f"no space left for the append ({exc})",
                        exc)

    def _stop(self, what: str, exc: BaseException) -> _Failure:
        return _Failure(LogFailed, self.directory, f"{what} failed: {exc}", exc)

    def _roll(self, first: int) -> _Failure | None:
        # Always fsync the old segment, even with fsync=False: a segment that has a
        # successor is then complete, which is what lets recovery call any bad record
        # outside the last segment corruption.
        # Its preallocated zeros are cut first: only the last segment ends in zeros.
        disk = self.disk
        if self._seg_alloc > self._seg_size:
            try:
                disk.truncate(self._fd, self._seg_size)
            except OSError as exc:
                return self._stop("truncating the segment's preallocated space", exc)
            self._seg_alloc = self._seg_size
        try:
            disk.fsync(self._fd)
            self.fsyncs += 1
        except OSError as exc:
            return self._stop("fsync", exc)
        path = self.directory / segment_name(first)
        try:
            fd = disk.open(path, "x+")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return _Failure(DiskFull, self.directory, f"no space for a new segment "
                                f"({exc})", exc)
            return self._stop("creating a segment", exc)
        try:
            disk.fsync_dir(self.directory)
        except OSError as exc:
            disk.close(fd)
            return self._stop("fsync of the log directory", exc)
        disk.close(self._fd)
        self._fd, self._seg_first, self._seg_size, self._seg_alloc = fd, first, 0, 0
        self._marks = (first, [])
        return None

    # -- reading

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Stream (offset, payload) from `start` to `stop` or to what is written now
        (for the log's writer: what is durable, so that a reader never reads the
        preallocated zeros after the records, nor a batch still being written)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        ends = {}
        if not self.readonly:
            ends[self._seg_first] = self._seg_size   # racy with a roll-over: a hint
            if stop is None:
                stop = self._flushed
                if start >= stop:
                    return
        cursor = _Cursor.at(self.disk, self.directory, start, self._read_chunk)
        if cursor is None:
            return
        cursor.ends = ends
        segment, marks = self._marks
        if cursor.first == segment and marks and start >= marks[0][0]:
            cursor.offset, cursor.pos = marks[bisect.bisect_right(marks, (start, 1 << 63))
                                              - 1]
            if stop is not None and stop - start <= MARK_EVERY:
                cursor.chunk_bytes = min(cursor.chunk_bytes, NEAR_READ_BYTES)
        expected = start
        for offset, payload in cursor.records(stop):
            if offset >= start:
                assert offset == expected, f"offset {offset} read where {expected} was due"
                expected += 1
                yield offset, payload
        if self._tail_pending and (stop is None or cursor.offset < stop):
            self._settle_end(cursor, _torn_tail_at(cursor))     # read to the end

    def follow(self, start: int = 0, poll_s: float = 0.2,
               stop_event: threading.Event | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield records from `start` on as they are written, until `stop_event` is set."""
        cursor, expected = None, start
        while stop_event is None or not stop_event.is_set():
            cursor = cursor or _Cursor.at(self.disk, self.directory, start,
                                          self._read_chunk)
            if cursor is not None:
                for offset, payload in cursor.records(None):
                    if offset >= start:
                        assert offset == expected
                        expected += 1
                        yield offset, payload
            self._wait_for_more(expected, poll_s, stop_event)

    def _wait_for_more(self, seen: int, poll_s: float,
                       stop_event: threading.Event | None) -> None:
        if not self.readonly and not self._closed:
            # Our own writer can wake us as soon as it has written; others are polled.
            with self._cond:
                self._cond.wait_for(lambda: self._flushed > seen or self._closed
                                    or (stop_event is not None and stop_event.is_set()),
                                    timeout=poll_s)
        elif stop_event is not None:
            stop_event.wait(poll_s)
        else:
            time.sleep(poll_s)


# --------------------------------------------------------------------------- MemoryLog

class MemoryLog:
    """The in-memory twin of `SegmentLog`, for tests and the simulator's fast paths."""

    readonly = False

    def __init__(self):
        self.torn_tail: TornTail | None = None
        self._records: list[bytes] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    @property
    def next_offset(self) -> int:
        with self._cond:
            return len(self._records)

    def append(self, items: Iterable, encode: Encode | None = None) -> int:
        items = list(items)
        with self._cond:
            if self._closed:
                raise LogError("the log is closed")
            first = len(self._records)
            self._records.extend(_payloads(first, items, encode))
            self._cond.notify_all()
            return first

    async def append_async(self, items: Iterable, encode: Encode | None = None) -> int:
        return self.append(items, encode)

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        with self._cond:
            records = self._records[start:stop]
        yield from enumerate(records, start)

    def follow(self, start: int = 0, poll_s: float = 0.2,
               stop_event: threading.Event | None = None) -> Iterator[tuple[int, bytes]]:
        offset = start
        while stop_event is None or not stop_event.is_set():
            with self._cond:
                self._cond.wait_for(lambda: len(self._records) > offset, timeout=poll_s)
                records = self._records[offset:]
            for payload in records:
                offset += 1
                yield offset - 1, payload

    def sync(self) -> None:
        pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __enter__(self) -> "MemoryLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- snapshots

def snapshot_name(offset: int) -> str:
    return f"{offset:020d}.snap"


def save_snapshot(snapshot_dir: str | os.PathLike, offset: int, data: bytes,
                  *, disk: Disk = OS_DISK) -> Path:
    """Store `data` as covering records [0, offset); keep the newest SNAPSHOTS_KEPT."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    directory = Path(snapshot_dir)
    if not disk.is_dir(directory):
        disk.make_dirs(directory)
        disk.fsync_dir(directory.parent)
    head = struct.pack("<Q", offset)
    content = _SNAPSHOT_HEADER.pack(offset, zlib.crc32(data, zlib.crc32(head))) + data
    final = directory / snapshot_name(offset)
    temp = directory / (snapshot_name(offset) + _SNAPSHOT_TEMP_SUFFIX)
    fd = disk.open(temp, "w")
    try:
        _write_all(disk, fd, content)
        disk.fsync(fd)
    finally:
        disk.close(fd)
    disk.rename(temp, final)
    disk.fsync_dir(directory)
    _prune_snapshots(disk, directory)
    return final


def _prune_snapshots(disk: Disk, directory: Path) -> None:
    names = disk.list_dir(directory)
    kept = sorted(n for n in names if _SNAPSHOT_NAME.match(n))[-SNAPSHOTS_KEPT:]
    # Temp files are leftovers of a crash mid-save: ours was renamed already.
    doomed = [n for n in names if (_SNAPSHOT_NAME.match(n) and n not in kept)
              or n.endswith(".snap" + _SNAPSHOT_TEMP_SUFFIX)]
    for name in doomed:
        disk.unlink(directory / name)
    if doomed:
        disk.fsync_dir(directory)


def _read_file(disk: Disk, path: Path) -> bytes:
    fd = disk.open(path, "r")
    try:
        size, parts, got = disk.size(fd), [], 0
        while got < size:
            part = disk.pread(fd, size - got, got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    finally:
        disk.close(fd)


def _warn_skipped(path: str, reason: str) -> None:
    _logger.warning("snapshot %s skipped: %s; falling back to an older one or the log",
                    path, reason)


def load_snapshot(snapshot_dir: str | os.PathLike, *, disk: Disk = OS_DISK,
                  report: Callable[[str, str], None] = _warn_skipped
                  ) -> tuple[int, bytes] | None:
    """The newest snapshot whose CRC checks, as (offset, data); None if there is none
    (the caller then replays the whole log).

    Every snapshot skipped (unreadable, short, CRC or offset mismatch) is passed to
    `report(path, reason)`, by default a warning on this module's logger. Writes
    nothing, so auditors may call it on a read-only state directory.
    """
    directory = Path(snapshot_dir)
    try:
        names = disk.list_dir(directory)
    except FileNotFoundError:
        return None
    for name in sorted((n for n in names if _SNAPSHOT_NAME.match(n)), reverse=True):
        path = directory / name
        try:
            content = _read_file(disk, path)
        except OSError as exc:
            report(str(path), f"unreadable: {exc}")
            continue
        if len(content) < _SNAPSHOT_HEADER.size:
            report(str(path), f"{len(content)} bytes, shorter than its header")
            continue
        offset, crc = _SNAPSHOT_HEADER.unpack_from(content)
        data = content[_SNAPSHOT_HEADER.size:]
        if offset != int(name[:20]):
            report(str(path), f"it says offset {offset}, its name {int(name[:20])}")
            continue
        if zlib.crc32(data, zlib.crc32(content[:8])) != crc:
            report(str(path), "CRC mismatch")
            continue
        return offset, data
    return None


def open_log(directory: str | os.PathLike, **kw) -> SegmentLog:
    return SegmentLog(directory, **kw)
