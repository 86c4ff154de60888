"""LibvirtDriver specifics: its domain XML, its qemu-img work and its errors.

Domains on libvirt's test:/// driver (a private node per host), disks as real files
with real qemu-img, disks between hosts through a FileReceiver in process.
"""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmresize.drivers import qemu_img  # noqa: E402
from vmresize.drivers.base import (DiskError, DriverError, DriverTimeout,  # noqa: E402
                                   InstanceNotRunning, InstanceSpec)
from vmresize.drivers.libvirt_driver import (NS, LibvirtDriver, build_domain_xml,  # noqa: E402
                                             parse_domain_xml, undefine_flags)
from vmresize.drivers.transport import FileReceiver, PeerSink  # noqa: E402
from vmresize.events.schema import Flavor, Resources  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import qemu_guest  # noqa: E402
from test_driver_contract import NODE_XML  # noqa: E402

pytestmark = pytest.mark.libvirt

GiB = 1 << 30
UUID = "9a8b7c6d-5e4f-4321-8a0b-1c2d3e4f5a6b"
OLD = Flavor("m1.tiny", vcpus=1, memory_mb=512, root_gb=1, ephemeral_gb=1)
NEW = Flavor("m1.small", vcpus=4, memory_mb=2048, root_gb=3, ephemeral_gb=2)
CAP = Resources(16, 32768, 500)


def spec(flavor: Flavor, image: str = "") -> InstanceSpec:
    return InstanceSpec(uuid=UUID, name="vm-1", flavor=flavor, image=image)


@pytest.fixture
def env(tmp_path):
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    image = qemu_guest.write_boot_image(str(tmp_path / "boot.img"))
    made: list[LibvirtDriver] = []

    def driver(host: str, storage: str, **kwargs) -> LibvirtDriver:
        kwargs.setdefault("image", image)
        d = LibvirtDriver(host, f"test://{node}", str(tmp_path / storage), CAP, **kwargs)
        made.append(d)
        return d

    yield driver
    for d in made:
        d.close()


def run(coro):
    return asyncio.run(coro)


async def resize(src, dst, shared=False, sink=None):
    sink = sink or PeerSink(FileReceiver(dst.instances_path))
    disks = await src.migrate_disk_and_power_off(spec(OLD), NEW, shared, sink)
    await dst.finish_migration(spec(NEW), disks, shared, True)
    return disks


def test_domain_xml_has_flavor_and_disk_paths(env):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    xml, running = a.describe_domain(UUID)
    root = ET.fromstring(xml)
    inst = os.path.join(a.instances_path, UUID)
    assert running and root.get("type") == "qemu"
    assert root.findtext("uuid") == UUID and root.findtext("vcpu") == "1"
    assert parse_domain_xml(xml).memory_mb == 512
    disks = {d.find("target").get("dev"): (d.find("source").get("file"),
                                           d.find("target").get("bus"))
             for d in root.findall("./devices/disk")}
    assert disks == {"hda": (f"{inst}/disk", "ide"), "hdb": (f"{inst}/disk.local", "ide")}
    serial = root.find("./devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == f"{inst}/console.log"
    meta = root.find(f"./metadata/{{{NS}}}instance")
    assert (meta.get("owner"), meta.get("role")) == ("a", "active")


def test_xml_round_trip():
    xml = build_domain_xml(spec(NEW), NEW, "/i/u", [("disk", "qcow2"), ("disk.swap", "raw")],
                           domain_type="kvm", owner="h", role="resize-source")
    facts = parse_domain_xml(xml)
    assert (facts.vcpus, facts.memory_mb, facts.flavor) == (4, 2048, NEW)
    assert facts.disk_paths == ("/i/u/disk", "/i/u/disk.swap")
    assert (facts.owner, facts.role) == ("h", "resize-source")
    assert ET.fromstring(xml).get("type") == "kvm"


def test_spawn_makes_overlay_on_cached_base(env):
    a = env("a", "s1")
    disks = run(a.spawn(spec(OLD), True))
    root = {d.name: d for d in disks}["disk"]
    assert root.format == "qcow2" and root.virtual_gb == 1
    assert os.path.dirname(root.backing_file) == os.path.join(a.instances_path, "_base")


def test_disk_is_flattened_before_leaving_the_host(env, tmp_path):
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(OLD), True))
    src_disk = os.path.join(a.instances_path, UUID, "disk")
    assert qemu_img.info(src_disk).backing_file
    run(resize(a, b))
    dst_disk = os.path.join(b.instances_path, UUID, "disk")
    info = qemu_img.info(dst_disk)
    assert info.backing_file == "" and info.format == "qcow2"
    # The guest sees the same bytes (the boot sector) through the flattened copy.
    qemu_img.convert(dst_disk, str(tmp_path / "seen.raw"), "raw")
    with open(tmp_path / "seen.raw", "rb") as f:
        assert f.read(512) == qemu_guest.boot_sector()
    leftovers = os.listdir(os.path.join(a.instances_path, UUID + "_resize"))
    assert not [n for n in leftovers if n.endswith("_rbase")], "flattened copy removed"


