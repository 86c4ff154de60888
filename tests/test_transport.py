"""Disk transport: send_file through a FileReceiver, in process, on real sparse files."""
from __future__ import annotations

import asyncio
import os

import pytest

from vmresize.drivers.base import DiskError
from vmresize.drivers.transport import (META, PART, ChunkChecksumError, FileChecksumError,
                                        FileReceiver, PeerSink, RunDigest, copy_sparse,
                                        data_extents, send_file)

MiB = 1 << 20
CHUNK = 1 * MiB
# (offset, length) of the data written into the sparse test file; the rest are holes.
DATA_RUNS = [(0, 3 * MiB), (20 * MiB, 2 * MiB + 4096), (63 * MiB, MiB)]
SIZE = 64 * MiB


def make_sparse(path, runs=DATA_RUNS, size=SIZE) -> bytes:
    """Write a sparse file; return its full content for comparison."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            data = os.urandom(length)
            content[offset:offset + length] = data
            os.pwrite(f.fileno(), data, offset)
    return bytes(content)


def allocated(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(length for _, length in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FlipBits:
    """A peer in front of a receiver that corrupts the data of `times` puts in transit."""

    def __init__(self, inner, times: int) -> None:
        self.inner, self.times = inner, times

    async def begin(self, rel_path, size, source_id):
        return await self.inner.begin(rel_path, size, source_id)

    async def put(self, rel_path, offset, data, crc32):
        if self.times > 0:
            self.times -= 1
            data = bytes([data[0] ^ 0x01]) + data[1:]
        await self.inner.put(rel_path, offset, data, crc32)

    async def commit(self, rel_path, digest):
        await self.inner.commit(rel_path, digest)


class Crash(Exception):
    pass


class CrashAfter(FlipBits):
    """The link (or the sender's host) dies after `puts` chunks went through."""

    def __init__(self, inner, puts: int) -> None:
        super().__init__(inner, 0)
        self.left = puts

    async def put(self, rel_path, offset, data, crc32):
        if self.left == 0:
            raise Crash("link down")
        self.left -= 1
        await self.inner.put(rel_path, offset, data, crc32)


@pytest.fixture
def hosts(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


def test_sparse_file_sends_only_allocated_bytes(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert read(dst / "u" / "disk") == content
    assert stats.bytes_sent == stats.allocated_bytes == allocated(src / "disk")
    assert stats.allocated_bytes < SIZE // 4 and stats.retries == 0
    assert os.stat(dst / "u" / "disk").st_blocks * 512 < SIZE // 4, "holes stay holes"
    assert sorted(os.listdir(dst / "u")) == ["disk"], "no .part or .part-meta left"


def test_bad_chunk_crc_is_rejected(hosts):
    _, dst = hosts
    receiver = FileReceiver(str(dst))

    async def scenario():
        await receiver.begin("u/disk", 10, "id")
        with pytest.raises(ChunkChecksumError):
            await receiver.put("u/disk", 0, b"0123456789", 12345)

    asyncio.run(scenario())


def test_wrong_digest_is_refused_and_dropped(hosts):
    _, dst = hosts
    receiver = FileReceiver(str(dst))

    async def scenario():
        import zlib
        await receiver.begin("u/disk", 10, "id")
        await receiver.put("u/disk", 0, b"0123456789", zlib.crc32(b"0123456789"))
        with pytest.raises(FileChecksumError):
            await receiver.commit("u/disk", "0" * 64)

    asyncio.run(scenario())
    assert os.listdir(dst / "u") == [], "neither the final name nor the partial copy"


def test_corrupted_chunk_is_retried(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    peer = FlipBits(FileReceiver(str(dst)), times=1)
    stats = asyncio.run(send_file(peer, str(src / "disk"), "u/disk", CHUNK))
    assert stats.retries == 1
    assert read(dst / "u" / "disk") == content


def test_persistent_corruption_raises_disk_error(hosts):
    src, dst = hosts
    make_sparse(src / "disk")
    peer = FlipBits(FileReceiver(str(dst)), times=10 ** 6)
    with pytest.raises(DiskError, match="failed its checksum 3 times"):
        asyncio.run(send_file(peer, str(src / "disk"), "u/disk", CHUNK))
    assert not (dst / "u" / "disk").exists()


def test_crash_mid_copy_resumes_without_resending_everything(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(CrashAfter(FileReceiver(str(dst)), puts=4), str(src / "disk"),
                              "u/disk", CHUNK))
    assert not (dst / "u" / "disk").exists(), "nothing under the final name"
    assert (dst / "u" / ("disk" + PART)).exists() and (dst / "u" / ("disk" + META)).exists()
    # Both sides restart: a new receiver finds the partial copy through its meta file.
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert stats.resumed_from == 20 * MiB + CHUNK
    assert stats.bytes_sent == stats.allocated_bytes - 4 * CHUNK
    assert read(dst / "u" / "disk") == content
    assert sorted(os.listdir(dst / "u")) == ["disk"]


def test_resume_with_another_chunk_size(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(CrashAfter(FileReceiver(str(dst)), puts=3), str(src / "disk"),
                              "u/disk", 768 * 1024))
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert 0 < stats.resumed_from and stats.bytes_sent < stats.allocated_bytes
    assert read(dst / "u" / "disk") == content


def test_changed_source_starts_over(hosts):
    src, dst = hosts
    make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(CrashAfter(FileReceiver(str(dst)), puts=2), str(src / "disk"),
                              "u/disk", CHUNK))
    content = make_sparse(src / "disk")              # new bytes, new mtime: a new source
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert stats.resumed_from == 0
    assert read(dst / "u" / "disk") == content


def test_receiver_restart_between_calls(hosts):
    """A restarted destination (new FileReceiver) picks a transfer up from its meta file
    even in the middle of a sender's run."""
    src, dst = hosts
    content = make_sparse(src / "disk")

    class Restarting(FlipBits):
        async def put(self, rel_path, offset, data, crc32):
            self.inner = FileReceiver(str(dst))      # every put lands on a fresh receiver
            await self.inner.put(rel_path, offset, data, crc32)

    asyncio.run(send_file(Restarting(FileReceiver(str(dst)), 0), str(src / "disk"),
                          "u/disk", CHUNK))
    assert read(dst / "u" / "disk") == content


def test_repeated_calls_are_harmless(hosts):
    """Ray calls are at-least-once: a put or commit delivered twice changes nothing."""
    src, dst = hosts
    content = make_sparse(src / "disk")

    class Twice(FlipBits):
        async def put(self, rel_path, offset, data, crc32):
            await self.inner.put(rel_path, offset, data, crc32)
            await self.inner.put(rel_path, offset, data, crc32)

        async def commit(self, rel_path, digest):
            await self.inner.commit(rel_path, digest)
            await self.inner.commit(rel_path, digest)

    asyncio.run(send_file(Twice(FileReceiver(str(dst)), 0), str(src / "disk"), "u/disk",
                          CHUNK))
    assert read(dst / "u" / "disk") == content


def test_empty_file(hosts):
    src, dst = hosts
    (src / "empty").write_bytes(b"")
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "empty"), "u/e"))
    assert stats.bytes_sent == 0 and read(dst / "u" / "e") == b""


