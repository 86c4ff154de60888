"""Disk transports: one contract every transport passes (the chunked stream through a
receiver, the local copy), then what only the stream promises. Real sparse files."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from vmresize.drivers.base import DiskError
from vmresize.drivers.transport import (META, PART, ChunkChecksumError, FileChecksumError,
                                        FileReceiver, LocalSink, PeerSink, RunDigest,
                                        copy_sparse, data_extents, send_file)

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


def check_of(offset: int, data: bytes) -> bytes:
    digest = RunDigest()
    digest.update(offset, data)
    return digest.check()


class Crash(Exception):
    pass


class FaultyPeer:
    """A link to a receiver that corrupts the data of `corrupt` puts in transit and dies
    after `puts` of them went through (None: never)."""

    def __init__(self, inner, corrupt: int = 0, puts: int | None = None) -> None:
        self.inner, self.corrupt, self.left = inner, corrupt, puts

    async def begin(self, rel_path, size, source_id):
        return await self.inner.begin(rel_path, size, source_id)

    async def put(self, rel_path, offset, data, check):
        if self.left == 0:
            raise Crash("link down")
        if self.left is not None:
            self.left -= 1
        if self.corrupt > 0:
            self.corrupt -= 1
            data = bytes([data[0] ^ 0x01]) + data[1:]
        await self.inner.put(rel_path, offset, data, check)

    async def commit(self, rel_path, digest):
        await self.inner.commit(rel_path, digest)


@pytest.fixture
def hosts(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


class TransportContract:
    """Every disk transport passes these. A subclass says how to make its sink, with
    faults: `crash_after` chunks moved (the sending side dies), `corrupt` chunks damaged
    on the way."""

    chunks_cross_a_channel = True

    def sink(self, dst, crash_after: int | None = None, corrupt: int = 0,
             chunk_bytes: int = CHUNK):
        raise NotImplementedError

    def send(self, sink, src_path, rel_path="u/disk") -> int:
        return asyncio.run(sink.send_file(str(src_path), rel_path))

    def test_delivers_a_byte_identical_sparse_file(self, hosts):
        src, dst = hosts
        content = make_sparse(src / "disk")
        sent = self.send(self.sink(dst), src / "disk")
        assert read(dst / "u" / "disk") == content
        assert sent == allocated(src / "disk") < SIZE // 4, "holes are never sent"
        assert os.stat(dst / "u" / "disk").st_blocks * 512 < SIZE // 4, "holes stay holes"

    def test_leaves_no_part_behind_on_success(self, hosts):
        src, dst = hosts
        make_sparse(src / "disk")
        self.send(self.sink(dst), src / "disk")
        assert sorted(os.listdir(dst / "u")) == ["disk"]

    def test_resumes_after_a_crash_mid_file(self, hosts):
        src, dst = hosts
        content = make_sparse(src / "disk")
        with pytest.raises(Crash):
            self.send(self.sink(dst, crash_after=4), src / "disk")
        assert not (dst / "u" / "disk").exists(), "nothing under the final name"
        assert (dst / "u" / ("disk" + PART)).exists()
        sink = self.sink(dst)                      # both sides restart
        sent = self.send(sink, src / "disk")
        assert read(dst / "u" / "disk") == content
        assert 0 < sent < allocated(src / "disk"), "what was moved is not moved again"
        assert sorted(os.listdir(dst / "u")) == ["disk"]

    def test_a_changed_source_starts_over(self, hosts):
        src, dst = hosts
        make_sparse(src / "disk")
        with pytest.raises(Crash):
            self.send(self.sink(dst, crash_after=2), src / "disk")
        content = make_sparse(src / "disk")        # new bytes, new mtime: a new source
        sent = self.send(self.sink(dst), src / "disk")
        assert sent == allocated(src / "disk")
        assert read(dst / "u" / "disk") == content

    def test_a_corrupted_chunk_is_refused_and_sent_again(self, hosts):
        if not self.chunks_cross_a_channel:
            pytest.skip("the kernel copies within one machine: no chunk in transit")
        src, dst = hosts
        content = make_sparse(src / "disk")
        sent = self.send(self.sink(dst, corrupt=1), src / "disk")
        assert read(dst / "u" / "disk") == content
        assert sent == allocated(src / "disk") + CHUNK, "one chunk sent twice"

    def test_persistent_corruption_fails_and_delivers_nothing(self, hosts):
        if not self.chunks_cross_a_channel:
            pytest.skip("the kernel copies within one machine: no chunk in transit")
        src, dst = hosts
        make_sparse(src / "disk")
        with pytest.raises(DiskError, match="failed its checksum 3 times"):
            self.send(self.sink(dst, corrupt=10 ** 6), src / "disk")
        assert not (dst / "u" / "disk").exists()

    def test_repeating_a_send_is_harmless(self, hosts):
        src, dst = hosts
        content = make_sparse(src / "disk")
        sink = self.sink(dst)
        for _ in range(2):
            self.send(sink, src / "disk")
            assert read(dst / "u" / "disk") == content
            assert sorted(os.listdir(dst / "u")) == ["disk"]

    def test_empty_file(self, hosts):
        src, dst = hosts
        (src / "empty").write_bytes(b"")
        assert self.send(self.sink(dst), src / "empty", "u/e") == 0
        assert read(dst / "u" / "e") == b""

    @pytest.mark.parametrize("rel_path", ["../evil", "/abs", "u/../../x", "u//x", ""])
    def test_paths_stay_under_the_root(self, hosts, rel_path):
        src, dst = hosts
        (src / "f").write_bytes(b"x")
        with pytest.raises(DiskError, match="bad transfer path"):
            self.send(self.sink(dst), src / "f", rel_path)


class TestStream(TransportContract):
    """The chunked stream (the Ray transport's code, minus Ray) into a FileReceiver."""

    def sink(self, dst, crash_after=None, corrupt=0, chunk_bytes=CHUNK):
        peer = FaultyPeer(FileReceiver(str(dst)), corrupt=corrupt, puts=crash_after)
        return PeerSink(peer, chunk_bytes=chunk_bytes)


class TestLocalCopy(TransportContract):
    """copy_file_range into the destination's own directory (shared storage, same host)."""

    chunks_cross_a_channel = False

    def sink(self, dst, crash_after=None, corrupt=0, chunk_bytes=CHUNK):
        copied = [0]

        def after_chunk(offset: int) -> None:
            copied[0] += 1
            if crash_after is not None and copied[0] >= crash_after:
                raise Crash("the host died mid-copy")

        return LocalSink(str(dst), chunk_bytes=chunk_bytes, record_every_bytes=chunk_bytes,
                         after_chunk=after_chunk)


# --------------------------------------------------------------------------- the stream only

def test_resume_skips_exactly_what_the_receiver_holds(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(FaultyPeer(FileReceiver(str(dst)), puts=4), str(src / "disk"),
                              "u/disk", CHUNK))
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert stats.resumed_from == 20 * MiB + CHUNK
    assert stats.bytes_sent == stats.allocated_bytes - 4 * CHUNK
    assert read(dst / "u" / "disk") == content


def test_resume_with_another_chunk_size(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(FaultyPeer(FileReceiver(str(dst)), puts=3), str(src / "disk"),
                              "u/disk", 768 * 1024))
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert 0 < stats.resumed_from and stats.bytes_sent < stats.allocated_bytes
    assert read(dst / "u" / "disk") == content


def test_a_part_that_lost_data_since_its_meta_starts_over(hosts):
    """A power cut can keep the meta file and lose pages of the .part: the receiver's
    check of what it holds tells, and the copy starts over instead of resuming."""
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(FaultyPeer(FileReceiver(str(dst)), puts=3), str(src / "disk"),
                              "u/disk", CHUNK))
    part = dst / "u" / ("disk" + PART)
    with open(part, "r+b") as f:
        f.seek(MiB + 17)
        f.write(b"\0" * 4096)                      # pages that never reached the disk
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert stats.resumed_from == 0
    assert read(dst / "u" / "disk") == content


