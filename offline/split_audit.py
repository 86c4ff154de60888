"""The offline audit on two processes, with the same report as on one.

A checker's two sides need different orders (see `projections.audit._Checker`): the host side
(ledgers, invariant 1) each host's records in offset order, the instance side
(instances, migrations, invariants 2 and 3) the merged order of all hosts. So a helper
process reads every host log (framing, CRC, decode, offsets), folds the ledgers and
checks invariant 1, and hands the records on in chunks, with its findings keyed by
(host, offset); this process decodes each chunk in one call, merges the hosts' chunks
exactly as `merge_logs` merges whole logs, runs the instance side, puts each host
finding where a one-process checker would have found it, and checks the end state
with the helper's ledgers. Both processes stream: this one asks for a host's next chunk
when it starts on the one before, so at most two chunks a host are in flight, and
memory holds the fold's state, not the history.

The helper is a new interpreter running this module (`python -c`, two pipes), not a
fork (a fork of a process running threads, Ray's for instance, may deadlock) nor
multiprocessing's spawn (which imports the caller's main script again); it costs a
fraction of a second, so `audit` only splits a state directory big enough to gain.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

import msgspec

from vmresize.events.log import CorruptLog, LogError
from vmresize.events.schema import Envelope

CHUNK_RECORDS = 4096
# The records of every host in flight at once (a host's chunk is decoded whole): each
# host's chunks hold a share of this many, so that with many short logs this side does
# not hold the whole history decoded.
MERGED_RECORDS = 2048


def chunk_records_for(hosts: int) -> int:
    """Records in each host's chunk when `hosts` logs are merged."""
    return min(CHUNK_RECORDS, max(16, MERGED_RECORDS // max(1, hosts)))
_ARRAY32 = struct.Struct(">BI")        # msgpack array 32 header: 0xdd, count
_CHUNK_DECODER = msgspec.msgpack.Decoder(list[Envelope])


def _chunk_blob(payloads: list[bytes]) -> bytes:
    """The payloads as one msgpack array: each payload is one encoded envelope."""
    return _ARRAY32.pack(0xDD, len(payloads)) + b"".join(payloads)


# --------------------------------------------------------------------------- the helper

def _helper_main(read_fd: int, write_fd: int) -> None:
    """Entry point of the helper process: its arguments come as the first message."""
    requests = Connection(read_fd, writable=False)
    answers = Connection(write_fd, readable=False)
    try:
        _host_side(requests, answers, *requests.recv())
    finally:
        requests.close()
        answers.close()


def _host_side(requests, conn, state_dir: str, hosts: list[str],
               chunk_records: int, forget_released: bool) -> None:
    """Answer each request (a host's index) with that host's next chunk; None asks for
    the ledgers (and where each allocation last changed: with `forget_released`, only
    those held) and the torn tails, and ends."""
    from vmresize.events.store import HostLogReader, merged_chunk_bytes
    from vmresize.projections.audit import _Checker
    readers = []
    try:
        readers = [HostLogReader(state_dir, h, merged_chunk_bytes(len(hosts)))
                   for h in hosts]
        conn.send(("open",))
        checker = _Checker(instance_side=False, forget_released=forget_released)
        streams = [r.records() for r in readers]
        while (i := requests.recv()) is not None:
            conn.send(("chunk", i) + _next_chunk(checker, streams[i], chunk_records))
        # each log was read to its end, which found its torn tail on the way
        conn.send(("end", checker.s.ledgers, checker.changed, [_torn(r) for r in readers]))
    except CorruptLog as exc:
        conn.send(("corrupt", exc.path, exc.offset, exc.reason))
    except LogError as exc:
        conn.send(("error", str(exc)))
    finally:
        for r in readers:
            r.close()


def _torn(reader):
    t = reader.torn_tail
    return None if t is None else (t.segment, t.offset, t.bytes_dropped)


def _next_chunk(checker, stream, chunk_records: int) -> tuple[bytes, dict, bool]:
    payloads: list[bytes] = []
    findings: dict[tuple[str, int], list] = {}
    violations = checker.violations
    for env, payload in stream:
        checker.feed(env)
        if violations:
            findings[(env.host, env.offset)] = violations[:]
            violations.clear()
        payloads.append(payload)
        if len(payloads) == chunk_records:
            return _chunk_blob(payloads), findings, False
    return _chunk_blob(payloads), findings, True


# --------------------------------------------------------------------------- this side

class _Chunks:
    """This side of the pipe: per host, the chunks received and not yet used."""

    def __init__(self, requests, conn, hosts: list[str], checker):
        self.requests = requests
        self.conn = conn
        self.hosts = hosts
        self.checker = checker
        self.received: dict[int, deque] = {i: deque() for i in range(len(hosts))}

    def receive(self):
        """The next message; a chunk is filed under its host and None returned."""
        try:
            msg = self.conn.recv()
        except EOFError:
            raise LogError("the audit's helper process ended without an answer") from None
        if msg[0] == "chunk":
            self.received[msg[1]].append(msg[2:])
            return None
        if msg[0] == "corrupt":
            raise CorruptLog(*msg[1:])
        if msg[0] == "error":
            raise LogError(msg[1])
        return msg

    def expect(self, kind: str):
        while (msg := self.receive()) is None:
            pass
        assert msg[0] == kind, (msg[0], kind)
        return msg

    def stream(self, i: int) -> Iterator[Envelope]:
        self.requests.send(i)
        while True:
            while not self.received[i]:
                self.receive()
            blob, findings, last = self.received[i].popleft()
            if not last:
                self.requests.send(i)      # the helper reads ahead while we fold this one
            self.checker.host_findings.update(findings)
            yield from _CHUNK_DECODER.decode(blob)
            if last:
                return


def check_split(state_dir: str | Path, hosts: list[str], chunk_records: int | None = None,
                keep: int | None = None):
    """`check` of the logs of `hosts` in `state_dir` on this process and a helper;
    returns the checker after `finish` and the torn tails as (host, segment, offset,
    bytes dropped). `keep`: as `offline.audit.audit`'s."""
    from vmresize.events.store import HostLogReader
    from vmresize.offline.spill import SqliteSpill
    from vmresize.projections.audit import _Checker, last_changes
    from vmresize.projections.fold import merge_logs

    def locate(host: str, keys: set[str]) -> dict[str, int]:
        reader = HostLogReader(state_dir, host)
        try:
            return last_changes(reader.envelopes(), keys)
        finally:
            reader.close()

    helper, requests, conn = _start_helper()
    spill = None if keep is None else SqliteSpill()
    try:
        requests.send((str(state_dir), hosts, chunk_records or chunk_records_for(len(hosts)),
                       spill is not None))
        checker = _Checker(host_side=False, spill=spill, keep=keep or 0,
                           forget_released=spill is not None, locate=locate)
        chunks = _Chunks(requests, conn, hosts, checker)
        chunks.expect("open")
        for env in merge_logs({h: chunks.stream(i) for i, h in enumerate(hosts)}):
            checker.feed(env)
        requests.send(None)
        _, ledgers, changed, torn = chunks.expect("end")
        checker.s.ledgers.update(ledgers)
        checker.changed.update(changed)
        checker.finish()
        tails = [(h,) + t for h, t in zip(hosts, torn) if t is not None]
        return checker, tails
    finally:
        if spill is not None:
            spill.close()
        requests.close()
        conn.close()
        try:
            helper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def _start_helper() -> tuple[subprocess.Popen, Connection, Connection]:
    to_helper, from_helper = os.pipe(), os.pipe()
    helper = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vmresize.offline.split_audit import "
         "_helper_main; _helper_main(int(sys.argv[1]), int(sys.argv[2]))",
         str(to_helper[0]), str(from_helper[1])],
        pass_fds=(to_helper[0], from_helper[1]), stdin=subprocess.DEVNULL)
    os.close(to_helper[0])
    os.close(from_helper[1])
    return (helper, Connection(to_helper[1], readable=False),
            Connection(from_helper[0], writable=False))
