"""The event schema and codec: every event round-trips; unknown versions and tags are
refused with SchemaError; a record whose offset disagrees with its place in the log is
reported as CorruptLog with its segment file and offset."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings

import strategies as s
from vmresize.events import schema as ev
from vmresize.events.codec import (SchemaError, decode_controller, decode_host, encode,
                                   to_builtins, to_json)
from vmresize.events.log import CorruptLog, SegmentLog
from vmresize.events.schema import SCHEMA_VERSION, Envelope
from vmresize.events.store import decode_records

ROUND_TRIP = settings(max_examples=25, deadline=None)


@pytest.mark.parametrize("cls", ev.HOST_EVENT_TYPES, ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=s.st.data())
def test_every_host_event_round_trips_through_the_codec(cls, data):
    env = data.draw(s.envelopes(s.event_of(cls)))
    back = decode_host(encode(env))
    assert back == env
    assert type(back.event) is cls


@ROUND_TRIP
@given(env=s.controller_envelopes)
def test_controller_events_round_trip(env):
    assert decode_controller(encode(env)) == env


def test_every_host_event_type_has_a_distinct_tag():
    tags = [msgspec.inspect.type_info(cls).tag for cls in ev.HOST_EVENT_TYPES]
    assert len(tags) == len(set(tags))
    assert tags == [cls.__name__ for cls in ev.HOST_EVENT_TYPES]


@ROUND_TRIP
@given(env=s.envelopes())
def test_json_view_carries_the_type_tag(env):
    doc = msgspec.json.decode(to_json(to_builtins(env)))
    assert doc[3]["type"] == type(env.event).__name__


def _spawned(version: int = SCHEMA_VERSION, offset: int = 0) -> Envelope:
    return Envelope("h", offset, 1.0, ev.Spawned(instance_uuid="u", instance_version=2),
                    version)


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, 99])
def test_unknown_schema_version_is_refused(version):
    # Given a well framed record written by another schema version
    payload = encode(_spawned(version))
    # Then it is refused, naming the version
    with pytest.raises(SchemaError, match=f"version {version}"):
        decode_host(payload)


def test_known_schema_version_is_read():
    assert decode_host(encode(_spawned())).version == SCHEMA_VERSION


def test_unknown_event_tag_is_refused():
    raw = msgspec.msgpack.encode(["h", 0, 1.0, {"type": "Exploded", "instance_uuid": "u",
                                                "instance_version": 1}, SCHEMA_VERSION])
    with pytest.raises(SchemaError, match="Exploded"):
        decode_host(raw)


def test_a_controller_event_in_a_host_log_is_refused():
    env = ev.ControllerEnvelope("controller", 0, 1.0,
                                ev.ConfirmRequested(request_id="r", migration_id="m"))
    with pytest.raises(SchemaError):
        decode_host(encode(env))


def test_garbage_payload_is_refused():
    with pytest.raises(SchemaError):
        decode_host(b"\xc1not msgpack")


def _write(directory, payloads: list[bytes]) -> None:
    with SegmentLog(directory, fsync=False) as log:
        log.append(payloads)


def test_record_whose_offset_disagrees_is_corrupt(tmp_path):
    # Given a log whose second record says it is at offset 7
    log_dir = tmp_path / "log"
    _write(log_dir, [encode(_spawned(offset=0)), encode(_spawned(offset=7))])
    log = SegmentLog(log_dir, readonly=True)
    # When it is decoded, then the first record is read and the second refused
    records = decode_records(log, log_dir, decode_host)
    assert next(records).offset == 0
    with pytest.raises(CorruptLog) as info:
        next(records)
    assert info.value.offset == 1
    assert info.value.path.endswith("00000000000000000000.seg")
    assert "offset 7" in str(info.value)


def test_undecodable_record_is_corrupt_with_its_offset(tmp_path):
    log_dir = tmp_path / "log"
    _write(log_dir, [encode(_spawned(offset=0)), encode(_spawned(version=99, offset=1))])
    log = SegmentLog(log_dir, readonly=True)
    with pytest.raises(CorruptLog) as info:
        list(decode_records(log, log_dir, decode_host))
    assert info.value.offset == 1
    assert "version 99" in info.value.reason
