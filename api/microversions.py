"""Compute API microversions: which one a request asked for, and the version documents.

A request names its version in `OpenStack-API-Version: compute X.Y` or
`X-OpenStack-Nova-API-Version: X.Y` (or `latest`); none means 2.1. A version outside
[MIN, MAX] is refused with 406, a malformed one with 400, as Nova does.
"""
from __future__ import annotations

import re
from typing import NamedTuple

MIN = (2, 1)
MAX = (2, 96)
UPDATED = "2013-07-23T11:33:21Z"
_FORMAT = re.compile(r"^([1-9]\d*)\.([1-9]\d*|0)$")


class Version(NamedTuple):
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


MIN_VERSION = Version(*MIN)
MAX_VERSION = Version(*MAX)


class VersionError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def requested(headers) -> Version:
    """The version a request asked for; VersionError (400 or 406) if it cannot be had."""
    raw = None
    value = headers.get("openstack-api-version")
    if value:
        for part in value.split(","):
            service, _, ver = part.strip().partition(" ")
            if service.lower() == "compute":
                raw = ver.strip()
    if raw is None:
        raw = headers.get("x-openstack-nova-api-version")
    if raw is None:
        return MIN_VERSION
    if raw.lower() == "latest":
        return MAX_VERSION
    m = _FORMAT.match(raw)
    if not m:
        raise VersionError(f"API Version String {raw} is of invalid format. Must be of "
                           f"format MajorNum.MinorNum.", 400)
    v = Version(int(m.group(1)), int(m.group(2)))
    if not MIN_VERSION <= v <= MAX_VERSION:
        raise VersionError(f"Version {v} is not supported by the API. Minimum is "
                           f"{MIN_VERSION} and maximum is {MAX_VERSION}.", 406)
    return v


def response_headers(v: Version) -> dict[str, str]:
    return {"OpenStack-API-Version": f"compute {v}", "X-OpenStack-Nova-API-Version": str(v),
            "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version"}


def v21_document(base_url: str) -> dict:
    """The v2.1 version document (`version` is the maximum microversion)."""
    return {"id": "v2.1", "status": "CURRENT", "version": str(MAX_VERSION),
            "min_version": str(MIN_VERSION), "updated": UPDATED,
            "links": [{"rel": "self", "href": f"{base_url}/v2.1/"},
                      {"rel": "describedby", "type": "text/html",
                       "href": "https://docs.openstack.org/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.compute+json;version=2.1"}]}


def versions_document(base_url: str) -> dict:
    v20 = {"id": "v2.0", "status": "SUPPORTED", "version": "", "min_version": "",
           "updated": "2011-01-21T11:33:21Z",
           "links": [{"rel": "self", "href": f"{base_url}/v2/"}]}
    return {"versions": [v20, v21_document(base_url)]}
