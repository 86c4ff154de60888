"""The compute API against one `vmresize up` (api.auth none): driven by the real
`openstack` CLI and openstacksdk, unmodified, and over raw HTTP (version documents,
microversions, Nova's error shapes, bad input that changes no log, request ids that
lead to the events they caused), checked against the cluster's own views (`vmresize
show/list --json`) and logs (`vmresize events`). The CLI runs forked from one process
that imported it (apicluster.OpenstackCli); flavors outliving `down` / `up` are checked
in test_cli's round trip, which takes the cluster down and up anyway."""
from __future__ import annotations

import http.client
import json
import uuid

import pytest

from apicluster import ApiCluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    cluster = ApiCluster(tmp_path_factory.mktemp("api-clients"))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.close()


def create(api, name: str, flavor: str = "m1.small") -> dict:
    server = api.os_json("server", "create", "--flavor", flavor, "--image", "cirros",
                         "--wait", name)
    assert server["status"] == "ACTIVE", server
    return server


def test_flavor_and_image_lists(api):
    flavors = api.os_json("flavor", "list")
    assert [(f["ID"], f["Name"], f["RAM"]) for f in flavors] == [
        ("1", "m1.tiny", 512), ("2", "m1.small", 2048), ("3", "m1.medium", 4096)]
    images = api.os_json("image", "list")
    assert [(i["Name"], i["Status"]) for i in images] == [("cirros", "active")]


def test_resize_wait_then_confirm(api):
    server = create(api, "web-1")
    api.openstack("server", "resize", "--flavor", "m1.medium", "--wait", "web-1")
    shown = api.vm_json("show", "web-1")
    assert (shown["status"], shown["flavor"], shown["uuid"]) == (
        "VERIFY_RESIZE", "m1.medium", server["id"])
    listed = {s["Name"]: s for s in api.os_json("server", "list", "--long")}
    assert listed["web-1"]["Status"] == "VERIFY_RESIZE"
    assert listed["web-1"]["Flavor"] == "m1.medium"
    api.openstack("server", "resize", "confirm", "web-1")
    shown = api.vm_json("show", "web-1")
    assert (shown["status"], shown["flavor"]) == ("ACTIVE", "m1.medium")
    migrations = api.os_json("server", "migration", "list", "--server", "web-1")
    assert [(m["Status"], m["Type"], m["Old Flavor"], m["New Flavor"])
            for m in migrations] == [("confirmed", "resize", 2, 3)]


def test_resize_then_revert(api):
    create(api, "web-2")
    before = api.vm_json("show", "web-2")
    api.openstack("server", "resize", "--flavor", "m1.medium", "--wait", "web-2")
    api.openstack("server", "resize", "revert", "web-2")
    after = api.vm_json("show", "web-2")
    assert (after["status"], after["flavor"], after["host"]) == (
        "ACTIVE", "m1.small", before["host"])
    statuses = {m["status"] for m in api.vm_json("list", "migrations")
                if m["instance_uuid"] == before["uuid"]}
    assert statuses == {"reverted"}


def test_cold_migration_to_a_named_host(api):
    create(api, "web-3", "m1.tiny")
    source = api.vm_json("show", "web-3")["host"]
    dest = "compute-2" if source == "compute-1" else "compute-1"
    api.openstack("server", "migrate", "--host", dest, "--wait", "web-3")
    shown = api.vm_json("show", "web-3")
    assert (shown["status"], shown["host"], shown["flavor"]) == (
        "VERIFY_RESIZE", dest, "m1.tiny")
    api.openstack("server", "resize", "confirm", "web-3")
    migrations = api.os_json("server", "migration", "list", "--server", "web-3",
                             "--type", "cold-migration")
    assert [(m["Source Compute"], m["Dest Compute"], m["Status"]) for m in migrations] == [
        (source, dest, "confirmed")]


def test_events_carry_the_request_ids_of_the_logs(api):
    create(api, "web-4", "m1.tiny")
    api.openstack("server", "resize", "--flavor", "m1.small", "--wait", "web-4")
    actions = api.os_json("server", "event", "list", "web-4")
    assert [a["Action"] for a in actions] == ["resize", "create"]
    request_id = actions[0]["Request ID"]
    shown = api.os_json("server", "event", "show", "web-4", request_id)
    assert [(e["event"], e["result"]) for e in shown["events"]] == [
        ("compute_prep_resize", "Success"), ("compute_resize_instance", "Success"),
        ("compute_finish_resize", "Success")]
    lines = api.vmresize("events", "--request", request_id, "--json").stdout.splitlines()
    kinds = [json.loads(line)["event"]["type"] for line in lines]
    assert kinds[0] == "ResizeRequested" and "RequestEnded" in kinds
    assert {"Claimed", "MigrationStarted", "DiskMigrated", "Finished"} <= set(kinds)