def test_disks_grow_to_new_flavor(env):
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(OLD), True))
    run(resize(a, b))
    inst = os.path.join(b.instances_path, UUID)
    assert qemu_img.info(f"{inst}/disk").virtual_size == 3 * GiB
    assert qemu_img.info(f"{inst}/disk.local").virtual_size == 2 * GiB
    facts = parse_domain_xml(b.describe_domain(UUID)[0])
    assert (facts.vcpus, facts.memory_mb) == (4, 2048)


def test_a_shrink_that_reaches_the_driver_loses_no_data(env):
    """The protocol refuses a shrink before the driver; should one get through, the
    disks keep their size (qemu-img only grows) and the dropped ephemeral disk stays
    attached."""
    smaller = Flavor("m1.less", vcpus=1, memory_mb=256, root_gb=1, ephemeral_gb=0)
    bigger = Flavor("m1.more", vcpus=1, memory_mb=256, root_gb=2, ephemeral_gb=2)
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(bigger), True))
    sink = PeerSink(FileReceiver(b.instances_path))
    disks = run(a.migrate_disk_and_power_off(spec(bigger), smaller, False, sink))
    run(b.finish_migration(spec(smaller), disks, False, True))
    inst = os.path.join(b.instances_path, UUID)
    assert qemu_img.info(f"{inst}/disk").virtual_size == 2 * GiB
    assert qemu_img.info(f"{inst}/disk.local").virtual_size == 2 * GiB
    assert parse_domain_xml(b.describe_domain(UUID)[0]).disk_paths == (
        f"{inst}/disk", f"{inst}/disk.local")


def test_raw_disks_become_qcow2_on_a_cow_host(env):
    """Nova's finish_migration: a raw disk goes back to qcow2 when use_cow_images."""
    a, b = env("a", "s1", use_cow_images=False), env("b", "s2", use_cow_images=True)
    run(a.spawn(spec(OLD), True))
    assert qemu_img.info(os.path.join(a.instances_path, UUID, "disk")).format == "raw"
    run(resize(a, b))
    disks = {d.name: d for d in run(b.disk_info(UUID))}
    assert disks["disk"].format == disks["disk.local"].format == "qcow2"
    assert disks["disk"].virtual_gb == 3
    root = ET.fromstring(b.describe_domain(UUID)[0])
    assert {d.find("driver").get("type") for d in root.findall("./devices/disk")} == {"qcow2"}


def test_shared_storage_copies_into_a_new_dir(env):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    sink = PeerSink(FileReceiver("/nonexistent"))
    disks = run(a.migrate_disk_and_power_off(spec(OLD), NEW, True, sink))
    assert sink.sent == {}, "no bytes through the sink on shared storage"
    assert {d.name for d in disks} == {"disk", "disk.local"}
    assert qemu_img.info(os.path.join(a.instances_path, UUID, "disk")).backing_file == ""
    assert qemu_img.info(os.path.join(a.instances_path, UUID + "_resize", "disk")).backing_file


