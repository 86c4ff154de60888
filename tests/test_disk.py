"""SimDisk, the log's simulated disk: what survives a power cut, and its faults."""
from __future__ import annotations

import errno
import random
import tracemalloc

import pytest

from vmresize.events.disk import OsDisk, SimDisk

ROOT = "/sim"


def disk(seed: int = 0) -> SimDisk:
    d = SimDisk(random.Random(seed))
    d.make_dirs(ROOT)
    return d


def content(d: SimDisk, name: str) -> bytes:
    h = d.open(f"{ROOT}/{name}", "r")
    try:
        return d.pread(h, d.size(h), 0)
    finally:
        d.close(h)


def write(d: SimDisk, name: str, *chunks: bytes, sync: bool = False, mode: str = "x"):
    h = d.open(f"{ROOT}/{name}", mode)
    for chunk in chunks:
        assert d.write(h, chunk) == len(chunk)
    if sync:
        d.fsync(h)
    return h


def test_synced_data_survives_and_unsynced_is_lost():
    d = disk()
    h = write(d, "f", b"durable", sync=True)
    d.fsync_dir(ROOT)
    d.write(h, b"-volatile")
    assert content(d, "f") == b"durable-volatile"       # reads see the page cache
    d.crash(keep_bytes=0)
    assert content(d, "f") == b"durable"
    with pytest.raises(OSError) as caught:               # the old process is gone
        d.write(h, b"late")
    assert caught.value.errno == errno.EBADF


@pytest.mark.parametrize("keep", range(0, 12))
def test_a_crash_keeps_a_prefix_of_the_unsynced_writes(keep):
    d = disk()
    h = write(d, "f", b"base", sync=True)
    d.fsync_dir(ROOT)
    d.write(h, b"abcd")
    d.write(h, b"efghij")                                # the last write, maybe torn
    d.crash(keep_bytes=keep)
    assert content(d, "f") == b"base" + b"abcdefghij"[:keep]


def test_random_crashes_leave_a_prefix_and_are_deterministic():
    outcomes = []
    for seed in range(40):
        d = disk(seed)
        h = write(d, "f", b"0123", sync=True)
        d.fsync_dir(ROOT)
        for chunk in (b"4567", b"89ab", b"cdef"):
            d.write(h, chunk)
        d.crash()
        got = content(d, "f")
        assert b"0123456789abcdef".startswith(got) and got.startswith(b"0123")
        outcomes.append(got)
    assert len(set(outcomes)) > 3, "crashes should not all keep the same amount"
    again = disk(7)
    h = write(again, "f", b"0123", sync=True)
    again.fsync_dir(ROOT)
    for chunk in (b"4567", b"89ab", b"cdef"):
        again.write(h, chunk)
    again.crash()
    assert content(again, "f") == outcomes[7]


def test_names_need_a_directory_fsync():
    d = disk()
    write(d, "unsynced-name", b"data", sync=True)        # the file's data, not its name
    d.crash(keep_changes=0)
    assert d.list_dir(ROOT) == []
    write(d, "synced-name", b"data", sync=True)
    d.fsync_dir(ROOT)
    d.crash(keep_changes=0)
    assert d.list_dir(ROOT) == ["synced-name"] and content(d, "synced-name") == b"data"


@pytest.mark.parametrize("keep_changes", [0, 1])
def test_a_rename_is_all_or_nothing(keep_changes):
    d = disk()
    write(d, "dst", b"old", sync=True)
    write(d, "tmp", b"new", sync=True)
    d.fsync_dir(ROOT)
    d.rename(f"{ROOT}/tmp", f"{ROOT}/dst")
    assert d.list_dir(ROOT) == ["dst"] and content(d, "dst") == b"new"
    d.crash(keep_changes=keep_changes)
    if keep_changes:
        assert d.list_dir(ROOT) == ["dst"] and content(d, "dst") == b"new"
    else:
        assert sorted(d.list_dir(ROOT)) == ["dst", "tmp"] and content(d, "dst") == b"old"


