"""The Driver contract: one abstract suite, subclassed once per driver.

A subclass says how to make a host (`make_driver(host, storage)`: two hosts with the
same `storage` key share instance storage), how to reach a destination's disks
(`make_sink`), how a copy to a destination breaks off half-way (`partial_copy`), and how
to look at a domain and at the storage without going through the driver under test
(`domain`, `boot_id`, `dirs`). Everything else is the contract: spawn, power off and on,
reboot, delete (also in the middle of a resize, on either end), disk info, the
shared-storage probe, and every resize path (two hosts, shared storage, same host;
confirm and revert), with every step run twice to show it converges.
"""
from __future__ import annotations

import asyncio
import functools
import os
import sys
from dataclasses import dataclass

import pytest

from vmresize.drivers.base import (DiskError, InstanceNotFound, InstanceNotRunning,
                                   InstanceSpec)
from vmresize.drivers.fake import FakeDriver, FakeStorage
from vmresize.events.schema import RUNNING, Flavor, Resources

sys.path.insert(0, os.path.dirname(__file__))

UUID = "6f1c2b3a-1d2e-4f50-8a6b-7c8d9e0f1a2b"
OLD = Flavor("m1.tiny", vcpus=1, memory_mb=512, root_gb=1, ephemeral_gb=1, swap_mb=256)
NEW = Flavor("m1.small", vcpus=2, memory_mb=1024, root_gb=2, ephemeral_gb=2, swap_mb=1536)
CAPACITY = Resources(vcpus=16, memory_mb=32768, disk_gb=500)


@dataclass(frozen=True)
class DomainView:
    vcpus: int
    memory_mb: int
    running: bool


