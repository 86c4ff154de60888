"""One reused, typed msgspec Encoder/Decoder per log kind.

`decode_host`/`decode_controller` refuse a schema version they do not know and any
unknown event type with `SchemaError`, which names what was wrong; callers add the
file and offset.
"""
from __future__ import annotations

import msgspec

from vmresize.events.schema import (SCHEMA_VERSION, ControllerEnvelope, Envelope)


class SchemaError(ValueError):
    """A record that is well framed but does not decode to a known event."""


_ENCODER = msgspec.msgpack.Encoder()
_HOST_DECODER = msgspec.msgpack.Decoder(Envelope)
_CONTROLLER_DECODER = msgspec.msgpack.Decoder(ControllerEnvelope)
_JSON_ENCODER = msgspec.json.Encoder()


def encode(envelope: Envelope | ControllerEnvelope) -> bytes:
    return _ENCODER.encode(envelope)


def _check(envelope):
    if envelope.version != SCHEMA_VERSION:
        raise SchemaError(f"schema version {envelope.version} is not known "
                          f"(this build reads version {SCHEMA_VERSION})")
    return envelope


def decode_host(payload: bytes) -> Envelope:
    try:
        return _check(_HOST_DECODER.decode(payload))
    except msgspec.DecodeError as exc:
        raise SchemaError(f"undecodable host record: {exc}") from None


def decode_controller(payload: bytes) -> ControllerEnvelope:
    try:
        return _check(_CONTROLLER_DECODER.decode(payload))
    except msgspec.DecodeError as exc:
        raise SchemaError(f"undecodable controller record: {exc}") from None


def to_json(obj) -> bytes:
    return _JSON_ENCODER.encode(obj)


def to_builtins(obj):
    return msgspec.to_builtins(obj)
