"""The compute API over raw HTTP against `vmresize up`: version documents and
microversions, Nova's error shapes and codes, bad input that changes nothing in the
logs, request ids that lead to the events they caused, flavors that outlive
`down` / `up`."""
from __future__ import annotations

import http.client
import json
import uuid

import pytest

from apicluster import ApiCluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    cluster = ApiCluster(tmp_path_factory.mktemp("api-http"))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def call(api, method: str, path: str, body=None, headers: dict | None = None,
         raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    doc = json.loads(payload) if payload else None
    return r.status, {k.lower(): v for k, v in r.getheaders()}, doc


def boot(api, name: str) -> str:
    status, _, doc = call(api, "POST", "/v2.1/servers", {"server": {
        "name": name, "flavorRef": "1", "imageRef": "cirros", "networks": "none"}})
    assert status == 202, doc
    return doc["server"]["id"]


def nova_error(doc, kind: str, code: int) -> str:
    assert list(doc) == [kind] and doc[kind]["code"] == code, doc
    return doc[kind]["message"]


def test_version_documents(api):
    for path in ("/v2.1", "/v2.1/"):
        status, headers, doc = call(api, "GET", path)
        assert status == 200 and doc["version"]["id"] == "v2.1"
        assert (doc["version"]["min_version"], doc["version"]["version"]) == ("2.1", "2.96")
        assert headers["x-openstack-request-id"].startswith("req-")
    status, _, doc = call(api, "GET", "/")
    assert status == 200 and "v2.1" in [v["id"] for v in doc["versions"]]


def test_each_request_is_answered_at_its_microversion(api):
    sid = boot(api, "mv-1")
    _, headers, doc = call(api, "GET", f"/v2.1/servers/{sid}")
    assert headers["openstack-api-version"] == "compute 2.1"
    assert set(doc["server"]["flavor"]) == {"id", "links"} and "locked" not in doc["server"]
    _, headers, doc = call(api, "GET", f"/v2.1/servers/{sid}",
                           headers={"OpenStack-API-Version": "compute 2.47"})
    assert headers["x-openstack-nova-api-version"] == "2.47"
    assert doc["server"]["flavor"]["original_name"] == "m1.tiny"
    assert doc["server"]["locked"] is False and "pinned_availability_zone" not in doc["server"]
    _, _, doc = call(api, "GET", f"/v2.1/servers/{sid}",
                     headers={"X-OpenStack-Nova-API-Version": "latest"})
    assert "pinned_availability_zone" in doc["server"]
    status, _, doc = call(api, "GET", "/v2.1/servers",
                          headers={"OpenStack-API-Version": "compute 2.200"})
    assert status == 406 and "maximum is 2.96" in nova_error(doc, "notAcceptable", 406)
    status, _, doc = call(api, "GET", "/v2.1/servers",
                          headers={"OpenStack-API-Version": "compute two"})
    assert status == 400 and "invalid format" in nova_error(doc, "badRequest", 400)


def test_unknown_servers_are_404_by_name_uuid_or_garbage(api):
    for ident in ("no-such-name", str(uuid.uuid4()), "-1", "x" * 300):
        status, headers, doc = call(api, "GET", f"/v2.1/servers/{ident}")
        assert status == 404, (ident, doc)
        assert ident in nova_error(doc, "itemNotFound", 404)
        assert headers["x-compute-request-id"] == headers["x-openstack-request-id"]
    status, _, doc = call(api, "POST", f"/v2.1/servers/{uuid.uuid4()}/action",
                          {"os-stop": None})
    assert status == 404


def test_bad_input_changes_nothing(api):
    sid = boot(api, "bad-1")
    before, hosts_before = api.log_bytes(), api.vm_json("list", "hosts")
    path = f"/v2.1/servers/{sid}/action"
    cases = [
        (dict(raw=b"{not json"), 400, "Malformed request body"),
        (dict(body={"fly": None}), 400, "There is no such action: fly"),
        (dict(body={"resize": {"flavorRef": {"id": 3}}}), 400, "flavorRef"),
        (dict(body={"resize": {}}), 400, "'flavorRef' is a required property"),
        (dict(body={"resize": {"flavorRef": "404"}}), 400, "Flavor 404 could not be found"),
        (dict(body={"resize": {"flavorRef": "1"}}), 400, "must change flavor"),
        (dict(body={"reboot": {"type": "GENTLE"}}), 400, "reboot.type"),
        (dict(body={"migrate": {"host": "compute-9"}},
              headers={"OpenStack-API-Version": "compute 2.56"}), 400,
         "Compute host compute-9 could not be found"),
        (dict(body={"migrate": {"host": "compute-1"}}), 400, "Additional properties"),
        (dict(body={"confirmResize": None}), 409,
         f"Cannot 'confirmResize' instance {sid} while it is in vm_state active"),
        (dict(body={"revertResize": {}}), 409, "while it is in vm_state active"),
        (dict(raw=b'{"resize": "' + b"x" * 200_000 + b'"}'), 413, "too large"),
    ]
    for kw, code, words in cases:
        status, headers, doc = call(api, "POST", path, **kw)
        kind = {400: "badRequest", 409: "conflictingRequest", 413: "overLimit"}[code]
        assert status == code, (kw, doc)
        assert headers["content-type"] == "application/json"
        assert words in nova_error(doc, kind, code), (kw, doc)
    for body in ({"server": {"name": "", "flavorRef": "1"}},
                 {"server": {"name": "x", "flavorRef": "1", "imageRef": str(uuid.uuid4())}},
                 {"server": {"name": "x", "flavorRef": "99"}},
                 {"server": {"name": "x", "flavorRef": "1", "colour": "red"}},
                 {"flavor": {}}):
        status, _, doc = call(api, "POST", "/v2.1/servers", body)
        assert status == 400, (body, doc)
    assert api.log_bytes() == before
    assert api.vm_json("list", "hosts") == hosts_before


def test_one_request_id_from_the_response_to_the_events(api):
    sid = boot(api, "rid-1")
    status, headers, _ = call(api, "POST", f"/v2.1/servers/{sid}/action",
                              {"resize": {"flavorRef": "2"}})
    assert status == 202
    rid = headers["x-openstack-request-id"]
    _, _, doc = call(api, "GET", f"/v2.1/servers/{sid}")
    assert doc["server"]["status"] in ("RESIZE", "VERIFY_RESIZE")
    lines = [json.loads(line) for line in
             api.vmresize("events", "--request", rid, "--json").stdout.splitlines()]
    assert lines[0]["event"]["type"] == "ResizeRequested"
    assert lines[0]["event"]["request_id"] == rid
    uuids = {line["event"].get("instance_uuid") for line in lines[1:]
             if line["host"] != "controller"}
    assert uuids == {sid}
    status, _, doc = call(api, "GET", f"/v2.1/servers/{sid}/os-instance-actions/{rid}",
                          headers={"OpenStack-API-Version": "compute 2.84"})
    assert status == 200 and doc["instanceAction"]["action"] == "resize"


def test_created_flavor_outlives_down_and_up(api):
    body = {"flavor": {"name": "m1.huge", "ram": 1024, "vcpus": 2, "disk": 40,
                       "id": "huge"}}
    status, headers, doc = call(api, "POST", "/v2.1/flavors", body)
    assert status == 200 and doc["flavor"]["id"] == "huge", doc
    status, _, doc = call(api, "POST", "/v2.1/flavors", body)
    assert status == 409
    status, _, doc = call(api, "POST", "/v2.1/flavors", {"flavor": {"name": "m1.gone",
                                                                   "ram": 1, "vcpus": 1,
                                                                   "disk": 1}})
    gone = doc["flavor"]["id"]
    assert call(api, "DELETE", f"/v2.1/flavors/{gone}")[0] == 202
    api.down()
    api.up()
    _, _, doc = call(api, "GET", "/v2.1/flavors/detail")
    names = {f["name"]: f for f in doc["flavors"]}
    assert "m1.gone" not in names
    assert (names["m1.huge"]["id"], names["m1.huge"]["ram"]) == ("huge", 1024)
    assert call(api, "GET", f"/v2.1/flavors/{gone}")[0] == 404
