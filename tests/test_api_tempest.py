"""Tempest's own compute tests, unmodified, against `vmresize up` with api.auth
keystone: resize confirm / revert, cold migration and its revert, migrations listing,
stop / start, hard reboot, delete (VERIFY_RESIZE included), flavors and the negative
server tests. Each test is named here: the ones left out need what vmresize does not
have (rebuild, pause, suspend, shelve, volumes, networks, consoles, server rename,
passwords, backups, keypairs); the feature flags in TEMPEST_CONF say so too. Every
named test must pass: a skip fails this test as well.
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from apicluster import ApiCluster
from vmresize.actors.api import Cluster
from vmresize.api.auth import hash_password
from vmresize.api.views import stable_uuid

pytestmark = pytest.mark.ray

PASSWORD = "tempest-pw"
# Tempest locks an account per test class while it runs: two of each kind. Its "alt"
# user is the first free account that is not admin, and must be of another project
# than the primary one (a member of the project with manager, member and reader):
# the alt accounts come first.
USERS = [(f"{name}{n}", f"{project}{n}", roles)
         for name, project, roles in (("alt-member", "alt", ["member"]),
                                      ("admin", "admin", ["admin"]),
                                      ("member", "demo", ["member"]),
                                      ("reader", "demo", ["reader"]),
                                      ("manager", "demo", ["manager"]))
         for n in (1, 2)]

T = "tempest.api.compute."
TESTS = [T + "servers.test_server_actions.ServerActionsTestJSON." + t for t in (
    "test_resize_server_confirm", "test_resize_server_revert", "test_stop_start_server",
    "test_reboot_server_hard")] + [
    T + "admin.test_migrations.MigrationsAdminTest." + t for t in (
        "test_list_migrations", "test_list_migrations_in_flavor_resize_situation",
        "test_resize_server_revert_deleted_flavor", "test_cold_migration",
        "test_revert_cold_migration")] + [
    T + "servers.test_delete_server.DeleteServersTestJSON." + t for t in (
        "test_delete_active_server", "test_delete_server_while_in_shutoff_state",
        "test_delete_server_while_in_verify_resize_state")] + [
    T + "flavors.test_flavors.FlavorsV2TestJSON." + t for t in (
        "test_list_flavors", "test_list_flavors_with_detail", "test_get_flavor",
        "test_list_flavors_limit_results", "test_list_flavors_using_marker",
        "test_list_flavors_detailed_filter_by_min_disk",
        "test_list_flavors_detailed_filter_by_min_ram")] + [
    T + "servers.test_servers_negative.ServersNegativeTestJSON." + t for t in (
        "test_server_name_blank", "test_create_with_invalid_image",
        "test_create_with_invalid_flavor", "test_invalid_ip_v6_address",
        "test_resize_nonexistent_server", "test_resize_server_with_non_existent_flavor",
        "test_resize_server_with_null_flavor", "test_reboot_non_existent_server",
        "test_reboot_deleted_server", "test_create_server_name_length_exceeds_256",
        "test_create_with_non_existent_keypair", "test_delete_non_existent_server",
        "test_delete_server_pass_negative_id",
        "test_delete_server_pass_id_exceeding_length_limit",
        "test_get_non_existent_server", "test_stop_non_existent_server")] + [
    T + "servers.test_servers_negative.ServersNegativeTestMultiTenantJSON."
    "test_delete_a_server_of_another_tenant"]

TEMPEST_CONF = """\
[DEFAULT]
log_file = {dir}/tempest.log
[oslo_concurrency]
lock_path = {dir}/lock
[auth]
use_dynamic_credentials = False
test_accounts_file = {dir}/accounts.yaml
default_credentials_domain_name = Default
create_isolated_networks = False
[identity]
uri_v3 = {root}/identity/v3
auth_version = v3
region = RegionOne
[identity-feature-enabled]
api_v2 = False
[compute]
image_ref = {image}
image_ref_alt = {image}
flavor_ref = 1
flavor_ref_alt = 2
min_compute_nodes = 2
build_timeout = 60
build_interval = 1
[compute-feature-enabled]
resize = True
cold_migration = True
# what vmresize does not have
live_migration = False
console_output = False
pause = False
suspend = False
shelve = False
rescue = False
snapshot = False
interface_attach = False
change_password = False
vnc_console = False
spice_console = False
serial_console = False
metadata_service = False
config_drive = False
personality = False
attach_encrypted_volume = False
[validation]
# the fake hosts run no guests to ssh into
run_validation = False
[service_available]
glance = True
nova = True
# servers get no networks (no fixed_network_name): Tempest's classes that ask for a
# default network only need it said to be there
neutron = True
cinder = False
swift = False
[image-feature-enabled]
api_v1 = False
"""

LIFECYCLE = callable(getattr(Cluster, "delete", None)) and "name" in inspect.signature(
    Cluster.delete).parameters


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    digest = hash_password(PASSWORD)
    users = "".join(f'    - {{name: {n}, password_hash: "{digest}", roles: [{", ".join(r)}],'
                    f' project: {p}}}\n' for n, p, r in USERS)
    cluster = ApiCluster(tmp_path_factory.mktemp("api-tempest"),
                         "  auth: keystone\n  users:\n" + users)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.close()


def run_tempest(api, tests: list[str]) -> dict[str, str]:
    """Run the named Tempest tests in one process; {test id: status}."""
    import subunit
    import testtools
    work = api.workdir / "tempest"
    (work / "lock").mkdir(parents=True, exist_ok=True)
    (work / "accounts.yaml").write_text("".join(
        f"- {{username: {n}, project_name: {p}, password: {PASSWORD}, "
        f"domain_name: Default, roles: [{', '.join(r)}]"
        f"{', types: [admin]' if 'admin' in r else ''}}}\n" for n, p, r in USERS))
    (work / "tempest.conf").write_text(TEMPEST_CONF.format(
        dir=work, root=api.url.rsplit("/v2.1", 1)[0], image=stable_uuid("image", "cirros")))
    proc = subprocess.run([sys.executable, "-m", "subunit.run", *tests], cwd=work,
                          capture_output=True, timeout=900,
                          env={"TEMPEST_CONFIG_DIR": str(work), "PATH": "/usr/bin:/bin",
                               "HOME": str(work)})
    results: dict[str, str] = {}
    details: dict[str, str] = {}

    def on_test(test):
        results[test["id"].split("[")[0]] = test["status"]
        details[test["id"].split("[")[0]] = "".join(
            v.as_text() for v in test["details"].values())[-3000:]

    case = subunit.ByteStreamToStreamResult(__import__("io").BytesIO(proc.stdout))
    result = testtools.StreamToDict(on_test)
    result.startTestRun()
    case.run(result)
    result.stopTestRun()
    failed = {t: details[t] for t, s in results.items() if s != "success"}
    assert not failed, "\n\n".join(f"{t}: {results[t]}\n{d}" for t, d in failed.items())
    return results


@pytest.mark.skipif(not LIFECYCLE, reason="needs Cluster.delete (Tempest's cleanup "
                                          "deletes every server it made)")
def test_tempest_compute(api):
    results = run_tempest(api, TESTS)
    assert sorted(results) == sorted(TESTS)
