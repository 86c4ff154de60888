"""The compute API driven by the real `openstack` CLI and openstacksdk, unmodified,
against `vmresize up` (api.auth none), checked against the cluster's own views
(`vmresize show/list --json`) and logs (`vmresize events --request`)."""
from __future__ import annotations

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
        cluster.down()


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
    import json
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