def sync(test):
    """Run an async test body on a fresh event loop (pytest-asyncio is not a dependency)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def spec(flavor: Flavor) -> InstanceSpec:
    return InstanceSpec(uuid=UUID, name="vm-1", flavor=flavor)


async def twice(times: int, call, *args):
    """Call a step `times` times: a repeat must converge to the same end state."""
    result = None
    for _ in range(times):
        result = await call(*args)
    return result


def sizes(disks) -> dict[str, int]:
    return {d.name: d.virtual_gb for d in disks}


OLD_SIZES = {"disk": 1, "disk.local": 1, "disk.swap": 1}
NEW_SIZES = {"disk": 2, "disk.local": 2, "disk.swap": 2}


class DriverContract:
    """The contract. Subclasses implement the four hooks below."""

    def make_driver(self, host: str, storage: str):
        raise NotImplementedError

    def make_sink(self, dest):
        raise NotImplementedError

    def domain(self, driver, uuid: str) -> DomainView | None:
        raise NotImplementedError

    def boot_id(self, driver, uuid: str):
        """Something of the domain that changes every time it is started."""
        raise NotImplementedError

    def dirs(self, driver) -> set[str]:
        """What instances left on the driver's storage (`<uuid>`, `<uuid>_resize`, any
        other file) besides what all instances share (the image cache)."""
        raise NotImplementedError

    async def partial_copy(self, src, dst) -> None:
        """Run `src.migrate_disk_and_power_off` to `dst` with a link that breaks after
        part of the disks arrived, leaving them on `dst`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    async def resize(self, src, dst, *, times: int = 1, power_on: bool = True) -> bool:
        """Probe, migrate and finish; returns whether storage was found shared."""
        probe = "probe-contract"
        await dst.create_probe(probe)
        shared = await src.probe_exists(probe)
        await dst.remove_probe(probe)
        sink = None if shared else self.make_sink(dst)
        disks = await twice(times, src.migrate_disk_and_power_off, spec(OLD), NEW, shared, sink)
        await twice(times, dst.finish_migration, spec(NEW), disks, shared, power_on)
        return shared

    async def assert_old_instance(self, driver, running: bool = True) -> None:
        assert self.dirs(driver) == {UUID}
        assert self.domain(driver, UUID) == DomainView(1, 512, running)
        assert sizes(await driver.disk_info(UUID)) == OLD_SIZES

    async def assert_new_instance(self, driver, running: bool = True) -> None:
        assert UUID in self.dirs(driver)
        assert self.domain(driver, UUID) == DomainView(2, 1024, running)
        assert sizes(await driver.disk_info(UUID)) == NEW_SIZES

    # ------------------------------------------------------------------ lifecycle

    @sync
    async def test_spawn_is_idempotent(self):
        a = self.make_driver("a", "s1")
        first = await a.spawn(spec(OLD), True)
        again = await a.spawn(spec(OLD), True)
        assert sizes(first) == sizes(again) == OLD_SIZES
        await self.assert_old_instance(a)

    @sync
    async def test_unknown_instance(self):
        a = self.make_driver("a", "s1")
        for call in (a.power_on(UUID), a.power_off(UUID), a.reboot(UUID, False),
                     a.disk_info(UUID)):
            with pytest.raises(InstanceNotFound):
                await call

    @sync
    async def test_disk_info_follows_flavor(self):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        disks = await a.disk_info(UUID)
        assert [d.name for d in disks] == ["disk", "disk.local", "disk.swap"]
        assert sizes(disks) == OLD_SIZES

    # ------------------------------------------------------------------ power and reboot

    @sync
    async def test_power_off_and_on(self):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), False)
        await self.assert_old_instance(a, running=False)
        await twice(2, a.power_on, UUID)
        await self.assert_old_instance(a, running=True)
        first_boot = self.boot_id(a, UUID)
        await twice(2, a.power_off, UUID)
        await self.assert_old_instance(a, running=False)   # still defined, same disks
        await a.power_on(UUID)
        await self.assert_old_instance(a, running=True)
        assert self.boot_id(a, UUID) != first_boot, "booted again"

    @sync
    async def test_power_off_without_waiting(self):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        await twice(2, a.power_off, UUID, 0)         # forced off at once
        await self.assert_old_instance(a, running=False)

    @pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
    @sync
    async def test_reboot_boots_the_same_instance_again(self, hard):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        boots = [self.boot_id(a, UUID)]
        for _ in range(2):                           # a repeat reboots again
            await a.reboot(UUID, hard)
            boots.append(self.boot_id(a, UUID))
            await self.assert_old_instance(a, running=True)
        assert len(set(boots)) == 3, f"three boots, saw {boots}"

    @pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
    @sync
    async def test_reboot_of_a_stopped_instance_is_refused(self, hard):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        await a.power_off(UUID)
        for _ in range(2):
            with pytest.raises(InstanceNotRunning, match="not running"):
                await a.reboot(UUID, hard)
        await self.assert_old_instance(a, running=False)   # never started by surprise

    # ------------------------------------------------------------------ delete

    @pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
    @sync
    async def test_destroy_removes_everything(self, running):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), running)
        await twice(2, a.destroy, UUID)
        self.assert_gone(a)
        with pytest.raises(InstanceNotFound):
            await a.disk_info(UUID)

    @sync
    async def test_destroy_of_an_unknown_instance_does_nothing(self):
        a = self.make_driver("a", "s1")
        await twice(2, a.destroy, UUID)
        self.assert_gone(a)

    @sync
    async def test_destroy_after_a_resize_removes_the_resize_dir(self):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        await self.resize(a, b)                      # leaves a `_resize` dir on a
        await twice(2, a.destroy, UUID)
        self.assert_gone(a)
        await self.assert_new_instance(b)            # the other host's copy is its own
        await twice(2, b.destroy, UUID)
        self.assert_gone(b)

    @sync
    async def test_destroy_on_the_source_mid_migration(self):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        await a.migrate_disk_and_power_off(spec(OLD), NEW, False, self.make_sink(b))
        await twice(2, a.destroy, UUID)
        self.assert_gone(a)
        await twice(2, b.destroy, UUID)              # whatever reached the destination
        self.assert_gone(b)

    @sync
    async def test_destroy_on_the_same_host_mid_migration(self):
        """Shared storage: the new `<uuid>` copy and the `_resize` dir both go."""
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        await a.migrate_disk_and_power_off(spec(OLD), NEW, True, None)
        await twice(2, a.destroy, UUID)
        self.assert_gone(a)

    @sync
    async def test_destroy_on_the_destination_after_a_partial_copy(self):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        await self.partial_copy(a, b)
        assert UUID in self.dirs(b), "part of the disks arrived"
        await twice(2, b.destroy, UUID)
        self.assert_gone(b)
        await a.finish_revert_migration(spec(OLD), True)   # the source is untouched
        await self.assert_old_instance(a)

    @sync
    async def test_destroy_on_the_destination_before_confirm(self):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        await self.resize(a, b)
        await twice(2, b.destroy, UUID)
        self.assert_gone(b)
        await a.finish_revert_migration(spec(OLD), True)
        await self.assert_old_instance(a)

    def assert_gone(self, driver) -> None:
        assert self.dirs(driver) == set(), "no file of the instance is left"
        assert self.domain(driver, UUID) is None, "the domain is undefined"

    # ------------------------------------------------------------------ probe

    @sync
    async def test_probe_sees_shared_storage_only(self):
        a, b, c = (self.make_driver("a", "s1"), self.make_driver("b", "s2"),
                   self.make_driver("c", "s1"))
        await twice(2, b.create_probe, "p1")
        assert not await a.probe_exists("p1")
        await c.create_probe("p2")
        assert await a.probe_exists("p2")
        await twice(2, c.remove_probe, "p2")
        assert not await a.probe_exists("p2")

    # ------------------------------------------------------------------ resize between hosts

    @pytest.mark.parametrize("times", [1, 2])
    @sync
    async def test_resize_then_confirm(self, times):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await twice(times, a.spawn, spec(OLD), True)
        assert not await self.resize(a, b, times=times)
        await self.assert_new_instance(b)
        assert self.domain(a, UUID) == DomainView(1, 512, False), "source kept, stopped"
        assert self.dirs(a) == {UUID + "_resize"}
        assert sizes(await a.disk_info(UUID)) == OLD_SIZES, "the kept copy is untouched"
        await twice(times, a.confirm_migration, UUID, False)
        assert self.dirs(a) == set() and self.domain(a, UUID) is None
        await self.assert_new_instance(b)

    @pytest.mark.parametrize("times", [1, 2])
    @sync
    async def test_resize_then_revert(self, times):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        await self.resize(a, b, times=times)
        await twice(times, b.revert_migration_dest, UUID, False)
        assert self.dirs(b) == set() and self.domain(b, UUID) is None
        await twice(times, a.finish_revert_migration, spec(OLD), True)
        await self.assert_old_instance(a)

    @pytest.mark.parametrize("times", [1, 2])
    @sync
    async def test_shared_storage_between_hosts(self, times):
        a, c = self.make_driver("a", "s1"), self.make_driver("c", "s1")
        await a.spawn(spec(OLD), True)
        assert await self.resize(a, c, times=times)
        await self.assert_new_instance(c)
        await twice(times, c.revert_migration_dest, UUID, True)
        assert self.domain(c, UUID) is None
        await twice(times, a.finish_revert_migration, spec(OLD), True)
        await self.assert_old_instance(a)
        await self.resize(a, c)
        await twice(times, a.confirm_migration, UUID, True)
        assert self.dirs(a) == {UUID} and self.domain(a, UUID) is None
        await self.assert_new_instance(c)

    @pytest.mark.parametrize("same_host", [False, True], ids=["two-hosts", "same-host"])
    @sync
    async def test_revert_when_finish_never_ran(self, same_host):
        """A failed finish is compensated by the same revert steps; the destination must
        not take the source's (marked) domain with it."""
        a = self.make_driver("a", "s1")
        b = a if same_host else self.make_driver("b", "s2")
        await a.spawn(spec(OLD), True)
        sink = None if same_host else self.make_sink(b)
        await a.migrate_disk_and_power_off(spec(OLD), NEW, same_host, sink)
        await twice(2, b.revert_migration_dest, UUID, same_host)
        if not same_host:
            assert self.dirs(b) == set() and self.domain(b, UUID) is None
        await twice(2, a.finish_revert_migration, spec(OLD), True)
        await self.assert_old_instance(a)

    # ------------------------------------------------------------------ same host

    @pytest.mark.parametrize("times", [1, 2])
    @sync
    async def test_same_host_confirm(self, times):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        assert await self.resize(a, a, times=times)
        await self.assert_new_instance(a)
        await twice(times, a.confirm_migration, UUID, True)
        assert self.dirs(a) == {UUID}
        await self.assert_new_instance(a)            # the new domain, not undefined

    @pytest.mark.parametrize("times", [1, 2])
    @sync
    async def test_same_host_revert(self, times):
        a = self.make_driver("a", "s1")
        await a.spawn(spec(OLD), True)
        await self.resize(a, a, times=times)
        await twice(times, a.revert_migration_dest, UUID, True)
        await twice(times, a.finish_revert_migration, spec(OLD), True)
        await self.assert_old_instance(a)

    # ------------------------------------------------------------------ power

    @sync
    async def test_stopped_instance_stays_stopped(self):
        a, b = self.make_driver("a", "s1"), self.make_driver("b", "s2")
        await a.spawn(spec(OLD), False)
        await self.resize(a, b, power_on=False)
        await self.assert_new_instance(b, running=False)
        await b.revert_migration_dest(UUID, False)
        await a.finish_revert_migration(spec(OLD), False)
        await self.assert_old_instance(a, running=False)
        await self.resize(a, b, power_on=False)
        await a.confirm_migration(UUID, False)
        await self.assert_new_instance(b, running=False)