def test_unlink_without_directory_fsync_may_come_back():
    d = disk()
    write(d, "f", b"data", sync=True)
    d.fsync_dir(ROOT)
    d.unlink(f"{ROOT}/f")
    assert d.list_dir(ROOT) == []
    d.crash(keep_changes=0)
    assert content(d, "f") == b"data"


def test_failed_fsync_forgets_the_unsynced_data():
    d = disk()
    h = write(d, "f", b"kept", sync=True)
    d.fsync_dir(ROOT)
    d.write(h, b"+lost")
    d.fail_fsync()
    with pytest.raises(OSError) as caught:
        d.fsync(h)
    assert caught.value.errno == errno.EIO
    d.fsync(h)                     # "succeeds", but the pages were dropped as clean
    assert content(d, "f") == b"kept+lost"
    d.crash(keep_bytes=10 ** 6)
    assert content(d, "f") == b"kept"


def test_reads_see_unsynced_truncations_and_writes_over_the_durable_bytes():
    d = disk()
    h = write(d, "f", b"abcdefgh", sync=True)
    d.fsync_dir(ROOT)
    d.truncate(h, 2)
    d.truncate(h, 5)                                     # what grows back reads as zeros
    d.write(h, b"XY")
    assert content(d, "f") == b"ab\0\0\0XY"
    assert d.pread(h, 5, 1) == b"b\0\0\0X"
    assert d.durable_bytes(f"{ROOT}/f") == b"abcdefgh"
    assert d.durable_bytes(f"{ROOT}/f", 6) == b"gh"
    d.fsync(h)
    assert content(d, "f") == d.durable_bytes(f"{ROOT}/f") == b"ab\0\0\0XY"


@pytest.mark.parametrize("seed", range(20))
def test_reads_match_a_plain_buffer(seed):
    """Random appends, truncations, fsyncs and reads, checked against a bytearray; at
    the end a crash that keeps every write leaves the same bytes."""
    rng, d, model = random.Random(seed), disk(seed), bytearray()
    h = write(d, "f", b"", sync=True)
    d.fsync_dir(ROOT)
    for _ in range(60):
        op = rng.random()
        if op < 0.45:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
            d.write(h, chunk)
            model += chunk
        elif op < 0.6:
            size = rng.randint(0, len(model) + 6)
            d.truncate(h, size)
            model = model[:size] + bytes(max(0, size - len(model)))
        elif op < 0.75:
            d.fsync(h)
        else:
            at, size = rng.randint(0, len(model) + 2), rng.randint(0, 12)
            assert d.pread(h, size, at) == bytes(model[at:at + size])
        assert d.size(h) == len(model)
    assert content(d, "f") == bytes(model)
    d.crash(keep_bytes=10 ** 6)
    assert content(d, "f") == bytes(model)


def test_durable_bytes_are_kept_out_of_memory(tmp_path):
    d = SimDisk(random.Random(0), spill_dir=str(tmp_path))
    d.make_dirs(ROOT)
    chunk = bytes(range(256)) * 256                      # 64 KiB
    tracemalloc.start()
    try:
        h = write(d, "f", sync=True)
        for _ in range(64):                              # 4 MiB, each chunk synced
            d.write(h, chunk)
            d.fsync(h)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1024 * 1024, f"{held} bytes held for a 4 MiB file"
    assert d.size(h) == 64 * len(chunk)
    assert d.pread(h, 10, 64 * len(chunk) - 5) == chunk[-5:]


def test_a_full_disk_writes_short_then_refuses():
    d = disk()
    h = write(d, "f", b"12345", sync=True)
    d.set_free_bytes(3)
    assert d.write(h, b"abcdef") == 3                    # a short write
    with pytest.raises(OSError) as caught:
        d.write(h, b"g")
    assert caught.value.errno == errno.ENOSPC
    d.truncate(h, 5)                                     # truncation frees space
    assert d.write(h, b"xy") == 2
    d.set_free_bytes(None)
    assert d.write(h, b"z" * 100) == 100


