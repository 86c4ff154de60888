"""Where the offline audit keeps what has ended: a private temporary SQLite database.

The checker (`projections.audit._Checker`) moves ended migrations, deleted instances and
released allocations here once newer ones have ended, so that the audit's memory is
bounded by live state (open migrations, live instances, held allocations) and not by
history; its end-state checks read them back. SQLite with an empty file name is a
temporary file of its own, removed when the connection closes; with no journal and no
sync, and a page cache of `CACHE_KIB`, it costs a few microseconds a row. Nothing here
outlives the audit or is read by anyone else.
"""
from __future__ import annotations

import sqlite3
from typing import Iterator

import msgspec

from vmresize.projections.audit import SPILLED

CACHE_KIB = 1024
BATCH = 512         # values put are written this many at a time (and read from memory till then)


class SqliteSpill:
    """A `projections.audit.Spill` in a temporary SQLite file; `close` removes it."""

    def __init__(self):
        self.db = sqlite3.connect("", isolation_level=None)   # "": a private temp file
        for pragma in (f"cache_size=-{CACHE_KIB}", "journal_mode=OFF", "synchronous=OFF",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE spill (kind INTEGER, key TEXT, value BLOB, "
                        "PRIMARY KEY (kind, key)) WITHOUT ROWID")
        self.db.execute("BEGIN")        # one transaction, never committed: nothing to keep
        self.kinds = {kind: i for i, kind in enumerate(SPILLED)}
        self.pending: dict[tuple[int, str], object] = {}
        self.encode = msgspec.msgpack.Encoder().encode
        self.decoders = {kind: msgspec.msgpack.Decoder(t).decode
                         for kind, t in SPILLED.items()}

    def put(self, kind: str, key: str, value) -> None:
        pending = self.pending
        pending[(self.kinds[kind], key)] = value
        if len(pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        encode = self.encode
        self.db.executemany("INSERT OR REPLACE INTO spill VALUES (?, ?, ?)",
                            [(kind, key, encode(v)) for (kind, key), v in
                             self.pending.items()])
        self.pending.clear()

    def get(self, kind: str, key: str):
        k = self.kinds[kind]
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
        for (value,) in self.db.execute("SELECT value FROM spill WHERE kind = ? "
                                        "ORDER BY key", (self.kinds[kind],)):
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