def test_a_torn_meta_file_starts_over(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    with pytest.raises(Crash):
        asyncio.run(send_file(FaultyPeer(FileReceiver(str(dst)), puts=3), str(src / "disk"),
                              "u/disk", CHUNK))
    meta = dst / "u" / ("disk" + META)
    json.loads(meta.read_bytes())                  # whole: it parses
    meta.write_bytes(meta.read_bytes()[:20])
    stats = asyncio.run(send_file(FileReceiver(str(dst)), str(src / "disk"), "u/disk", CHUNK))
    assert stats.resumed_from == 0 and read(dst / "u" / "disk") == content


def test_a_chunk_that_does_not_match_its_check_is_refused(hosts):
    _, dst = hosts
    receiver = FileReceiver(str(dst))

    async def scenario():
        await receiver.begin("u/disk", 10, "id")
        with pytest.raises(ChunkChecksumError):
            await receiver.put("u/disk", 0, b"0123456789", check_of(0, b"0123456780"))
        await receiver.put("u/disk", 0, b"0123456789", check_of(0, b"0123456789"))

    asyncio.run(scenario())


def test_a_refused_chunk_counts_for_nothing_though_written(hosts):
    """The receiver writes a chunk while it hashes it, so a refused chunk may be in the
    .part; neither its progress nor a restarted receiver counts it, and its retry lands."""
    _, dst = hosts
    good = b"0123456789abcdefghij"
    whole = RunDigest()
    whole.update(0, good)

    async def scenario():
        receiver = FileReceiver(str(dst))
        assert await receiver.begin("u/disk", 20, "id") == 0
        await receiver.put("u/disk", 0, good[:10], check_of(0, good[:10]))
        with pytest.raises(ChunkChecksumError):
            await receiver.put("u/disk", 10, b"XXXXXXXXXX", whole.check())
        restarted = FileReceiver(str(dst))
        assert await restarted.begin("u/disk", 20, "id") == 10
        await restarted.put("u/disk", 10, good[10:], whole.check())
        await restarted.commit("u/disk", whole.hexdigest(20))

    asyncio.run(scenario())
    assert read(dst / "u" / "disk") == good


def test_wrong_digest_is_refused_and_dropped(hosts):
    _, dst = hosts
    receiver = FileReceiver(str(dst))

    async def scenario():
        await receiver.begin("u/disk", 10, "id")
        await receiver.put("u/disk", 0, b"0123456789", check_of(0, b"0123456789"))
        with pytest.raises(FileChecksumError):
            await receiver.commit("u/disk", "0" * 64)

    asyncio.run(scenario())
    assert os.listdir(dst / "u") == [], "neither the final name nor the partial copy"


def test_receiver_restart_between_calls(hosts):
    """A restarted destination (new FileReceiver) picks a transfer up from its meta file
    even in the middle of a sender's run."""
    src, dst = hosts
    content = make_sparse(src / "disk")

    class Restarting(FaultyPeer):
        async def put(self, rel_path, offset, data, check):
            self.inner = FileReceiver(str(dst))      # every put lands on a fresh receiver
            await self.inner.put(rel_path, offset, data, check)

    asyncio.run(send_file(Restarting(FileReceiver(str(dst))), str(src / "disk"), "u/disk",
                          CHUNK))
    assert read(dst / "u" / "disk") == content


def test_repeated_calls_are_harmless(hosts):
    """Ray calls are at-least-once: a put or commit delivered twice changes nothing."""
    src, dst = hosts
    content = make_sparse(src / "disk")

    class Twice(FaultyPeer):
        async def put(self, rel_path, offset, data, check):
            await self.inner.put(rel_path, offset, data, check)
            await self.inner.put(rel_path, offset, data, check)

        async def commit(self, rel_path, digest):
            await self.inner.commit(rel_path, digest)
            await self.inner.commit(rel_path, digest)

    asyncio.run(send_file(Twice(FileReceiver(str(dst))), str(src / "disk"), "u/disk", CHUNK))
    assert read(dst / "u" / "disk") == content


def test_digest_does_not_depend_on_chunking():
    data = os.urandom(3 * MiB)
    one, many = RunDigest(), RunDigest()
    one.update(MiB, data)
    for pos in range(0, len(data), 4096 * 3):
        many.update(MiB + pos, data[pos:pos + 4096 * 3])
    assert one.check() == many.check()
    assert one.hexdigest(10 * MiB) == many.hexdigest(10 * MiB)
    moved = RunDigest()
    moved.update(2 * MiB, data)                      # same bytes elsewhere: another file
    assert moved.hexdigest(10 * MiB) != one.hexdigest(10 * MiB)
    assert one.hexdigest(10 * MiB) != one.hexdigest(11 * MiB)   # the size counts


def test_peer_sink_keeps_what_each_send_took(hosts):
    src, dst = hosts
    make_sparse(src / "disk")
    sink = PeerSink(FileReceiver(str(dst)), chunk_bytes=CHUNK)
    sent = asyncio.run(sink.send_file(str(src / "disk"), "u/disk"))
    assert sent == sink.sent["u/disk"].bytes_sent == allocated(src / "disk")


def test_copy_sparse_keeps_holes(hosts):
    src, dst = hosts
    content = make_sparse(src / "disk")
    copied = copy_sparse(str(src / "disk"), str(dst / "disk"))
    assert copied == allocated(src / "disk")
    assert read(dst / "disk") == content
    assert os.stat(dst / "disk").st_blocks * 512 < SIZE // 4