def test_positional_writes_overwrite_in_place_and_only_growth_needs_space():
    d = disk()
    h = d.open(f"{ROOT}/f", "x+")
    assert d.pwrite(h, bytes(8), 0) == 8                     # preallocated zeros
    d.fsync(h)
    d.set_free_bytes(0)
    assert d.pwrite(h, b"abc", 2) == 3                       # inside the file: no space
    assert d.pread(h, 8, 0) == b"\0\0abc\0\0\0"
    assert d.pwrite(h, b"xyz", 7) == 1                       # growth: short
    with pytest.raises(OSError) as caught:
        d.pwrite(h, b"!", 8)
    assert caught.value.errno == errno.ENOSPC
    d.crash(keep_bytes=0)                                    # the overwrite was not synced
    assert content(d, "f") == bytes(8)
    with pytest.raises(OSError) as caught:
        d.pwrite(d.open(f"{ROOT}/f", "r"), b"no", 0)         # a read-only handle
    assert caught.value.errno == errno.EBADF


def test_corrupt_flips_one_bit_durably():
    d = disk()
    write(d, "f", b"\x00" * 16, sync=True)
    d.fsync_dir(ROOT)
    at = d.corrupt(f"{ROOT}/f", offset=5)
    assert at == 5
    for _ in range(2):
        data = content(d, "f")
        assert [i for i, b in enumerate(data) if b] == [5] and bin(data[5]).count("1") == 1
        d.crash()


def test_lock_is_exclusive_until_closed_or_crashed():
    d = disk()
    first = d.lock(f"{ROOT}/lock")
    with pytest.raises(BlockingIOError):
        d.lock(f"{ROOT}/lock")
    d.close(first)
    second = d.lock(f"{ROOT}/lock")
    d.crash()
    d.close(second)                                      # a dead handle: nothing to do
    d.close(d.lock(f"{ROOT}/lock"))


def test_on_fsync_hook_sees_every_fsync():
    d = disk()
    seen = []
    d.on_fsync = seen.append
    write(d, "f", b"x", sync=True)
    d.fsync_dir(ROOT)
    assert seen == [f"{ROOT}/f", ROOT]


def test_export_writes_the_durable_files(tmp_path):
    d = disk()
    d.make_dirs(f"{ROOT}/a/b")
    h = d.open(f"{ROOT}/a/b/seg", "x")
    d.write(h, b"synced")
    d.fsync(h)
    d.write(h, b"-not")
    d.fsync_dir(f"{ROOT}/a/b")
    write(d, "gone", b"name never synced", sync=True)
    written = d.export(tmp_path / "out", under=ROOT)
    assert written == [str(tmp_path / "out" / "a" / "b" / "seg")]
    assert (tmp_path / "out" / "a" / "b" / "seg").read_bytes() == b"synced"
    d.sync_all()
    d.export(tmp_path / "all", under=ROOT)
    assert (tmp_path / "all" / "a" / "b" / "seg").read_bytes() == b"synced-not"
    assert (tmp_path / "all" / "gone").read_bytes() == b"name never synced"


def test_errors_match_the_real_file_system(tmp_path):
    for d, root in ((disk(), ROOT), (OsDisk(), str(tmp_path))):
        h = d.open(f"{root}/f", "x")
        d.close(h)
        with pytest.raises(FileExistsError):
            d.open(f"{root}/f", "x")
        with pytest.raises(FileExistsError):
            d.open(f"{root}/f", "x+")
        with pytest.raises(FileNotFoundError):
            d.open(f"{root}/missing", "r+")
        with pytest.raises(FileNotFoundError):
            d.open(f"{root}/missing", "a")
        with pytest.raises(FileNotFoundError):
            d.list_dir(f"{root}/nodir")
        with pytest.raises(FileNotFoundError):
            d.unlink(f"{root}/missing")
        assert d.is_dir(root) and not d.is_dir(f"{root}/f")
        assert d.file_size(f"{root}/f") == 0


def test_forget_empties_the_disk_and_closes_its_files(tmp_path):
    d = SimDisk(random.Random(0), spill_dir=str(tmp_path))
    d.make_dirs(ROOT)
    h = write(d, "f", b"data", sync=True)
    d.fsync_dir(ROOT)
    inode = h.inode
    d.forget()
    assert inode.file.closed
    with pytest.raises(FileNotFoundError):
        d.list_dir(ROOT)
    assert list(tmp_path.iterdir()) == []       # the spilled files were never named
