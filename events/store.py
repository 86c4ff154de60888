"""The state directory: where each host's and the controller's log and snapshots live.

    STATE_DIR/hosts/<host>/log/<first offset>.seg       STATE_DIR/hosts/<host>/snapshots/
    STATE_DIR/controller/log/...                        STATE_DIR/controller/snapshots/

`read_host_logs` opens every host log read-only (it writes nothing, not even a lock) and
decodes its records; a record that does not decode raises `CorruptLog` naming the
segment file and offset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vmresize.events.codec import SchemaError, decode_controller, decode_host
from vmresize.events.log import CorruptLog, LogError, SegmentLog, TornTail
from vmresize.events.schema import ControllerEnvelope, Envelope


def host_dir(state_dir: str | Path, host: str) -> Path:
    return Path(state_dir) / "hosts" / host


def controller_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "controller"


def host_names(state_dir: str | Path) -> list[str]:
    hosts = Path(state_dir) / "hosts"
    if not hosts.is_dir():
        return []
    return sorted(p.name for p in hosts.iterdir() if (p / "log").is_dir())


def _segment_of(log_dir: Path, offset: int) -> str:
    segs = sorted(log_dir.glob("*.seg"))
    best = segs[0] if segs else log_dir
    for seg in segs:
        if int(seg.stem) <= offset:
            best = seg
    return str(best)


def decode_records(log: SegmentLog, log_dir: Path, decode, start: int = 0,
                   stop: int | None = None, payloads: bool = False) -> Iterator:
    """The log's records decoded and checked (CorruptLog names the segment and offset);
    with `payloads`, (envelope, payload bytes) pairs."""
    for offset, payload in log.read(start, stop):
        try:
            env = decode(payload)
        except SchemaError as exc:
            raise CorruptLog(_segment_of(log_dir, offset), offset, str(exc)) from None
        if env.offset != offset:
            raise CorruptLog(_segment_of(log_dir, offset), offset,
                             f"record says offset {env.offset}")
        yield (env, payload) if payloads else env


class HostLogReader:
    """One host's log opened read-only; `chunk_bytes`: how much each read of a segment
    asks for (see `merged_chunk_bytes`)."""

    def __init__(self, state_dir: str | Path, host: str, chunk_bytes: int = 1 << 20):
        self.host = host
        self.log_dir = host_dir(state_dir, host) / "log"
        # Older segments are checked as they are read: a bad record still raises
        # CorruptLog, without reading every segment twice.
        self.log = SegmentLog(self.log_dir, readonly=True, verify=False,
                              read_chunk_bytes=chunk_bytes)

    @property
    def torn_tail(self) -> TornTail | None:
        return self.log.torn_tail

    def envelopes(self, start: int = 0, stop: int | None = None) -> Iterator[Envelope]:
        return decode_records(self.log, self.log_dir, decode_host, start, stop)

    def records(self, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[Envelope, bytes]]:
        """Like `envelopes`, with each record's payload bytes beside its envelope."""
        return decode_records(self.log, self.log_dir, decode_host, start, stop, True)

    def close(self) -> None:
        self.log.close()


# What the readers of logs read together (merged, as the audit does) buffer in all: each
# reads its share at a time, so memory does not grow with the number of hosts nor, as
# long as logs are shorter than a chunk, with the history.
MERGED_READ_BYTES = 2 << 20


def merged_chunk_bytes(logs: int) -> int:
    """How much each of `logs` readers read together asks for at a time."""
    return min(1 << 20, max(16 << 10, MERGED_READ_BYTES // max(1, logs)))


def open_host_logs(state_dir: str | Path) -> dict[str, HostLogReader]:
    """Every host's log, to be read together."""
    hosts = host_names(state_dir)
    chunk = merged_chunk_bytes(len(hosts))
    return {h: HostLogReader(state_dir, h, chunk) for h in hosts}


def read_controller_log(state_dir: str | Path) -> Iterator[ControllerEnvelope]:
    log_dir = controller_dir(state_dir) / "log"
    if not log_dir.is_dir():
        return iter(())
    log = SegmentLog(log_dir, readonly=True)
    return decode_records(log, log_dir, decode_controller)


__all__ = ["CorruptLog", "LogError", "HostLogReader", "open_host_logs", "host_names",
           "merged_chunk_bytes",
           "host_dir", "controller_dir", "read_controller_log", "decode_records"]
