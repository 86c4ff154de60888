"""Disk transport between hosts that do not share storage (pure Python + asyncio, no Ray).

The sender (`send_file`) walks a file's data extents (SEEK_DATA/SEEK_HOLE: holes are never
sent), cuts them into chunks with a CRC-32 each, and pushes them through a `ChunkPeer`;
the destination's `FileReceiver` writes them into a sparse `<final>.part`, records its
progress in `<final>.part-meta` so a restarted copy resumes, and renames to the final name
only when the whole-file digest matches. `PeerSink` adapts a peer to the driver's
`DiskSink`; `copy_sparse` is the local (shared storage) copy.

Whole-file digest: SHA-256 over the file's data runs, each run prefixed with its offset,
then the size. Holes are implied by offsets and size, so two files with the same digest
have the same content, and no zeros are ever hashed (a 20 GiB raw disk holding 2 GiB of
data costs 2 GiB of hashing, not 20).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import json
import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Protocol

from vmresize.drivers.base import DiskError

CHUNK_BYTES = 4 << 20
WRITEBACK_BYTES = 32 << 20   # start the kernel's writeback of a .part every this many bytes
CHUNK_RETRIES_MAX = 3        # puts of one chunk that failed their CRC before giving up
FILE_ATTEMPTS_MAX = 2        # a whole-file digest mismatch restarts the copy once
PART, META = ".part", ".part-meta"
SYNC_FILE_RANGE_WRITE = 2    # linux/fs.h: start writeback, do not wait for it


def _load_sync_file_range():
    """libc's sync_file_range (Linux), which os does not expose; None elsewhere."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class ChunkChecksumError(DiskError):
    """A chunk arrived with a CRC-32 that does not match its data (the sender retries)."""


class FileChecksumError(DiskError):
    """The received file's digest differs from the sender's; the partial copy is dropped."""


class ChunkPeer(Protocol):
    """What a destination exposes to senders. Each method is one remote call with plain,
    picklable arguments, and every call is idempotent (a retried call is harmless)."""

    async def begin(self, rel_path: str, size: int, source_id: str) -> int:
        """Open `rel_path.part` for a file of `size` bytes; return the offset up to which a
        previous copy of the same source (`source_id`) already holds verified data."""

    async def put(self, rel_path: str, offset: int, data: bytes, crc32: int) -> None:
        """Write one chunk; raises ChunkChecksumError when `crc32` does not match."""

    async def commit(self, rel_path: str, digest: str) -> None:
        """Verify the whole-file digest, fsync, rename `.part` to the final name."""


@dataclass
class SendStats:
    file_bytes: int = 0          # the file's size (holes included)
    allocated_bytes: int = 0     # bytes in data extents
    bytes_sent: int = 0          # chunk bytes put (retries included)
    chunks: int = 0              # chunks put successfully
    retries: int = 0             # puts repeated after a checksum error
    resumed_from: int = 0        # offset the receiver already held


# --------------------------------------------------------------------------- extents and digest

def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data run; the whole file where SEEK_DATA is unsupported."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:           # only a hole remains
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size - offset
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def chunk_extents(extents: Iterator[tuple[int, int]], chunk_bytes: int):
    for start, length in extents:
        end = start + length
        for offset in range(start, end, chunk_bytes):
            yield offset, min(chunk_bytes, end - offset)