# --------------------------------------------------------------------------- FakeDriver

class TestFakeDriver(DriverContract):
    @pytest.fixture(autouse=True)
    def _pools(self):
        self.pools: dict[str, FakeStorage] = {}

    def make_driver(self, host, storage):
        pool = self.pools.setdefault(storage, FakeStorage())
        return FakeDriver(host, CAPACITY, storage=pool)

    def make_sink(self, dest):
        return None                                  # the fake moves nothing

    def domain(self, driver, uuid):
        dom = driver.domains.get(uuid)
        if dom is None:
            return None
        return DomainView(dom.flavor.vcpus, dom.flavor.memory_mb, dom.power_state == RUNNING)

    def boot_id(self, driver, uuid):
        return driver.domains[uuid].boots

    def dirs(self, driver):
        return set(driver.storage.dirs)

    async def partial_copy(self, src, dst):
        # The fake sends no bytes; what a broken copy leaves is planted by hand.
        await src.migrate_disk_and_power_off(spec(OLD), NEW, False, None)
        dst.storage.dirs[UUID] = {"disk": OLD.root_gb}


# --------------------------------------------------------------------------- LibvirtDriver

try:
    from vmresize.drivers.libvirt_driver import LibvirtDriver, parse_domain_xml
except ImportError:                                  # libvirt-python not installed
    LibvirtDriver = None