def test_missing_base_image_is_a_disk_error(env, tmp_path):
    a = env("a", "s1")
    with pytest.raises(DiskError, match=r"base image .*/nowhere\.img not found"):
        run(a.spawn(spec(OLD, image=str(tmp_path / "nowhere.img")), True))
    assert a.describe_domain(UUID) is None


def test_corrupt_base_image_carries_qemu_img_stderr(env, tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 508)       # qcow2 magic, nonsense header
    a = env("a", "s1")
    with pytest.raises(DiskError, match=r"qemu-img info failed .*bad\.qcow2"):
        run(a.spawn(spec(OLD, image=str(bad)), True))


def test_lost_backing_file_fails_the_flatten_with_stderr(env):
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(OLD), True))
    base_dir = os.path.join(a.instances_path, "_base")
    for name in os.listdir(base_dir):
        os.unlink(os.path.join(base_dir, name))
    with pytest.raises(DiskError, match=r"qemu-img convert failed .*No such file"):
        run(resize(a, b))


def test_qemu_img_failure_carries_stderr(tmp_path):
    with pytest.raises(DiskError, match=r"qemu-img info failed \(exit 1\): .*Could not open"):
        qemu_img.info(str(tmp_path / "missing.qcow2"))


def test_qemu_img_timeout(tmp_path, monkeypatch):
    slow = tmp_path / "slow-qemu-img"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(slow))
    with pytest.raises(DriverTimeout, match="longer than 0.2 s"):
        qemu_img.info("x", timeout_s=0.2)


def test_finish_refuses_disks_that_never_arrived(env):
    a, b = env("a", "s1"), env("b", "s2")
    disks = run(a.spawn(spec(OLD), True))
    with pytest.raises(DiskError, match="never arrived"):
        run(b.finish_migration(spec(NEW), disks, False, True))
    assert b.describe_domain(UUID) is None


def test_unreachable_libvirt_is_a_driver_error(tmp_path):
    d = LibvirtDriver("x", f"test://{tmp_path}/no-such-node.xml", str(tmp_path / "i"), CAP)
    with pytest.raises(DriverError, match="libvirt"):
        run(d.power_on(UUID))


def test_reconnects_after_the_connection_closed(env):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    a._connection.close()                            # as if libvirtd had gone away
    # test:/// gives a fresh node per open: the domain is gone there, the disks are not.
    assert run(a.spawn(spec(OLD), True))
    assert a.describe_domain(UUID)[1]


# --------------------------------------------------------------------------- crash points

class LinkDown(Exception):
    pass


class DropAfter:
    """A sink whose link dies after `puts` chunks."""

    def __init__(self, root: str, puts: int) -> None:
        self.receiver, self.left = FileReceiver(root), puts

    async def begin(self, *args):
        return await self.receiver.begin(*args)

    async def put(self, *args):
        if self.left == 0:
            raise LinkDown("connection reset")
        self.left -= 1
        await self.receiver.put(*args)

    async def commit(self, *args):
        await self.receiver.commit(*args)


