"""The offline audit of a state directory: its host logs read (read-only, through
events.store) and checked by the pure auditor of `vmresize.projections.audit`, on this
process, or on this one and a helper (`split_audit`) when there is enough log to gain.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from vmresize.events.log import LogError
from vmresize.events.schema import Envelope
from vmresize.events.store import host_names, open_host_logs
from vmresize.offline.spill import SqliteSpill
from vmresize.projections.audit import (KEEP_IN_MEMORY, AsOf, AuditReport, TornTailNote,
                                        _report, _until, causal_cut, check, last_changes,
                                        parse_as_of)


# Below this much log, starting a second process costs more than it saves.
SPLIT_MIN_BYTES = 16 * 1024 * 1024


def audit(state_dir, as_of: str | None = None, expected_hosts: Iterable[str] | None = None,
          processes: int | None = None, keep: int | None = KEEP_IN_MEMORY) -> AuditReport:
    """Audit a state directory with no cluster running. `as_of`: see
    `projections.audit.parse_as_of`; `expected_hosts`: the cluster's hosts, each of
    which must have a log with records in it (a cut by `as_of` never makes a log
    empty). `processes`: 1, or 2 to split the work with a helper process (see
    split_audit; a cut `as_of` runs on one); by default 2 when there are two cores and
    enough log to gain from it. `keep`: the ended migrations and deleted instances kept
    in memory, the rest spilled to a temporary file (see offline.spill); None keeps
    everything in memory. The report is the same either way. Raises ValueError
    (a bad `as_of` or `processes`), CorruptLog (a bad record before the tail) and
    LogError (no host logs)."""
    cut_at = parse_as_of(as_of)
    if processes not in (None, 1, 2):
        raise ValueError(f"processes: expected 1 or 2, got {processes!r}")
    hosts = host_names(state_dir)
    if not hosts:
        raise LogError(f"{state_dir}: no host logs (missing or empty state directory)")
    if processes is None:
        processes = 2 if (os.cpu_count() or 1) > 1 and \
            _log_bytes(state_dir) >= SPLIT_MIN_BYTES else 1
    if processes == 2 and cut_at is None:
        from vmresize.offline.split_audit import check_split
        c, tails = check_split(state_dir, hosts, keep=keep)
        report = _report(c, hosts, [h for h in expected_hosts or ()
                                    if h not in hosts or h not in c.p.offsets])
        report.torn_tails = [TornTailNote(*t) for t in tails]
        return report
    readers = open_host_logs(state_dir)
    # a cut is as long as it is: what has ended is spilled only when the whole is read
    spill = None if keep is None or cut_at is not None else SqliteSpill()
    try:
        expected = [h for h in expected_hosts or () if h not in readers
                    or next(iter(readers[h].envelopes(0, 1)), None) is None]
        report = check(_cut(readers, cut_at), expected, spill, keep or 0,
                       lambda host, keys: last_changes(readers[host].envelopes(), keys))
    finally:
        for r in readers.values():
            r.close()
        if spill is not None:
            spill.close()
    report.torn_tails = [TornTailNote(h, r.torn_tail.segment, r.torn_tail.offset,
                                      r.torn_tail.bytes_dropped)
                         for h, r in readers.items() if r.torn_tail is not None]
    return report


def _log_bytes(state_dir) -> int:
    return sum(f.stat().st_size for f in Path(state_dir).glob("hosts/*/log/*.seg"))


def _cut(readers, cut_at: AsOf | None) -> dict[str, Iterable[Envelope]]:
    if cut_at is None:
        return {h: r.envelopes() for h, r in readers.items()}
    if cut_at.wall_time is not None:
        return {h: _until(r.envelopes(), cut_at.wall_time) for h, r in readers.items()}
    # two passes: the cut from the instance records alone, then the records in it
    cut = causal_cut({h: r.envelopes() for h, r in readers.items()}, cut_at.host,
                     cut_at.offset)
    return {h: r.envelopes(0, cut[h]) for h, r in readers.items()}