from vmresize.drivers.transport import FileReceiver, PeerSink  # noqa: E402
import qemu_guest  # noqa: E402

needs_libvirt = pytest.mark.skipif(LibvirtDriver is None,
                                   reason="libvirt-python is not installed")

NODE_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>16</cores><threads>1</threads>
    <active>16</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>33554432</memory>
</node>
"""


class LinkDown(Exception):
    pass


class BreakAfter:
    """A destination whose link breaks once `files` whole files arrived, at the next
    file's first chunk (or its commit, if it has none)."""

    def __init__(self, receiver: FileReceiver, files: int) -> None:
        self.receiver, self.files_left = receiver, files

    async def begin(self, *args):
        return await self.receiver.begin(*args)

    async def put(self, *args):
        self._check_link()
        await self.receiver.put(*args)

    async def commit(self, *args):
        self._check_link()
        await self.receiver.commit(*args)
        self.files_left -= 1

    def _check_link(self) -> None:
        if self.files_left == 0:
            raise LinkDown("connection reset")


@needs_libvirt
@pytest.mark.libvirt
class TestLibvirtDriver(DriverContract):
    """libvirt's test:/// driver (a private node per connection: one per host) for the
    domains, real files and real qemu-img for the disks."""

    use_cow_images = True

    @pytest.fixture(autouse=True)
    def _node(self, tmp_path):
        node = tmp_path / "node.xml"
        node.write_text(NODE_XML)
        self.tmp_path, self.uri = tmp_path, f"test://{node}"
        self.image = qemu_guest.write_boot_image(str(tmp_path / "boot.img"))
        self.drivers: list[LibvirtDriver] = []
        yield
        for driver in self.drivers:
            driver.close()

    def make_driver(self, host, storage):
        driver = LibvirtDriver(host, self.uri, str(self.tmp_path / storage), CAPACITY,
                               image=self.image, use_cow_images=self.use_cow_images)
        self.drivers.append(driver)
        return driver

    def make_sink(self, dest):
        return PeerSink(FileReceiver(dest.instances_path))

    def domain(self, driver, uuid):
        described = driver.describe_domain(uuid)
        if described is None:
            return None
        facts = parse_domain_xml(described[0])
        return DomainView(facts.vcpus, facts.memory_mb, described[1])

    def boot_id(self, driver, uuid):
        return driver._domain(uuid).ID()            # a new one at every start

    def dirs(self, driver):
        return {name for name in os.listdir(driver.instances_path) if name != "_base"}

    async def partial_copy(self, src, dst):
        sink = PeerSink(BreakAfter(FileReceiver(dst.instances_path), files=1))
        with pytest.raises(DiskError, match="LinkDown"):
            await src.migrate_disk_and_power_off(spec(OLD), NEW, False, sink)
        copied = set(os.listdir(os.path.join(dst.instances_path, UUID)))
        assert {"disk", "disk.local.part"} <= copied and "disk.local" not in copied, copied


@needs_libvirt
@pytest.mark.libvirt
class TestLibvirtDriverRawImages(TestLibvirtDriver):
    """use_cow_images=False: raw disks, no backing files, nothing to flatten."""

    use_cow_images = False