class RunDigest:
    """SHA-256 of data runs with their offsets (see module docstring). Feeding the same
    bytes at the same offsets in any chunking gives the same digest.

    Hashing runs on its own thread, in order, at most PENDING_MAX chunks behind: it is the
    most expensive step of a copy and needs no answer until commit, so it overlaps the
    reads, CRCs and writes instead of adding to them."""

    PENDING_MAX = 8

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._end = -1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-digest")
        self._pending: deque[Future] = deque()

    def update(self, offset: int, data: bytes | memoryview) -> None:
        self._pending.append(self._pool.submit(self._update, offset, data))
        while len(self._pending) > self.PENDING_MAX:
            self._pending.popleft().result()       # backpressure bounds the memory held

    def _update(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self._end:
            self._h.update(b"@" + offset.to_bytes(8, "little"))
        self._h.update(data)
        self._end = offset + len(data)

    def hexdigest(self, size: int) -> str:
        while self._pending:
            self._pending.popleft().result()
        h = self._h.copy()
        h.update(b"$" + size.to_bytes(8, "little"))
        return h.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_rel_path(rel_path: str) -> None:
    parts = rel_path.split("/")
    if rel_path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DiskError(f"bad transfer path {rel_path!r}: must be relative, without '..'")


# --------------------------------------------------------------------------- receiver

class _Transfer:
    """One file being received: its open `.part`, progress and running digest."""

    def __init__(self, fd: int, size: int, source_id: str) -> None:
        self.fd, self.size, self.source_id = fd, size, source_id
        self.done = 0                          # every byte below is written (or a hole)
        self.runs: list[list[int]] = []        # data runs written, merged, in order
        self.digest = RunDigest()
        self.flushed = 0                       # writeback started below this offset
        self._flusher: ThreadPoolExecutor | None = None
        self._writeback: Future | None = None
        self.lock = asyncio.Lock()

    def record(self, offset: int, length: int) -> None:
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == offset:
            self.runs[-1][1] += length
        else:
            self.runs.append([offset, length])
        self.done = offset + length

    def meta(self) -> bytes:
        return json.dumps({"size": self.size, "source_id": self.source_id,
                           "done": self.done, "runs": self.runs}).encode()

    def start_writeback(self) -> None:
        """Have the kernel start writing what we wrote so far, so the fsync at commit finds
        little left to flush. On its own thread: sync_file_range may wait for the disk's
        queue, and puts must not."""
        if _sync_file_range is None or self.done - self.flushed < WRITEBACK_BYTES:
            return
        if self._writeback is not None and not self._writeback.done():
            return                             # the previous one is still queueing
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback")
        self._writeback = self._flusher.submit(
            _sync_file_range, self.fd, self.flushed, self.done - self.flushed,
            SYNC_FILE_RANGE_WRITE)
        self.flushed = self.done

    def close(self) -> None:
        self.digest.close()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)  # never close the fd under a running call
        os.close(self.fd)


class FileReceiver:
    """The destination's side of `ChunkPeer`, on real files under `root` (its
    instances_path). Nothing appears under a final name until it is complete and
    verified; a restarted receiver picks a transfer up again from its `.part-meta`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._transfers: dict[str, _Transfer] = {}
        self._committed: dict[str, str] = {}   # rel_path -> digest, to answer a retry
        self._lock = asyncio.Lock()            # opening or replacing a transfer

    def _path(self, rel_path: str) -> str:
        _check_rel_path(rel_path)
        return os.path.join(self.root, rel_path)

    async def begin(self, rel_path: str, size: int, source_id: str) -> int:
        final = self._path(rel_path)
        async with self._lock:
            old = self._transfers.pop(rel_path, None)
            if old is not None:
                old.close()
            t = await _io(_open_transfer, final, size, source_id)
            self._transfers[rel_path] = t
            return t.done

    async def put(self, rel_path: str, offset: int, data: bytes, crc32: int) -> None:
        t = await self._transfer(rel_path)
        if offset < 0 or offset + len(data) > t.size:
            raise DiskError(f"{rel_path}: chunk {offset}+{len(data)} outside size {t.size}")
        async with t.lock:
            await _io(_write_chunk, t, self._path(rel_path), offset, data, crc32)

    async def commit(self, rel_path: str, digest: str) -> None:
        final = self._path(rel_path)
        if rel_path not in self._transfers and not os.path.exists(final + META):
            # A retried commit. Only a restart forgets what was committed: then the file
            # under its final name is all we have to go by.
            if self._committed.get(rel_path, digest) == digest and os.path.exists(final):
                return
            raise DiskError(f"commit of {rel_path}: no transfer in progress")
        t = await self._transfer(rel_path)
        async with t.lock:
            del self._transfers[rel_path]
            await _io(_commit, t, final, digest)
            self._committed[rel_path] = digest

    async def _transfer(self, rel_path: str) -> _Transfer:
        t = self._transfers.get(rel_path)
        if t is not None:
            return t
        async with self._lock:
            t = self._transfers.get(rel_path)
            if t is None:
                # A restarted receiver: pick the transfer up from its meta file.
                final = self._path(rel_path)
                meta = await asyncio.to_thread(_read_meta, final)
                if meta is None:
                    raise DiskError(f"{rel_path}: no transfer in progress (begin first)")
                t = await _io(_open_transfer, final, meta["size"],
                                            meta["source_id"])
                self._transfers[rel_path] = t
            return t


async def _io(fn, *args):
    """Run blocking file work in a thread; an OSError (a full disk...) is a DiskError, so
    a remote caller gets one exception type whatever the file system said."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        raise DiskError(f"{fn.__name__.lstrip('_')}: {e}") from e


