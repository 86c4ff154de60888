"""The log's I/O boundary: every file operation of `vmresize.events.log` goes through a `Disk`.

`OsDisk` is the real file system (the default). `SimDisk` is its in-memory twin for tests
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
import os
import random
from typing import Any, Callable, Protocol

OPEN_MODES = ("r", "a", "x", "w")


class Disk(Protocol):
    """What the log needs from a file system. Paths are str or os.PathLike."""

    # True when no operation ever blocks (an in-memory disk): the log then writes and
    # fsyncs on the caller's thread even for `append_async`.
    inline: bool

    def open(self, path, mode: str) -> Any:
        """"r" read, "a" append to an existing file, "x" create a new file to append to
        (FileExistsError if it exists), "w" create or truncate, then write."""

    def write(self, handle, data) -> int:
        """Write at the end of an "a"/"x" file (or the position of a "w" one); may write
        fewer bytes than given (a full disk); returns how many."""

    def pread(self, handle, size: int, offset: int) -> bytes: ...

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
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}


class OsDisk:
    """The real file system; handles are file descriptors."""

    inline = False

    def open(self, path, mode: str) -> int:
        return os.open(path, _OS_FLAGS[mode], 0o644)

    write = staticmethod(os.write)
    pread = staticmethod(os.pread)
    truncate = staticmethod(os.ftruncate)
    close = staticmethod(os.close)
    fsync = staticmethod(os.fsync)

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