def test_migrate_again_after_a_broken_transfer_resumes(env):
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(OLD), True))
    run(a.power_off(UUID))
    # Give the root disk data to move: 3 MiB written into the overlay by qemu-io.
    src_disk = os.path.join(a.instances_path, UUID, "disk")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", src_disk],
                   check=True, capture_output=True, timeout=30)
    chunk = 256 << 10
    with pytest.raises(DiskError, match="LinkDown"):
        run(a.migrate_disk_and_power_off(spec(OLD), NEW, False,
                                         PeerSink(DropAfter(b.instances_path, 5), chunk)))
    assert os.path.isdir(os.path.join(a.instances_path, UUID + "_resize"))
    assert not os.path.exists(os.path.join(b.instances_path, UUID, "disk"))
    sink = PeerSink(FileReceiver(b.instances_path), chunk)
    disks = run(a.migrate_disk_and_power_off(spec(OLD), NEW, False, sink))
    sent = sink.sent[f"{UUID}/disk"]
    assert sent.resumed_from > 4 * chunk and sent.bytes_sent < sent.allocated_bytes, "resumed"
    run(b.finish_migration(spec(NEW), disks, False, True))
    assert parse_domain_xml(b.describe_domain(UUID)[0]).vcpus == 4
    assert sorted(os.listdir(os.path.join(b.instances_path, UUID))) == ["disk", "disk.local"]
    kept = os.path.join(a.instances_path, UUID + "_resize", "disk")
    compare = subprocess.run(["qemu-img", "compare", "-U", kept,
                              os.path.join(b.instances_path, UUID, "disk")],
                             capture_output=True, text=True, timeout=30)
    # Same guest-visible bytes; the grown tail of the copy reads as zeros.
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_migrate_after_crash_following_the_rename(env):
    a, b = env("a", "s1"), env("b", "s2")
    run(a.spawn(spec(OLD), True))
    a._power_off_for_resize(spec(OLD))               # the first call got this far
    inst = os.path.join(a.instances_path, UUID)
    os.rename(inst, inst + "_resize")
    run(resize(a, b))
    assert parse_domain_xml(b.describe_domain(UUID)[0]).vcpus == 4


def test_shared_migrate_after_a_partial_local_copy(env):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    a._power_off_for_resize(spec(OLD))
    inst = os.path.join(a.instances_path, UUID)
    os.rename(inst, inst + "_resize")
    os.mkdir(inst)
    with open(os.path.join(inst, "disk.local.part"), "wb") as f:
        f.write(b"half a copy")                      # the crash hit mid-copy
    disks = run(a.migrate_disk_and_power_off(spec(OLD), NEW, True, None))
    run(a.finish_migration(spec(NEW), disks, True, True))
    assert qemu_img.info(os.path.join(inst, "disk.local")).virtual_size == 2 * GiB
    run(a.confirm_migration(UUID, True))
    assert parse_domain_xml(a.describe_domain(UUID)[0]).vcpus == 4


# --------------------------------------------------------------------------- lifecycle

def test_reboot_again_after_a_crash_while_the_guest_was_off(env):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    assert a._begin_reboot(UUID)                     # the first call got this far,
    a._domain(UUID).shutdown()                       # and the guest had stopped
    run(a.reboot(UUID, hard=False))
    assert a.describe_domain(UUID)[1], "the repeated reboot started it again"
    assert not parse_domain_xml(a.describe_domain(UUID)[0]).rebooting


@pytest.mark.parametrize("then", ["power_off", "power_on"])
def test_power_off_or_on_ends_an_unfinished_reboot(env, then):
    """A stop after a reboot that never finished must not leave a mark that lets a
    later reboot start the stopped instance."""
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    a._begin_reboot(UUID)
    a._domain(UUID).shutdown()
    if then == "power_on":
        run(a.power_on(UUID))
    run(a.power_off(UUID))
    with pytest.raises(InstanceNotRunning):
        run(a.reboot(UUID, hard=True))
    assert not a.describe_domain(UUID)[1]


@pytest.mark.parametrize("leftover", ["snapshot", "managed-save"])
def test_destroy_undefines_a_domain_with_a_snapshot_or_a_saved_state(env, leftover):
    a = env("a", "s1")
    run(a.spawn(spec(OLD), True))
    dom = a._domain(UUID)
    if leftover == "snapshot":
        dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    else:
        dom.managedSave(0)
        assert dom.hasManagedSaveImage(0)
    run(a.destroy(UUID))
    assert a.describe_domain(UUID) is None
    assert os.listdir(a.instances_path) == ["_base"]


def test_undefine_flags_follow_what_the_domain_has():
    plain = build_domain_xml(spec(OLD), OLD, "/i/u", [("disk", "qcow2")], domain_type="kvm",
                             owner="h", role="active")
    base = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    assert undefine_flags(plain, 0) == base
    uefi = plain.replace("</os>", "<nvram>/var/lib/nvram/u_VARS.fd</nvram></os>")
    assert undefine_flags(uefi, 0) == base | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    assert undefine_flags(plain, 2) == base | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
