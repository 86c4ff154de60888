"""Disk transport between hosts: a chunked stream for hosts that do not share storage,
and a local copy for a destination this host can write itself.

The stream: the sender (`send_file`) walks a file's data extents (SEEK_DATA/SEEK_HOLE:
holes are never sent), cuts them into chunks and pushes them through a `ChunkPeer`; the
destination's `FileReceiver` writes them into a sparse `<final>.part`, records its
progress in `<final>.part-meta` so a restarted copy resumes, and renames to the final name
only when the whole-file digest matches. `PeerSink` adapts a peer to the driver's
`DiskSink`. Each side reads or writes every byte once and hashes it once: the sender
reads and hashes chunk k+1 while the receiver verifies and writes chunk k, the receiver
hashing a chunk while its own thread writes it (the chunk counts only once verified),
and the receiver has the kernel start writing back as it goes, so the final fsync finds
little left to do.

The local copy (`LocalSink`, `copy_sparse`): the kernel copies the data extents
(os.copy_file_range: no byte through user space, a reflink where the file system can)
into `<final>.part`, which is fsynced and renamed; an interrupted copy resumes.

Digest: BLAKE3 (the `blake3` package) over the file's data runs, each run prefixed with
its offset, then the size. Holes are implied by offsets and size, so two files with the
same digest have the same content, and no zeros are ever hashed. BLAKE3 is a 256-bit
cryptographic hash: a corrupted, truncated or misplaced byte goes unnoticed with
probability 2**-256, even if the damage were crafted, and it hashes several times
faster than SHA-256 (which was the bottleneck of a copy). Each chunk carries the digest
of everything up to its end (the running hash, finalized without being consumed): the
receiver checks it before writing, so one hash per byte serves both the chunk check (a
bad chunk is refused and sent again) and the whole-file check at commit.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import blake3

from vmresize.drivers.base import DiskError

CHUNK_BYTES = 1 << 20        # small enough to stay in cache between write and hash
WRITEBACK_BYTES = 32 << 20   # start the kernel's writeback of a .part every this many bytes
META_EVERY_BYTES = 64 << 20  # a local copy records its progress every this many bytes
CHUNK_RETRIES_MAX = 3        # puts of one chunk that failed their check before giving up
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
    """A chunk arrived whose check does not match its data (the sender sends it again)."""


class FileChecksumError(DiskError):
    """The received file's digest differs from the sender's; the partial copy is dropped."""


class ChunkPeer(Protocol):
    """What a destination exposes to senders. Each method is one remote call with plain,
    picklable arguments, and every call is idempotent (a retried call is harmless)."""

    async def begin(self, rel_path: str, size: int, source_id: str) -> int:
        """Open `rel_path.part` for a file of `size` bytes; return the offset up to which a
        previous copy of the same source (`source_id`) already holds verified data."""

    async def put(self, rel_path: str, offset: int, data: bytes | bytearray,
                  check: bytes) -> None:
        """Write one chunk. `check` is the digest of the file's runs up to the chunk's end
        (`RunDigest.check`); ChunkChecksumError when the data does not match it. The
        sender reuses `data`'s buffer once the call returned."""

    async def commit(self, rel_path: str, digest: str) -> None:
        """Verify the whole-file digest, fsync, rename `.part` to the final name."""


