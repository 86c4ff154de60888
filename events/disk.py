"""The log's I/O boundary: every file operation of `vmresize.events.log` goes through a `Disk`.

`OsDisk` is the real file system (the default). `SimDisk` is its simulated twin for tests
and the simulator: deterministic (all its choices come from the `random.Random` it is
given) and modelled on what a real disk does at a power cut:

- file data written but not fsynced is lost on `crash()`, except that a prefix of the
  unsynced writes may survive, the last of them torn at any byte;
- a name created, renamed or removed in a directory that was not fsynced since may be
  undone by a crash (each directory keeps an ordered journal of its changes; a crash
  keeps a prefix of it, so a rename is never half done). Directories themselves are
  durable as soon as they are made;
- faults on demand: `set_free_bytes(n)` (writes beyond it are short, then raise ENOSPC),
  `fail_fsync(times)` (fsync raises EIO and, as Linux does, forgets the unsynced data it
  failed to write: a later fsync that succeeds does not bring it back), `corrupt(path)`
  (flips one bit of a file, durably);
- `on_fsync(path)` is called before every fsync: tests block there, or crash there.
- `preallocate` (0 unless asked) is how far ahead the log zero-fills its segment files,
  as it does on a real disk (`OsDisk.preallocate`): tests ask for it to cut power with
  a preallocated tail.

Memory: what a crash would leave of a file (its durable bytes) is kept in an unlinked
real temporary file (under `spill_dir`), not in memory; only the writes since the last
fsync are, so a long log costs the simulator no memory.

The simulator's use: one `SimDisk(random.Random(seed))` per simulated machine; open
`SegmentLog(path, disk=disk)` and `save_snapshot(..., disk=disk)` as on a real host; on a
host crash call `disk.crash()` and open the log again (the real recovery path runs: torn
tail truncated and reported, acknowledged records intact); at the end `disk.sync_all()`
if wanted, then `disk.export(state_dir, under=state_dir)` writes the durable files out to
a real directory that `vmresize audit` reads. `SimDisk.inline` (True unless asked
otherwise) tells the log that operations never block, so `append_async` does its write
and fsync on the caller's thread: no thread, the same history for the same seed.

A handle is what `open` returns (an fd for `OsDisk`); pass it back to the same disk.
After a crash, handles from before it raise OSError(EBADF): the process that held them
is gone.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import random
import tempfile
import threading
from typing import Any, Callable, Protocol

OPEN_MODES = ("r", "a", "x", "w", "r+", "x+")
_COPY_BYTES = 1 << 20                  # export copies a file this much at a time


class Disk(Protocol):
    """What the log needs from a file system. Paths are str or os.PathLike."""

    # True when no operation ever blocks (an in-memory disk): the log then writes and
    # fsyncs on the caller's thread even for `append_async`.
    inline: bool

    # Bytes by which the log extends a segment file ahead of its appends, zero-filled
    # and fsynced once, so that each append's fsync overwrites allocated blocks and
    # need not commit a new file size (0: the file grows with every append).
    preallocate: int

    def open(self, path, mode: str) -> Any:
        """"r" read, "a" append to an existing file, "x" create a new file to append to
        (FileExistsError if it exists), "w" create or truncate, then write; "r+" an
        existing file and "x+" a new one, read and written at positions (`pwrite`)."""

    def write(self, handle, data) -> int:
        """Write at the end of an "a"/"x" file (or the position of a "w" one); may write
        fewer bytes than given (a full disk); returns how many."""

    def pread(self, handle, size: int, offset: int) -> bytes: ...

    def pwrite(self, handle, data, offset: int) -> int:
        """Write at byte `offset` of an "r+"/"x+" file; may write fewer bytes than given
        (a full disk); returns how many."""

    def fsync(self, handle) -> None:
        """The file's data and what is needed to read it back (its size) are durable."""

    def truncate(self, handle, size: int) -> None: ...

    def size(self, handle) -> int: ...

    def close(self, handle) -> None: ...

    def lock(self, path) -> Any:
        """Create `path` if needed and take an exclusive lock on it; BlockingIOError if
        someone holds it. `close` the handle to release it."""

    def file_size(self, path) -> int: ...

    def list_dir(self, path) -> list[str]:
        """Names in a directory; FileNotFoundError if there is none."""

    def is_dir(self, path) -> bool: ...

    def make_dirs(self, path) -> None:
        """Make a directory and its missing parents (no error if it exists)."""

    def fsync_dir(self, path) -> None:
        """Names created, renamed and removed in the directory are durable."""

    def rename(self, src, dst) -> None:
        """Atomically replace `dst` by `src` (same directory)."""

    def unlink(self, path) -> None: ...


