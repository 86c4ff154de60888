"""Where the offline audit keeps what has ended: a private temporary SQLite database.

The checker (`projections.audit._Checker`) moves ended migrations and deleted instances
here once newer ones have ended (and forgets where allocations were released, which it
reads from the logs again if a finding needs it), so that the audit's memory is bounded
by live state (open migrations, live instances, held allocations) and not by history;
its end-state checks read them back. SQLite with an empty file name is a temporary file
of its own, removed when the connection closes; with no journal and no sync, and a page
cache of `CACHE_KIB` (16 MiB, outside the Python heap), it costs a few microseconds a
row. Nothing here outlives the audit or is read by anyone else.
"""
from __future__ import annotations

import hashlib
import sqlite3
from typing import Iterator

import msgspec

from vmresize.projections.audit import SPILLED

CACHE_KIB = 16 * 1024   # smaller, inserts into the index read and write pages
# A key never put is known not to be there without asking SQLite (most lookups are of
# a new migration or instance): a Bloom filter of 2^23 bits (1 MiB), 3 bits a key; at a
# million keys, about 1 lookup in 50 of an absent key still asks.
FILTER_BITS, FILTER_HASHES = 1 << 23, 3
BATCH = 512         # values put are written this many at a time (and read from memory till then)


class SqliteSpill:
    """A `projections.audit.Spill` in a temporary SQLite file; `close` removes it."""

    def __init__(self):
        self.db = sqlite3.connect("", isolation_level=None)   # "": a private temp file
        for pragma in (f"cache_size=-{CACHE_KIB}", "journal_mode=OFF", "synchronous=OFF",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        # rows appended in rowid order, found by a small index (a table keyed by the
        # random ids themselves inserts 3-4x slower: its big rows land on random pages)
        self.db.execute("CREATE TABLE spill (kind INTEGER, key TEXT, value BLOB)")
        self.db.execute("CREATE UNIQUE INDEX spill_key ON spill (kind, key)")
        self.db.execute("BEGIN")        # one transaction, never committed: nothing to keep
        self.kinds = {kind: i for i, kind in enumerate(SPILLED)}
        self.pending: dict[tuple[int, str], object] = {}
        self.filter = bytearray(FILTER_BITS // 8)
        self.encode = msgspec.msgpack.Encoder().encode
        self.decoders = {kind: msgspec.msgpack.Decoder(t).decode
                         for kind, t in SPILLED.items()}

    def _bits(self, k: int, key: str) -> list[int]:
        digest = hashlib.blake2b(f"{k}:{key}".encode(), digest_size=4 * FILTER_HASHES).digest()
        return [int.from_bytes(digest[i:i + 4], "little") % FILTER_BITS
                for i in range(0, 4 * FILTER_HASHES, 4)]

    def _may_hold(self, k: int, key: str) -> bool:
        f = self.filter
        return all(f[b >> 3] & (1 << (b & 7)) for b in self._bits(k, key))

    def put(self, kind: str, key: str, value) -> None:
        f = self.filter
        for b in self._bits(self.kinds[kind], key):
            f[b >> 3] |= 1 << (b & 7)
        pending = self.pending
        pending[(self.kinds[kind], key)] = value
        if len(pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        encode = self.encode
        self.db.executemany("INSERT OR REPLACE INTO spill (kind, key, value) "
                            "VALUES (?, ?, ?)",
                            [(kind, key, encode(v)) for (kind, key), v in
                             self.pending.items()])
        self.pending.clear()

    def get(self, kind: str, key: str):
        k = self.kinds[kind]
        if not self._may_hold(k, key):
            return None
        value = self.pending.get((k, key))
        if value is not None:
            return value
        row = self.db.execute("SELECT value FROM spill WHERE kind = ? AND key = ?",
                              (k, key)).fetchone()
        return None if row is None else self.decoders[kind](row[0])

    def take(self, kind: str, key: str):
        value = self.get(kind, key)
        if value is not None:
            k = self.kinds[kind]
            self.pending.pop((k, key), None)
            self.db.execute("DELETE FROM spill WHERE kind = ? AND key = ?", (k, key))
        return value

    def values(self, kind: str) -> Iterator:
        self._flush()
        decode = self.decoders[kind]
        for (value,) in self.db.execute("SELECT value FROM spill WHERE kind = ?",
                                        (self.kinds[kind],)):
            yield decode(value)

    def count(self, kind: str) -> int:
        self._flush()
        return self.db.execute("SELECT COUNT(*) FROM spill WHERE kind = ?",
                               (self.kinds[kind],)).fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "SqliteSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