@dataclass
class SendStats:
    file_bytes: int = 0          # the file's size (holes included)
    allocated_bytes: int = 0     # bytes in data extents
    bytes_sent: int = 0          # chunk bytes put or copied (retries included)
    chunks: int = 0              # chunks put or copied successfully
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
    """BLAKE3 of data runs with their offsets (see module docstring). Feeding the same
    bytes at the same offsets in any chunking gives the same digest, and the same
    `check` at the same end offset."""

    def __init__(self) -> None:
        self._h = blake3.blake3()
        self.end = -1                          # where the last update ended

    def update(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self.end:
            self._h.update(b"@" + offset.to_bytes(8, "little"))
        self._h.update(data)                   # blake3 releases the GIL on large inputs
        self.end = offset + len(data)

    def check(self) -> bytes:
        """The digest of what was fed so far (the hash goes on being usable)."""
        return self._h.digest()

    def copy(self) -> "RunDigest":
        other = RunDigest()
        other._h, other.end = self._h.copy(), self.end
        return other

    def hexdigest(self, size: int) -> str:
        h = self._h.copy()
        h.update(b"$" + size.to_bytes(8, "little"))
        return h.hexdigest()

    def close(self) -> None:
        """Nothing to release (kept for callers of the threaded version)."""


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
        self.meta_fd: int | None = None        # .part-meta, rewritten in place
        self.meta_bytes = 0
        self._flusher: ThreadPoolExecutor | None = None
        self._writeback: Future | None = None
        self._writer: ThreadPoolExecutor | None = None
        self.lock = asyncio.Lock()

    def write_while(self, data, offset: int, work: Callable[[], bool]) -> int:
        """pwrite `data` at `offset` on the transfer's writer thread while `work()` runs
        here (both release the GIL); raise what either raised. Returns bytes written."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-write")
        written = self._writer.submit(os.pwrite, self.fd, data, offset)
        try:
            work()
        finally:
            result = written.result()       # never leave a write running behind us
        return result

    def record(self, offset: int, length: int) -> None:
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == offset:
            self.runs[-1][1] += length
        else:
            self.runs.append([offset, length])
        self.done = offset + length

    def meta(self) -> bytes:
        # `check` lets a restarted receiver tell whether the .part still holds what was
        # recorded (a power cut may have lost pages the meta file outlived).
        return json.dumps({"size": self.size, "source_id": self.source_id,
                           "done": self.done, "runs": self.runs,
                           "check": self.digest.check().hex()}).encode()

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
        for pool in (self._flusher, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)       # never close the fd under a running call
        os.close(self.fd)
        if self.meta_fd is not None:
            os.close(self.meta_fd)


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

    async def put(self, rel_path: str, offset: int, data: bytes, check: bytes) -> None:
        t = await self._transfer(rel_path)
        if offset < 0 or offset + len(data) > t.size:
            raise DiskError(f"{rel_path}: chunk {offset}+{len(data)} outside size {t.size}")
        async with t.lock:
            await _io(_write_chunk, t, self._path(rel_path), offset, data, check)

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
    if not (isinstance(meta, dict) and {"size", "source_id", "runs", "check"} <= meta.keys()
            and os.path.exists(final + PART)):
        return None
    return meta


def _write_meta(final: str, t: _Transfer, fresh: bool = False) -> None:
    """Rewrite the meta file in place (a rename per chunk costs more than the chunk):
    padded with spaces, which JSON ignores. A torn meta file does not parse, and one that
    parses but lies is caught by its `check`: either way the copy starts over."""
    if t.meta_fd is None:
        t.meta_fd = os.open(final + META, os.O_RDWR | os.O_CREAT
                            | (os.O_TRUNC if fresh else 0), 0o644)
        t.meta_bytes = 0 if fresh else os.fstat(t.meta_fd).st_size
    data = t.meta()
    if len(data) < t.meta_bytes:
        data += b" " * (t.meta_bytes - len(data))
    os.pwrite(t.meta_fd, data, 0)
    t.meta_bytes = len(data)


def _open_transfer(final: str, size: int, source_id: str) -> _Transfer:
    """Resume a `.part` of the same source, else start an empty sparse one."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    meta = _read_meta(final)
    if meta and meta["size"] == size and meta["source_id"] == source_id:
        fd = os.open(final + PART, os.O_RDWR)
        t = _Transfer(fd, size, source_id)
        if (os.fstat(fd).st_size == size and _rehash(t, meta["runs"])
                and t.digest.check().hex() == meta["check"]):
            return t
        t.close()
    fd = os.open(final + PART, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)                     # holes stay holes: only data is written
    t = _Transfer(fd, size, source_id)
    _write_meta(final, t, fresh=True)
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


def _write_chunk(t: _Transfer, final: str, offset: int, data: bytes, check: bytes) -> None:
    """Verify one chunk against the sender's running digest while it is written: one hash
    of each byte, overlapped with the write. Bytes past `t.done` count only once verified
    (`done`, the runs and the meta file move after the check): a chunk that fails its
    check leaves bytes no one relies on, which its retry overwrites."""
    end = offset + len(data)
    if end <= t.done:
        return                                 # a repeated put: already written
    if offset < t.done:                        # overlaps what we hold: keep the new tail
        data, offset = memoryview(data)[t.done - offset:], t.done
    before = t.digest.copy()
    try:
        written = t.write_while(data, offset, lambda: t.digest.update(offset, data))
    except BaseException:
        t.digest = before
        raise
    if t.digest.check() != check:
        t.digest = before
        raise ChunkChecksumError(f"{os.path.basename(final)}: chunk at {offset} "
                                 f"({len(data)} bytes) does not match its check")
    if written != len(data):
        t.digest = before
        raise DiskError(f"{final}{PART}: short write at {offset} ({written} of {len(data)})")
    t.record(offset, len(data))
    # After every chunk: a receiver restarted between two puts must know all it holds.
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
        source_id = _source_id(st)
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


def _source_id(st: os.stat_result) -> str:
    """Same file, same bytes: identifies a partial copy a restarted sender may resume."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _read_chunk(fd: int, offset: int, buf: bytearray, digest: RunDigest) -> bytes:
    """Read one chunk into `buf` (its length is the chunk's) and hash it, on a worker
    thread; return its check."""
    if os.preadv(fd, [buf], offset) != len(buf):
        raise DiskError(f"short read at {offset}: the source changed while being sent")
    digest.update(offset, buf)
    return digest.check()


async def _stream(peer: ChunkPeer, fd: int, rel_path: str, stats: SendStats,
                  chunk_bytes: int) -> str:
    """Send every chunk past `stats.resumed_from`; return the whole-file digest. Reading
    and hashing chunk k+1 overlaps the put of chunk k (one put in flight keeps order).
    Chunks are read into two buffers in turn, allocated once: a fresh buffer per chunk
    costs the kernel a page fault per page, more than the read itself. A peer is done
    with a chunk's data when its put returns."""
    digest, resume = RunDigest(), stats.resumed_from
    full = min(chunk_bytes, stats.file_bytes)  # a small file needs no chunk-sized buffers
    spare, busy = bytearray(full), bytearray(full)
    in_flight: asyncio.Task | None = None
    try:
        for offset, length in chunk_extents(data_extents(fd, stats.file_bytes), chunk_bytes):
            stats.allocated_bytes += length
            buf = spare if length == full else bytearray(length)
            check = await _io(_read_chunk, fd, offset, buf, digest)
            if offset + length <= resume:
                continue                       # the receiver holds it already
            if in_flight is not None:
                await in_flight                # `busy` is free again
            in_flight = asyncio.ensure_future(
                _put_with_retry(peer, rel_path, offset, buf, check, stats))
            if buf is spare:
                spare, busy = busy, spare
        if in_flight is not None:
            await in_flight
            in_flight = None
        return digest.hexdigest(stats.file_bytes)
    finally:
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()


async def _put_with_retry(peer: ChunkPeer, rel_path: str, offset: int, data: bytes,
                          check: bytes, stats: SendStats) -> None:
    for attempt in range(1, CHUNK_RETRIES_MAX + 1):
        stats.bytes_sent += len(data)
        try:
            await peer.put(rel_path, offset, data, check)
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

class LocalSink:
    """A `DiskSink` for a destination this host writes itself (shared storage, the same
    host): `root` is the destination's instances path. The kernel copies the data
    extents of each file into `<final>.part` (holes stay holes), which is fsynced and
    renamed. Progress is recorded in `<final>.part-meta` every `record_every_bytes`, after
    an fdatasync of what it covers, so a copy interrupted mid-file resumes there.

    Nothing crosses a channel, so there is no chunk to check: the kernel moves the bytes
    within one machine. `after_chunk(offset)` is called after each chunk is copied (for
    fault injection in tests)."""

    def __init__(self, root: str, chunk_bytes: int = CHUNK_BYTES,
                 record_every_bytes: int = META_EVERY_BYTES,
                 after_chunk: Callable[[int], None] | None = None) -> None:
        assert chunk_bytes > 0 and record_every_bytes > 0
        self.root = root
        self.chunk_bytes = chunk_bytes
        self.record_every_bytes = record_every_bytes
        self.after_chunk = after_chunk
        self.sent: dict[str, SendStats] = {}

    async def send_file(self, src_path: str, rel_path: str) -> int:
        _check_rel_path(rel_path)
        stats = await _io(self._copy, src_path, os.path.join(self.root, rel_path))
        self.sent[rel_path] = stats
        return stats.bytes_sent

    def _copy(self, src_path: str, final: str) -> SendStats:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with open(src_path, "rb") as src:
            st = os.fstat(src.fileno())
            stats = SendStats(file_bytes=st.st_size)
            source_id = _source_id(st)
            meta = _read_local_meta(final)
            resume = meta["done"] if meta and meta["source_id"] == source_id else 0
            flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC)
            out = os.open(final + PART, flags, 0o644)
            try:
                if os.fstat(out).st_size != st.st_size or not resume:
                    resume = 0
                    os.ftruncate(out, 0)
                    os.ftruncate(out, st.st_size)
                stats.resumed_from = recorded = resume
                for offset, length in chunk_extents(data_extents(src.fileno(), st.st_size),
                                                    self.chunk_bytes):
                    stats.allocated_bytes += length
                    if offset + length <= resume:
                        continue
                    stats.bytes_sent += _copy_range(src.fileno(), out, offset, length)
                    stats.chunks += 1
                    if offset + length - recorded >= self.record_every_bytes:
                        os.fdatasync(out)      # the meta file never claims unsynced data
                        recorded = offset + length
                        _write_local_meta(final, st.st_size, source_id, recorded)
                    if self.after_chunk is not None:
                        self.after_chunk(offset)
                os.fsync(out)
            finally:
                os.close(out)
        os.replace(final + PART, final)
        _unlink(final + META)
        _fsync_dir(os.path.dirname(final))
        return stats


def _read_local_meta(final: str) -> dict | None:
    try:
        with open(final + META, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and {"size", "source_id", "done"} <= meta.keys()
            and meta.get("local") is True):
        return None
    return meta


def _write_local_meta(final: str, size: int, source_id: str, done: int) -> None:
    tmp = final + META + ".tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps({"local": True, "size": size, "source_id": source_id,
                            "done": done}).encode())
    os.replace(tmp, final + META)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Copy [offset, offset + length) in the kernel; by pread/pwrite where the kernel
    cannot copy between these two files (another file system on an old kernel)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(fd_in, fd_out, length - done, offset + done,
                                   offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            data = os.pread(fd_in, min(length - done, CHUNK_BYTES), offset + done)
            n = len(data) and os.pwrite(fd_out, data, offset + done)
        if n == 0:
            raise DiskError(f"source shrank while copying at {offset + done}")
        done += n
    return done