@pytest.mark.parametrize("rel_path", ["../evil", "/abs", "u/../../x", "u//x", ""])
def test_paths_stay_under_the_root(hosts, rel_path):
    _, dst = hosts
    with pytest.raises(DiskError, match="bad transfer path"):
        asyncio.run(FileReceiver(str(dst)).begin(rel_path, 1, "id"))


def test_digest_does_not_depend_on_chunking():
    data = os.urandom(3 * MiB)
    one, many = RunDigest(), RunDigest()
    one.update(MiB, data)
    for pos in range(0, len(data), 4096 * 3):
        many.update(MiB + pos, data[pos:pos + 4096 * 3])
    assert one.hexdigest(10 * MiB) == many.hexdigest(10 * MiB)
    moved = RunDigest()
    moved.update(2 * MiB, data)                      # same bytes elsewhere: another file
    assert moved.hexdigest(10 * MiB) != one.hexdigest(10 * MiB)


def test_peer_sink_adapts_to_disk_sink(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    sink = PeerSink(FileReceiver(str(dst)), chunk_bytes=CHUNK)
    sent = asyncio.run(sink.send_file(str(src / "disk"), "u/disk"))
    assert sent == sink.sent["u/disk"].bytes_sent == allocated(src / "disk")
    assert read(dst / "u" / "disk") == content


def test_copy_sparse_keeps_holes(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    copied = copy_sparse(str(src / "disk"), str(dst / "disk"))
    assert copied == allocated(src / "disk")
    assert read(dst / "disk") == content
    assert os.stat(dst / "disk").st_blocks * 512 < SIZE // 4