def test_hypervisors_and_services(api):
    hypervisors = api.os_json("hypervisor", "list")
    assert sorted((h["Hypervisor Hostname"], h["State"]) for h in hypervisors) == [
        ("compute-1", "up"), ("compute-2", "up")]
    services = api.os_json("compute", "service", "list", "--service", "nova-compute")
    assert sorted((s["Host"], s["State"]) for s in services) == [
        ("compute-1", "up"), ("compute-2", "up")]


def test_refusal_reads_as_nova_s(api):
    create(api, "web-5", "m1.tiny")
    proc = api.openstack("server", "resize", "confirm", "web-5", check=False)
    assert proc.returncode == 1
    assert "409" in proc.stderr and "while it is in vm_state active" in proc.stderr
    proc = api.openstack("server", "show", "no-such-server", check=False)
    assert proc.returncode == 1 and "No Server found for no-such-server" in proc.stderr


def test_openstacksdk(api):
    import openstack
    conn = openstack.connect(auth_type="none", auth={"endpoint": api.url},
                             identity_api_version="3")
    server = conn.compute.create_server(name="sdk-1", flavor_id="1",
                                        image_id=conn.image.find_image("cirros").id,
                                        networks="none")
    server = conn.compute.wait_for_server(conn.compute.get_server(server.id), wait=60)
    assert server.status == "ACTIVE"
    conn.compute.resize_server(server, "2")
    server = conn.compute.wait_for_server(conn.compute.get_server(server.id),
                                          status="VERIFY_RESIZE", wait=60)
    assert server.flavor.original_name == "m1.small"
    conn.compute.confirm_server_resize(server)
    server = conn.compute.wait_for_server(conn.compute.get_server(server.id), wait=60)
    migrations = [m for m in conn.compute.migrations() if m.server_id == server.id]
    assert [(m.status, m.migration_type) for m in migrations] == [("confirmed", "resize")]
    actions = list(conn.compute.server_actions(server))
    assert sorted(a.action for a in actions) == ["confirmResize", "create", "resize"]
    assert api.vm_json("show", "sdk-1")["status"] == "ACTIVE"


LIFECYCLE = callable(getattr(__import__("vmresize.actors.api", fromlist=["Cluster"]).Cluster,
                             "delete", None))


@pytest.mark.skipif(not LIFECYCLE, reason="needs Cluster.stop/start/reboot/delete(name)")
def test_stop_start_reboot_delete(api):
    server = create(api, "life-1", "m1.tiny")
    api.openstack("server", "stop", "life-1")
    assert api.vm_json("show", "life-1")["status"] == "SHUTOFF"
    assert api.os_json("server", "show", "life-1")["status"] == "SHUTOFF"
    api.openstack("server", "start", "life-1")
    assert api.vm_json("show", "life-1")["status"] == "ACTIVE"
    api.openstack("server", "reboot", "--hard", "--wait", "life-1")
    assert api.vm_json("show", "life-1")["status"] == "ACTIVE"
    actions = [a["Action"] for a in api.os_json("server", "event", "list", "life-1")]
    assert actions == ["reboot", "start", "stop", "create"]
    used_before = {h["name"]: h["memory_mb_used"] for h in api.vm_json("list", "hosts")}
    api.openstack("server", "delete", "--wait", "life-1")
    gone = api.openstack("server", "show", server["id"], check=False)
    assert gone.returncode == 1 and "No Server found" in gone.stderr
    used_after = {h["name"]: h["memory_mb_used"] for h in api.vm_json("list", "hosts")}
    assert sum(used_before.values()) - sum(used_after.values()) == 512


@pytest.mark.skipif(not LIFECYCLE, reason="needs Cluster.delete(name)")
def test_delete_in_verify_resize_confirms_first_and_holds_nothing(api):
    create(api, "life-2", "m1.tiny")
    api.openstack("server", "resize", "--flavor", "m1.small", "--wait", "life-2")
    uuid = api.vm_json("show", "life-2")["uuid"]
    api.openstack("server", "delete", "--wait", "life-2")
    statuses = [m["status"] for m in api.vm_json("list", "migrations")
                if m["instance_uuid"] == uuid]
    assert statuses == ["confirmed"]
    assert api.vm_json("audit")["ok"]


# --------------------------------------------------------------------------- raw HTTP

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