# --------------------------------------------------------------------------- OsDisk

_OS_FLAGS = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND,
             "x": os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "r+": os.O_RDWR, "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL}


class OsDisk:
    """The real file system; handles are file descriptors."""

    inline = False
    preallocate = 1024 * 1024

    def open(self, path, mode: str) -> int:
        return os.open(path, _OS_FLAGS[mode], 0o644)

    write = staticmethod(os.write)
    pread = staticmethod(os.pread)
    pwrite = staticmethod(os.pwrite)
    truncate = staticmethod(os.ftruncate)
    close = staticmethod(os.close)
    # fdatasync: the data and what is needed to read it back (the size), which is all an
    # append needs; it does not wait for the timestamps, as fsync does. Directories are
    # synced with fsync (fsync_dir).
    fsync = staticmethod(getattr(os, "fdatasync", os.fsync))

    @staticmethod
    def size(handle: int) -> int:
        return os.fstat(handle).st_size

    @staticmethod
    def lock(path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    file_size = staticmethod(os.path.getsize)
    list_dir = staticmethod(os.listdir)
    is_dir = staticmethod(os.path.isdir)
    rename = staticmethod(os.replace)
    unlink = staticmethod(os.unlink)

    @staticmethod
    def make_dirs(path) -> None:
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def fsync_dir(path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS_DISK = OsDisk()


# --------------------------------------------------------------------------- SimDisk

class _Inode:
    """A file. Its durable bytes (what a power cut would leave) live in a real temporary
    file, so that a long log does not stay in memory. In memory: the writes since the
    last fsync, in order, of which a crash may keep a prefix (`pending`: (offset, data)
    writes, (size, None) truncations), and the operations that turn the durable bytes
    into what reads see (`overlay`: the same operations as `pending`, unless a failed
    fsync made the kernel forget some of them or `corrupt` flipped a bit that is not
    durable: then `diverged`)."""

    __slots__ = ("file", "durable_size", "size", "pending", "overlay", "diverged")

    def __init__(self, spill_dir: str | None) -> None:
        # Unlinked: gone once closed. Unbuffered: reads and writes go through pread/pwrite.
        self.file = tempfile.TemporaryFile(dir=spill_dir, buffering=0)
        self.durable_size = 0
        self.size = 0                       # the size reads see
        self.pending: list[tuple[int, bytes | None]] = []
        self.overlay: list[tuple[int, bytes | None]] = []
        self.diverged = False

    def record(self, offset: int, data: bytes | None) -> None:
        op = (offset, data)
        self.pending.append(op)
        self.overlay.append(op)
        self.size = offset if data is None else max(self.size, offset + len(data))

    def read(self, offset: int, size: int) -> bytes:
        """What reads see of bytes [offset, offset + size)."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        base = self.read_durable(offset, size)
        if not self.overlay:
            return base
        window = bytearray(base)
        window.extend(bytes(size - len(window)))
        length, end = self.durable_size, offset + size      # the size as ops replay
        for at, data in self.overlay:
            if data is None:                # a truncation: what it cuts reads as zeros
                if at < length and at < end:
                    lo = max(at, offset) - offset
                    window[lo:] = bytes(size - lo)
                length = at
                continue
            length = max(length, at + len(data))
            lo, hi = max(at, offset), min(at + len(data), end)
            if lo < hi:
                window[lo - offset:hi - offset] = data[lo - at:hi - at]
        return bytes(window)

    def read_durable(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.durable_size - offset))
        return os.pread(self.file.fileno(), size, offset) if size else b""

    def make_durable(self, ops) -> None:
        """Apply `ops` to the durable bytes."""
        fd = self.file.fileno()
        for offset, data in ops:
            if data is None:
                os.ftruncate(fd, offset)
                self.durable_size = offset
            else:
                os.pwrite(fd, data, offset)     # a gap before `offset` reads as zeros
                self.durable_size = max(self.durable_size, offset + len(data))

    def sync(self) -> None:
        """The pending operations become durable; reads see what they saw."""
        whole = self.read(0, self.size) if self.diverged else None
        self.make_durable(self.pending)
        self.pending = []
        self.overlay = []
        self.diverged = False
        if whole is not None and whole != self.read_durable(0, self.durable_size):
            self.overlay = [(0, None), (0, whole)]      # rare: keep the whole file
            self.diverged = True

    def forget_pending(self) -> None:
        """A failed fsync: the kernel forgets the unsynced writes (reads still see them)."""
        self.diverged = self.diverged or bool(self.pending)
        self.pending = []

    def settle(self) -> None:
        """After a crash: reads see the durable bytes."""
        self.pending, self.overlay, self.diverged = [], [], False
        self.size = self.durable_size


class _Dir:
    """A directory's names as listings see them, as a power cut would leave them, and
    the changes in between: each one a list of (name, inode or None) applied together."""

    __slots__ = ("entries", "durable", "journal", "subdirs")

    def __init__(self) -> None:
        self.entries: dict[str, _Inode] = {}
        self.durable: dict[str, _Inode] = {}
        self.journal: list[list[tuple[str, _Inode | None]]] = []
        self.subdirs: set[str] = set()

    def change(self, *changes: tuple[str, _Inode | None]) -> None:
        self.journal.append(list(changes))
        _apply_names(self.entries, changes)


def _apply_names(entries: dict, changes) -> None:
    for name, inode in changes:
        if inode is None:
            entries.pop(name, None)
        else:
            entries[name] = inode


class _Handle:
    __slots__ = ("path", "inode", "mode", "generation", "closed", "locked", "position")

    def __init__(self, path: str, inode: _Inode, mode: str, generation: int) -> None:
        self.path, self.inode, self.mode, self.generation = path, inode, mode, generation
        self.closed = self.locked = False
        self.position = 0                  # where a "w" handle writes next


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _atomic(method):
    """One operation at a time: a log's writer thread and its readers share a disk."""
    @functools.wraps(method)
    def atomic(self, *args, **kwargs):
        with self._mutex:
            return method(self, *args, **kwargs)
    return atomic


class SimDisk:
    """An in-memory disk that loses unsynced writes at `crash()` (see the module
    docstring). Each operation is atomic; `on_fsync` runs outside that, so it may block."""

    def __init__(self, rng: random.Random, *, inline: bool = True,
                 preallocate: int = 0, spill_dir: str | None = None) -> None:
        if preallocate < 0:
            raise ValueError(f"preallocate must be >= 0, got {preallocate}")
        self._mutex = threading.RLock()
        self.rng = rng
        self.inline = inline
        self.preallocate = preallocate     # 0 by default: the simulator's files stay small
        self.spill_dir = spill_dir          # where files keep their durable bytes
        self.on_fsync: Callable[[str], None] | None = None
        self.fsyncs = 0                    # file fsyncs that succeeded
        self.dir_fsyncs = 0
        self.crashes = 0
        self._dirs: dict[str, _Dir] = {}
        self._locks: set[str] = set()
        self._generation = 0
        self._capacity: int | None = None  # total file bytes allowed, None: unlimited
        self._open: dict[_Handle, None] = {}
        self._fsync_failures = 0

    # -- faults

    @_atomic
    def set_free_bytes(self, free: int | None) -> None:
        """From now on writes may add `free` more bytes in all; None: no limit."""
        self._capacity = None if free is None else self._used() + max(0, free)

    @_atomic
    def fail_fsync(self, times: int = 1) -> None:
        """The next `times` fsyncs (of files or directories) raise OSError(EIO)."""
        self._fsync_failures += times

    @_atomic
    def corrupt(self, path, offset: int | None = None) -> int:
        """Flip one bit of a file (at a random byte unless `offset` is given), in what
        reads see and in what survives a crash. Returns the byte's offset."""
        inode = self._inode(path)
        size = inode.size
        if size == 0:
            raise ValueError(f"{path}: cannot corrupt an empty file")
        offset = self.rng.randrange(size) if offset is None else offset
        bit = 1 << self.rng.randrange(8)
        flipped = bytes([inode.read(offset, 1)[0] ^ bit])
        if offset < inode.durable_size:
            inode.make_durable([(offset, bytes([inode.read_durable(offset, 1)[0] ^ bit]))])
        if inode.read(offset, 1) != flipped:        # the byte read is not the durable one
            inode.overlay.append((offset, flipped))
            inode.diverged = True
        return offset

    @_atomic
    def crash(self, keep_bytes: int | None = None, keep_changes: int | None = None) -> None:
        """A power cut and reboot. In each directory a prefix of the name changes since
        its last fsync survives (`keep_changes` of them, or a random number); in each file
        a prefix of the unsynced writes and truncations survives (up to `keep_bytes`
        bytes of writes, or a random prefix), the last write possibly torn. Every handle
        opened before is dead."""
        self.crashes += 1
        self._generation += 1
        self._locks.clear()
        self._open.clear()
        inodes: dict[int, _Inode] = {}
        for d in self._dirs.values():
            keep = len(d.journal)
            keep = self.rng.randint(0, keep) if keep_changes is None else min(keep_changes, keep)
            for changes in d.journal[:keep]:
                _apply_names(d.durable, changes)
            d.journal.clear()
            d.entries = dict(d.durable)
            for inode in d.entries.values():
                inodes[id(inode)] = inode
        for inode in inodes.values():
            self._settle_after_crash(inode, keep_bytes)

    def _settle_after_crash(self, inode: _Inode, keep_bytes: int | None) -> None:
        """Apply the prefix of the unsynced operations that a power cut let through.
        Random: the first k of them, and maybe a torn prefix of the next write. With
        `keep_bytes`: operations up to the write that does not fit in what is left of
        `keep_bytes`, which keeps just that many bytes. A torn write ends what survives."""
        ops = inode.pending
        if keep_bytes is None:
            kept = self.rng.randint(0, len(ops))
            survivors = ops[:kept]
            if kept < len(ops) and ops[kept][1] is not None:
                offset, data = ops[kept]
                survivors.append((offset, data[:self.rng.randrange(len(data) or 1)]))
        else:
            survivors, left = [], keep_bytes
            for offset, data in ops:
                if data is not None and len(data) > left:
                    survivors.append((offset, data[:left]))
                    break
                survivors.append((offset, data))
                left -= 0 if data is None else len(data)
        inode.make_durable(survivors)
        inode.settle()

    @_atomic
    def durable_bytes(self, path, offset: int = 0) -> bytes:
        """What a crash now would leave of the file's data (if its name survives), from
        byte `offset` on."""
        inode = self._inode(path)
        return inode.read_durable(offset, inode.durable_size - offset)

    @_atomic
    def sync_all(self) -> None:
        """Make everything durable, as sync(2) does."""
        for d in self._dirs.values():
            for changes in d.journal:
                _apply_names(d.durable, changes)
            d.journal.clear()
            for inode in d.entries.values():
                inode.sync()

    @_atomic
    def export(self, target, under, *, fsync: bool = True) -> list[str]:
        """Write the durable files under the directory `under` (what a power cut would
        leave) to the real directory `target`, keeping their relative paths; return the
        paths written."""
        root, written = self._norm(under), []
        for path, d in sorted(self._dirs.items()):
            if path != root and not path.startswith(root.rstrip("/") + "/"):
                continue
            out_dir = os.path.join(target, os.path.relpath(path, root))
            os.makedirs(out_dir, exist_ok=True)
            for name, inode in sorted(d.durable.items()):
                out = os.path.join(out_dir, name)
                with open(out, "wb") as f:
                    for at in range(0, inode.durable_size, _COPY_BYTES):
                        f.write(inode.read_durable(at, _COPY_BYTES))
                    if fsync:
                        os.fsync(f.fileno())
                written.append(out)
            if fsync:
                OsDisk.fsync_dir(out_dir)
        return written

    @_atomic
    def forget(self) -> None:
        """Drop every file, directory and lock: the disk is empty again (its files were
        exported, say, and its memory is wanted back)."""
        for d in self._dirs.values():
            for table in (d.entries, d.durable):
                for inode in table.values():
                    inode.file.close()          # its temporary file goes at once
            for changes in d.journal:
                for _, inode in changes:
                    if inode is not None:
                        inode.file.close()
        self._dirs.clear()
        self._locks.clear()
        self._open.clear()

    # -- the Disk interface

    @_atomic
    def open(self, path, mode: str) -> _Handle:
        if mode not in OPEN_MODES:
            raise ValueError(f"open mode must be one of {OPEN_MODES}, got {mode!r}")
        path = self._norm(path)
        d, name = self._parent(path)
        inode = d.entries.get(name)
        if mode in ("x", "x+") and inode is not None:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if mode in ("r", "a", "r+") and inode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if inode is None:
            inode = _Inode(self.spill_dir)
            d.change((name, inode))
        elif mode == "w":
            inode.record(0, None)
        handle = _Handle(path, inode, mode, self._generation)
        self._open[handle] = None
        return handle

    @_atomic
    def write(self, handle: _Handle, data) -> int:
        inode = self._live(handle)
        if handle.mode == "r":
            raise _oserror(errno.EBADF, handle.path)
        offset = handle.position if handle.mode == "w" else inode.size
        written = self._write_at(handle, inode, data, offset)
        handle.position = offset + written
        return written

    @_atomic
    def pwrite(self, handle: _Handle, data, offset: int) -> int:
        inode = self._live(handle)
        if handle.mode not in ("r+", "x+"):
            raise _oserror(errno.EBADF, handle.path)
        return self._write_at(handle, inode, data, offset)

    def _write_at(self, handle: _Handle, inode: _Inode, data, offset: int) -> int:
        data = bytes(data)
        if self._capacity is not None:
            room = self._capacity - self._used()
            grows = max(0, offset + len(data) - inode.size)
            if grows > room:
                if len(data) - (grows - room) <= 0:
                    raise _oserror(errno.ENOSPC, handle.path)
                data = data[:len(data) - (grows - room)]       # a short write
        inode.record(offset, data)
        return len(data)

    @_atomic
    def pread(self, handle: _Handle, size: int, offset: int) -> bytes:
        return self._live(handle).read(offset, size)

    def fsync(self, handle: _Handle) -> None:
        if self.on_fsync is not None:
            self.on_fsync(handle.path)
        with self._mutex:
            self._fsync(handle)

    def _fsync(self, handle: _Handle) -> None:
        inode = self._live(handle)          # the hook may have crashed the disk
        if self._fsync_failures:
            self._fsync_failures -= 1
            inode.forget_pending()          # the kernel forgets what it failed to write
            raise _oserror(errno.EIO, handle.path)
        inode.sync()
        self.fsyncs += 1

    @_atomic
    def truncate(self, handle: _Handle, size: int) -> None:
        inode = self._live(handle)
        if handle.mode == "r":
            raise _oserror(errno.EBADF, handle.path)
        inode.record(size, None)

    @_atomic
    def size(self, handle: _Handle) -> int:
        return self._live(handle).size

    @_atomic
    def close(self, handle: _Handle) -> None:
        if handle.generation != self._generation or handle.closed:
            return                          # the crash closed it already
        handle.closed = True
        self._open.pop(handle, None)
        if handle.locked:
            self._locks.discard(handle.path)

    @_atomic
    def lock(self, path) -> _Handle:
        path = self._norm(path)
        if path in self._locks:
            raise BlockingIOError(errno.EAGAIN, "the lock is held", path)
        d, name = self._parent(path)
        handle = self.open(path, "a" if name in d.entries else "x")
        handle.locked = True
        self._locks.add(path)
        return handle

    @_atomic
    def file_size(self, path) -> int:
        return self._inode(path).size

    @_atomic
    def list_dir(self, path) -> list[str]:
        path = self._norm(path)
        d = self._dirs.get(path)
        if d is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return sorted(d.subdirs) + list(d.entries)

    @_atomic
    def is_dir(self, path) -> bool:
        return self._norm(path) in self._dirs

    @_atomic
    def make_dirs(self, path) -> None:
        path = self._norm(path)
        if path in self._dirs:
            return
        parent = os.path.dirname(path)
        if parent != path:
            self.make_dirs(parent)
            pd = self._dirs[parent]
            if os.path.basename(path) in pd.entries:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            pd.subdirs.add(os.path.basename(path))
        self._dirs[path] = _Dir()

    def fsync_dir(self, path) -> None:
        path = self._norm(path)
        if self.on_fsync is not None:
            self.on_fsync(path)
        with self._mutex:
            self._fsync_dir(path)

    def _fsync_dir(self, path: str) -> None:
        d = self._dirs.get(path)
        if d is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if self._fsync_failures:
            self._fsync_failures -= 1
            raise _oserror(errno.EIO, path)
        for changes in d.journal:
            _apply_names(d.durable, changes)
        d.journal.clear()
        self.dir_fsyncs += 1

    @_atomic
    def rename(self, src, dst) -> None:
        src, dst = self._norm(src), self._norm(dst)
        sd, sname = self._parent(src)
        dd, dname = self._parent(dst)
        if sd is not dd:
            raise OSError(errno.EXDEV, "SimDisk renames within one directory only", src)
        inode = sd.entries.get(sname)
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src)
        if src != dst:
            sd.change((dname, inode), (sname, None))

    @_atomic
    def unlink(self, path) -> None:
        path = self._norm(path)
        d, name = self._parent(path)
        if name not in d.entries:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        d.change((name, None))

    # -- helpers

    @staticmethod
    def _norm(path) -> str:
        return os.path.abspath(os.fspath(path))

    def _parent(self, path: str) -> tuple[_Dir, str]:
        d = self._dirs.get(os.path.dirname(path))
        if d is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return d, os.path.basename(path)

    def _inode(self, path) -> _Inode:
        path = self._norm(path)
        d, name = self._parent(path)
        inode = d.entries.get(name)
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return inode

    def _live(self, handle: _Handle) -> _Inode:
        if handle.generation != self._generation or handle.closed:
            raise _oserror(errno.EBADF, handle.path)
        return handle.inode

    def _used(self) -> int:
        inodes = {id(i): i for d in self._dirs.values() for i in d.entries.values()}
        inodes.update((id(h.inode), h.inode) for h in list(self._open))
        return sum(i.size for i in inodes.values())
