"""A real QEMU guest resized between two "hosts" through qemu:///session, then stopped,
started, rebooted (hard, then soft) and deleted.

Two LibvirtDriver instances (instances paths a/ and b/) share one session libvirtd, as two
hosts sharing one hypervisor daemon would; disks go from a to b through a FileReceiver
sink. Where a uuid can be defined only once, the destination's definition replaces the
source's stopped, `resize-source`-marked one (see drivers/libvirt_driver.py).

The scenario runs as uid 1000 in its own user/mount/PID namespaces (tests/qemu_guest.py);
PID 1 there reaps and, on exit, takes libvirtd, virtlogd and QEMU with it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import qemu_guest  # noqa: E402

pytestmark = pytest.mark.qemu

OLD_SECTORS, NEW_SECTORS = (1 << 30) // 512, (2 << 30) // 512


def _missing() -> str | None:
    for tool in ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (apt: qemu-system-x86 qemu-utils libvirt-daemon)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed"
    return qemu_guest.unshare_available()


@pytest.fixture(scope="module")
def scenario():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    # Short paths: libvirt's unix sockets live under XDG_RUNTIME_DIR (108-byte limit).
    root = tempfile.mkdtemp(prefix="vmr-qemu-")
    try:
        for sub in ("home", "run", "work"):
            os.mkdir(os.path.join(root, sub))
        done = qemu_guest.run_in_user_namespace(
            [sys.executable, qemu_guest.__file__, "scenario", os.path.join(root, "work")],
            home=os.path.join(root, "home"), runtime_dir=os.path.join(root, "run"))
        assert done.returncode == 0, f"scenario failed:\n{done.stderr[-4000:]}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        yield result, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _step(scenario, name: str, nth: int = 0) -> dict:
    return [s for s in scenario[0]["steps"] if s["step"] == name][nth]


def test_guest_boots_on_source(scenario):
    spawned = _step(scenario, "spawned")
    assert spawned["sectors"] == OLD_SECTORS
    assert spawned["domain"]["running"] and spawned["domain"]["vcpus"] == 1
    assert spawned["disk"]["backing_file"], "a copy-on-write overlay on the cached base"


def test_resize_grows_disk_and_domain(scenario):
    migrated, finished = _step(scenario, "migrated"), _step(scenario, "finished")
    assert not migrated["shared"] and migrated["resize_dir"]
    assert migrated["bytes_sent"] > 0
    assert not migrated["source_domain"]["running"]
    assert finished["disk"]["virtual_size"] == 2 << 30
    assert finished["disk"]["backing_file"] == "", "flattened before leaving the source"
    assert (finished["domain"]["vcpus"], finished["domain"]["memory_mb"]) == (2, 96)
    assert finished["domain"]["running"]
    assert finished["sectors"] == NEW_SECTORS, "the guest sees the grown disk"


def test_revert_restores_old_disk_and_domain(scenario):
    # The test wrote a marker into the console before the power-on: only output after it
    # (or in a file QEMU truncated on start) counts, so this is the reverted guest's line.
    reverted = _step(scenario, "reverted")
    assert reverted["disk"]["virtual_size"] == 1 << 30
    assert (reverted["domain"]["vcpus"], reverted["domain"]["memory_mb"]) == (1, 64)
    assert reverted["domain"]["running"] and reverted["domain"]["owner"] == "host-a"
    assert reverted["sectors"] == OLD_SECTORS
    assert not reverted["dest_dir"] and not reverted["resize_dir"]


def test_confirm_leaves_no_resize_dir(scenario):
    confirmed = _step(scenario, "confirmed")
    assert not confirmed["resize_dir"] and not confirmed["source_dir"]
    assert confirmed["domain"]["running"] and confirmed["domain"]["vcpus"] == 2
    assert _step(scenario, "finished", 1)["sectors"] == NEW_SECTORS


def test_stop_forces_off_a_guest_that_ignores_acpi(scenario):
    stopped = _step(scenario, "stopped")
    assert stopped["before"]["running"]
    assert not stopped["after"]["running"] and not stopped["domain"]["running"]
    # libvirt says why it stopped: destroyed (the fallback), not shut down by the guest.
    assert stopped["after"]["stop_reason"] == "destroyed"
    assert stopped["domain"]["vcpus"] == 2, "still defined, with the resized flavor"


def test_start_boots_the_same_disk_again(scenario):
    finished, started = _step(scenario, "finished", 1), _step(scenario, "started")
    assert started["power"]["running"] and started["domain"]["running"]
    assert started["domain"]["disks"] == finished["domain"]["disks"]
    assert started["disk"] == finished["disk"], "the same image, untouched"
    assert started["sectors"] == NEW_SECTORS, "the guest printed again after the start"


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_reboot_boots_the_guest_again(scenario, hard):
    rebooted = [s for s in scenario[0]["steps"]
                if s["step"] == "rebooted" and s["hard"] is hard][0]
    assert rebooted["before"]["running"] and rebooted["after"]["running"]
    assert rebooted["after"]["id"] != rebooted["before"]["id"], "a new QEMU run"
    assert rebooted["sectors"] == NEW_SECTORS, "the guest printed again after the reboot"
    assert rebooted["domain"]["running"] and rebooted["domain"]["vcpus"] == 2


def test_delete_leaves_nothing_of_the_instance(scenario):
    deleted = _step(scenario, "deleted")
    assert deleted["domains"] == []
    # Only the image cache, shared by every instance of the host, stays.
    assert deleted["left"] == {"host-a": ["_base"], "host-b": []}


def test_nothing_left_running(scenario):
    result, root = scenario
    assert result["wall_s"] < 60
    # Every process the scenario started had the scenario's folder in its command line or
    # environment (QEMU's disk paths, the daemons' XDG_RUNTIME_DIR): none may remain.
    leftover = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue                    # gone meanwhile, or not ours to read
        if root.encode() in cmdline or root.encode() in environ:
            leftover.append((pid, cmdline.replace(b"\0", b" ")[:120]))
    assert not leftover, f"still running after the scenario: {leftover}"