def _read_meta(final: str) -> dict | None:
    try:
        with open(final + META, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None                            # none, or torn: start the copy over
    if not (isinstance(meta, dict) and {"size", "source_id", "runs"} <= meta.keys()
            and os.path.exists(final + PART)):
        return None
    return meta


def _write_meta(final: str, t: _Transfer) -> None:
    tmp = final + META + ".tmp"
    with open(tmp, "wb") as f:
        f.write(t.meta())
    os.replace(tmp, final + META)


def _open_transfer(final: str, size: int, source_id: str) -> _Transfer:
    """Resume a `.part` of the same source, else start an empty sparse one."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    meta = _read_meta(final)
    if meta and meta["size"] == size and meta["source_id"] == source_id:
        fd = os.open(final + PART, os.O_RDWR)
        t = _Transfer(fd, size, source_id)
        if os.fstat(fd).st_size == size and _rehash(t, meta["runs"]):
            return t
        t.close()
    fd = os.open(final + PART, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)                     # holes stay holes: only data is written
    t = _Transfer(fd, size, source_id)
    _write_meta(final, t)
    return t


def _rehash(t: _Transfer, runs: list[list[int]]) -> bool:
    """Rebuild the running digest from the runs already on disk (after a restart)."""
    for offset, length in runs:
        for pos in range(offset, offset + length, CHUNK_BYTES):
            n = min(CHUNK_BYTES, offset + length - pos)
            data = os.pread(t.fd, n, pos)
            if len(data) != n:
                return False
            t.digest.update(pos, data)
        t.record(offset, length)
    return True


def _write_chunk(t: _Transfer, final: str, offset: int, data: bytes, crc32: int) -> None:
    if zlib.crc32(data) != crc32:
        raise ChunkChecksumError(f"{os.path.basename(final)}: chunk at {offset} "
                                 f"({len(data)} bytes) failed its CRC-32")
    end = offset + len(data)
    if end <= t.done:
        return                                 # a repeated put: already written
    if offset < t.done:                        # overlaps what we hold: keep the new tail
        data, offset = memoryview(data)[t.done - offset:], t.done
    written = os.pwrite(t.fd, data, offset)
    if written != len(data):
        raise DiskError(f"{final}{PART}: short write at {offset} ({written} of {len(data)})")
    t.digest.update(offset, data)
    t.record(offset, len(data))
    _write_meta(final, t)
    t.start_writeback()


def _commit(t: _Transfer, final: str, digest: str) -> None:
    try:
        mine = t.digest.hexdigest(t.size)
        if mine != digest:
            _drop_part(final)
            raise FileChecksumError(f"{final}: digest {mine[:16]}... of the received file "
                                    f"differs from the sender's {digest[:16]}...")
        os.fsync(t.fd)
    finally:
        t.close()
    os.replace(final + PART, final)
    _unlink(final + META)
    dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(dir_fd)                       # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def _drop_part(final: str) -> None:
    _unlink(final + PART)
    _unlink(final + META)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- sender

async def send_file(peer: ChunkPeer, src_path: str, rel_path: str,
                    chunk_bytes: int = CHUNK_BYTES) -> SendStats:
    """Stream `src_path` to `rel_path` on the peer; return what it took."""
    assert chunk_bytes > 0
    try:
        fd = os.open(src_path, os.O_RDONLY)
    except OSError as e:
        raise DiskError(f"cannot send {src_path}: {e}") from e
    try:
        st = os.fstat(fd)
        # Same file, same bytes: identifies a partial copy a restarted sender may resume.
        source_id = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        for attempt in range(1, FILE_ATTEMPTS_MAX + 1):
            stats = SendStats(file_bytes=st.st_size)
            stats.resumed_from = await peer.begin(rel_path, st.st_size, source_id)
            digest = await _stream(peer, fd, rel_path, stats, chunk_bytes)
            try:
                await peer.commit(rel_path, digest)
                return stats
            except FileChecksumError:
                if attempt == FILE_ATTEMPTS_MAX:
                    raise
        raise AssertionError("unreachable")
    finally:
        os.close(fd)


def _read_chunk(fd: int, offset: int, length: int, digest: RunDigest) -> tuple[bytes, int]:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise DiskError(f"short read at {offset}: the source changed while being sent")
    digest.update(offset, data)
    return data, zlib.crc32(data)


async def _stream(peer: ChunkPeer, fd: int, rel_path: str, stats: SendStats,
                  chunk_bytes: int) -> str:
    """Send every chunk past `stats.resumed_from`; return the whole-file digest. Reading
    and hashing chunk k+1 overlaps the put of chunk k (one put in flight keeps order)."""
    digest, resume = RunDigest(), stats.resumed_from
    in_flight: asyncio.Task | None = None
    try:
        for offset, length in chunk_extents(data_extents(fd, stats.file_bytes), chunk_bytes):
            stats.allocated_bytes += length
            data, crc = await _io(_read_chunk, fd, offset, length, digest)
            if offset + length <= resume:
                continue                       # the receiver holds it already
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(
                _put_with_retry(peer, rel_path, offset, data, crc, stats))
        if in_flight is not None:
            await in_flight
            in_flight = None
        return await asyncio.to_thread(digest.hexdigest, stats.file_bytes)
    finally:
        digest.close()
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()


async def _put_with_retry(peer: ChunkPeer, rel_path: str, offset: int, data: bytes,
                          crc: int, stats: SendStats) -> None:
    for attempt in range(1, CHUNK_RETRIES_MAX + 1):
        stats.bytes_sent += len(data)
        try:
            await peer.put(rel_path, offset, data, crc)
            stats.chunks += 1
            return
        except ChunkChecksumError as e:
            if attempt == CHUNK_RETRIES_MAX:
                raise DiskError(f"{rel_path}: chunk at {offset} failed its checksum "
                                f"{attempt} times, giving up: {e}") from e
            stats.retries += 1


class PeerSink:
    """A `DiskSink` that streams through a `ChunkPeer`; keeps each file's SendStats."""

    def __init__(self, peer: ChunkPeer, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.peer = peer
        self.chunk_bytes = chunk_bytes
        self.sent: dict[str, SendStats] = {}

    async def send_file(self, src_path: str, rel_path: str) -> int:
        stats = await send_file(self.peer, src_path, rel_path, self.chunk_bytes)
        self.sent[rel_path] = stats
        return stats.bytes_sent


# --------------------------------------------------------------------------- local copy

def copy_sparse(src_path: str, dst_path: str) -> int:
    """Copy data extents only (holes stay holes) with copy_file_range; return bytes copied.
    Blocking. The caller writes to a temporary name and renames."""
    copied = 0
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        os.ftruncate(dst.fileno(), size)
        for offset, length in data_extents(src.fileno(), size):
            copied += _copy_range(src.fileno(), dst.fileno(), offset, length)
        os.fsync(dst.fileno())
    return copied


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        n = os.copy_file_range(fd_in, fd_out, length - done, offset + done, offset + done)
        if n == 0:
            raise DiskError(f"source shrank while copying at {offset + done}")
        done += n
    return done
