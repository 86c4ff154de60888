"""LibvirtDriver: the `Driver` contract on libvirt-python and qemu-img image files.

Disks are files under `instances_path/<uuid>/` (`disk`, `disk.local`, `disk.swap`), base
images are cached in `instances_path/_base/`, and the domain XML is built and read with
ElementTree. The only module that imports libvirt. Blocking libvirt and qemu-img calls
run in threads, each bounded by `timeout_s`.

Which domain is which: every domain we define carries `<vmr:instance owner= role=>` in its
`<metadata>` with the flavor it was built for. migrate_disk_and_power_off marks the
source's domain `role="resize-source"`; confirm undefines only such a domain, and the
destination's revert only a domain that is not one. That is what keeps a same-host resize
(and two "hosts" on one libvirt daemon, where a domain uuid can exist only once: the
destination's definition replaces the source's, which stays marked until then) from
undefining the wrong domain. The same element carries `rebooting="1"` from the start of
a reboot until the domain runs again: a reboot repeated after a crash that left the domain
off starts it, where a reboot of a stopped instance is refused.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from vmresize.drivers import qemu_img
from vmresize.drivers.base import (DiskError, DiskSink, DriverError, DriverTimeout,
                                   InstanceNotFound, InstanceNotRunning, InstanceSpec,
                                   check_timeout)
from vmresize.drivers.transport import copy_sparse
from vmresize.events.schema import DiskInfo, Flavor, Resources, ZERO

GiB = 1 << 30
MiB = 1 << 20
NS = "https://vmresize.invalid/xmlns/instance/1"
ROLE_ACTIVE, ROLE_RESIZE_SOURCE = "active", "resize-source"
DISK_NAMES = ("disk", "disk.local", "disk.swap")
DISK_TARGETS = {"disk": "hda", "disk.local": "hdb", "disk.swap": "hdc"}  # IDE: BIOS boots it
RESIZE_SUFFIX, RBASE_SUFFIX = "_resize", "_rbase"
CONSOLE = "console.log"
BASE_DIR = "_base"
STOP_POLL_S = 0.1            # how often a wait for a guest to stop looks again

ET.register_namespace("vmr", NS)


def _quiet(_ctx, _err) -> None:
    """libvirt prints every error to stderr by default; ours travel in exceptions."""


libvirt.registerErrorHandler(_quiet, None)


# --------------------------------------------------------------------------- domain XML

@dataclass(frozen=True)
class DomainFacts:
    """What we read back from a domain's XML."""
    uuid: str
    vcpus: int
    memory_mb: int
    disk_paths: tuple[str, ...]
    owner: str = ""              # "" when the domain carries no metadata of ours
    role: str = ""
    flavor: Flavor | None = None
    rebooting: bool = False      # a reboot began and has not started the domain again


def domain_name(uuid: str) -> str:
    # Derived from the uuid alone: libvirt replaces a definition only when name and uuid
    # both match, which is what a redefinition with a new flavor needs.
    return f"instance-{uuid}"


def build_domain_xml(spec: InstanceSpec, flavor: Flavor, inst_dir: str,
                     disks: list[tuple[str, str]], *, domain_type: str, owner: str,
                     role: str) -> str:
    """`disks`: (name, format) of the files present in `inst_dir`."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = domain_name(spec.uuid)
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "title").text = spec.name
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{NS}}}instance",
                         owner=owner, role=role)
    ET.SubElement(meta, f"{{{NS}}}flavor", name=flavor.name, vcpus=str(flavor.vcpus),
                  memory_mb=str(flavor.memory_mb), root_gb=str(flavor.root_gb),
                  ephemeral_gb=str(flavor.ephemeral_gb), swap_mb=str(flavor.swap_mb))
    ET.SubElement(dom, "memory", unit="MiB").text = str(flavor.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(flavor.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"  # i440fx: has IDE
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    for tag, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                        ("on_crash", "destroy")):
        ET.SubElement(dom, tag).text = action
    devices = ET.SubElement(dom, "devices")
    for name, fmt in disks:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", file=os.path.join(inst_dir, name))
        ET.SubElement(disk, "target", dev=DISK_TARGETS[name], bus="ide")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=os.path.join(inst_dir, CONSOLE))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def parse_domain_xml(xml: str) -> DomainFacts:
    root = ET.fromstring(xml)
    memory = root.find("memory")
    kib = int(memory.text) * {"KiB": 1, "MiB": 1024, "GiB": 1 << 20}[memory.get("unit", "KiB")]
    paths = tuple(src.get("file") for src in root.findall("./devices/disk/source")
                  if src.get("file"))
    facts = dict(uuid=root.findtext("uuid"), vcpus=int(root.findtext("vcpu")),
                 memory_mb=kib // 1024, disk_paths=paths)
    meta = root.find(f"./metadata/{{{NS}}}instance")
    if meta is None:
        return DomainFacts(**facts)
    fl = meta.find(f"{{{NS}}}flavor")
    flavor = None
    if fl is not None:
        flavor = Flavor(name=fl.get("name"), **{k: int(fl.get(k)) for k in (
            "vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap_mb")})
    return DomainFacts(**facts, owner=meta.get("owner", ""), role=meta.get("role", ""),
                       flavor=flavor, rebooting=meta.get("rebooting") == "1")


def _with_meta(xml: str, **attrs: str | None) -> str:
    """`xml` with these attributes set on our metadata element (None: removed)."""
    root = ET.fromstring(xml)
    meta = root.find(f"./metadata/{{{NS}}}instance")
    if meta is None:
        holder = root.find("metadata")
        if holder is None:
            holder = ET.SubElement(root, "metadata")
        meta = ET.SubElement(holder, f"{{{NS}}}instance")
    for name, value in attrs.items():
        if value is None:
            meta.attrib.pop(name, None)
        else:
            meta.set(name, value)
    return ET.tostring(root, encoding="unicode")


def _local(el: ET.Element) -> ET.Element:
    """`el` with its namespace dropped, as virDomainSetMetadata wants it (it adds its own)."""
    plain = ET.Element(el.tag.rpartition("}")[2], el.attrib)
    plain.extend(_local(child) for child in el)
    return plain


def _disks_for(flavor: Flavor) -> dict[str, int]:
    """Disk name -> size in bytes that `flavor` asks for."""
    disks = {"disk": flavor.root_gb * GiB}
    if flavor.ephemeral_gb > 0:
        disks["disk.local"] = flavor.ephemeral_gb * GiB
    if flavor.swap_mb > 0:
        disks["disk.swap"] = flavor.swap_mb * MiB
    return disks


def undefine_flags(xml: str, checkpoints: int) -> int:
    """What undefining a domain (its inactive `xml`, its number of `checkpoints`) must
    also remove, or libvirt refuses: a managed save image, snapshot and checkpoint
    metadata, UEFI variables. Only the flags that apply: a hypervisor driver may reject
    one it does not support (libvirt's test driver: NVRAM and checkpoints)."""
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
             | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    os_el = ET.fromstring(xml).find("os")
    if os_el is not None and (os_el.find("nvram") is not None
                              or os_el.get("firmware") == "efi"):
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    if checkpoints:
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    return flags


def _checkpoints(dom: libvirt.virDomain) -> int:
    try:
        return len(dom.listAllCheckpoints())
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return 0                    # no checkpoints where there can be none
        raise


def _rmtree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- the driver

class LibvirtDriver:
    """One compute host: domains on `uri`, disks under `instances_path`. `image` is the
    base image for instances whose spec names none (None: a blank root disk)."""

    def __init__(self, name: str, uri: str, instances_path: str, capacity: Resources, *,
                 use_cow_images: bool = True, image: str | None = None,
                 overhead: Resources = ZERO, domain_type: str = "qemu",
                 timeout_s: float = 60.0):
        assert timeout_s > 0
        self.name = name
        self.uri = uri
        self.instances_path = os.path.abspath(instances_path)
        self.use_cow_images = use_cow_images
        self.image = image
        self.domain_type = domain_type
        self.timeout_s = timeout_s
        self._capacity = capacity
        self._overhead = overhead
        self._conn_lock = threading.Lock()
        self._connection: libvirt.virConnect | None = None
        os.makedirs(self.instances_path, exist_ok=True)

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> libvirt.virConnect:
        """One connection per driver, reopened when it was closed or lost. (A test:///
        node file gives a fresh node per open: reopening there loses its domains.)"""
        with self._conn_lock:
            conn = self._connection
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
            self._connection = libvirt.open(self.uri)
            return self._connection

    def close(self) -> None:
        with self._conn_lock:
            if self._connection is not None:
                try:
                    self._connection.close()
                except libvirt.libvirtError:
                    pass
                self._connection = None

    async def _run(self, fn, *args):
        """Run blocking `fn` in a thread, bounded by timeout_s, errors as DriverError."""
        try:
            # qemu-img gets timeout_s itself and is killed first; the margin lets it report.
            return await asyncio.wait_for(asyncio.to_thread(self._guarded, fn, *args),
                                          self.timeout_s + 5)
        except asyncio.TimeoutError:
            raise DriverTimeout(f"{self.name}: {fn.__name__} took longer than "
                                f"{self.timeout_s:g} s") from None

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except DriverError:
            raise
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(f"{self.name}: libvirt: {e}") from e
            raise DriverError(f"{self.name}: libvirt: {e}") from e
        except OSError as e:
            raise DiskError(f"{self.name}: {e}") from e

    def _inst_dir(self, uuid: str) -> str:
        if not uuid or "/" in uuid or uuid.startswith("."):
            raise DriverError(f"{self.name}: bad instance uuid {uuid!r}")
        return os.path.join(self.instances_path, uuid)

    def _resize_dir(self, uuid: str) -> str:
        return self._inst_dir(uuid) + RESIZE_SUFFIX

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        try:
            return self._conn().lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain(self, uuid: str) -> libvirt.virDomain:
        dom = self._lookup(uuid)
        if dom is None:
            raise InstanceNotFound(f"{self.name}: no domain {uuid}")
        return dom

    @staticmethod
    def _facts(dom: libvirt.virDomain) -> DomainFacts:
        return parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    def _mine(self, facts: DomainFacts) -> bool:
        # A domain without our metadata was not defined by another host of ours either.
        return facts.owner in ("", self.name)

    # ------------------------------------------------------------------ resources

    def capacity(self) -> Resources:
        return self._capacity

    def overhead(self, flavor: Flavor) -> Resources:
        return self._overhead

    # ------------------------------------------------------------------ lifecycle

    async def spawn(self, instance: InstanceSpec, power_on: bool) -> tuple[DiskInfo, ...]:
        return await self._run(self._spawn, instance, power_on)

    async def power_on(self, uuid: str) -> None:
        await self._run(self._power_on, uuid)

    async def power_off(self, uuid: str, timeout_s: float = 60.0) -> None:
        await self._shut_down(uuid, check_timeout(timeout_s))
        await self._run(self._power_off, uuid)

    async def reboot(self, uuid: str, hard: bool, timeout_s: float = 60.0) -> None:
        """Nova's way rather than `virDomainReboot`: a soft reboot is a clean shutdown
        and a start, because a guest that stopped is one that obeyed (an ACPI reboot
        request gives no sign of it); one that did not within `timeout_s` is rebooted
        hard, destroyed and started."""
        timeout_s = check_timeout(timeout_s)
        if await self._run(self._begin_reboot, uuid) and not hard:
            await self._shut_down(uuid, timeout_s)
        await self._run(self._end_reboot, uuid)

    async def disk_info(self, uuid: str) -> tuple[DiskInfo, ...]:
        return await self._run(self._disk_info, uuid)

    async def destroy(self, uuid: str) -> None:
        await self._run(self._destroy, uuid)

    def _spawn(self, spec: InstanceSpec, power_on: bool) -> tuple[DiskInfo, ...]:
        inst = self._inst_dir(spec.uuid)
        os.makedirs(inst, exist_ok=True)
        self._ensure_disks(spec, inst)
        self._ensure_domain(spec, power_on, take_over=False)
        return self._disk_info(spec.uuid)

    def _power_on(self, uuid: str) -> None:
        dom = self._domain(uuid)
        if not dom.isActive():
            dom.create()
        self._set_rebooting(dom, False)

    def _power_off(self, uuid: str) -> None:
        dom = self._domain(uuid)
        if dom.isActive():
            dom.destroy()                  # hard power off; the definition stays
        self._set_rebooting(dom, False)

    async def _shut_down(self, uuid: str, timeout_s: float) -> None:
        """Ask the guest to shut down (ACPI) and wait up to `timeout_s` for it to stop.
        Waits here, not in a thread: a guest that ignores the request holds nothing."""
        if timeout_s == 0 or not await self._run(self._request_shutdown, uuid):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(STOP_POLL_S, left))
            if not await self._run(self._is_active, uuid):
                return

    def _request_shutdown(self, uuid: str) -> bool:
        """Whether there is a guest to wait for."""
        dom = self._domain(uuid)
        if not dom.isActive():
            return False
        try:
            dom.shutdown()
        except libvirt.libvirtError:
            return False            # stopped meanwhile, or cannot be asked: force it off
        return True

    def _is_active(self, uuid: str) -> bool:
        return bool(self._domain(uuid).isActive())

    def _begin_reboot(self, uuid: str) -> bool:
        """Mark a running domain as rebooting, so that a call repeated after a crash that
        left it off starts it again; refuse a stopped one. Whether it is running."""
        dom = self._domain(uuid)
        if dom.isActive():
            self._set_rebooting(dom, True)
            return True
        if not self._facts(dom).rebooting:
            raise InstanceNotRunning(f"{self.name}: instance {uuid} is not running, "
                                     f"refusing to reboot it")
        return False

    def _end_reboot(self, uuid: str) -> None:
        dom = self._domain(uuid)
        if dom.isActive():
            dom.destroy()
        dom.create()
        self._set_rebooting(dom, False)

    def _set_rebooting(self, dom: libvirt.virDomain, rebooting: bool) -> None:
        """Mark or unmark, in the definition and (running) the live domain alike."""
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        if parse_domain_xml(xml).rebooting == rebooting:
            return
        marked = ET.fromstring(_with_meta(xml, rebooting="1" if rebooting else None))
        meta = ET.tostring(_local(marked.find(f"./metadata/{{{NS}}}instance")),
                           encoding="unicode")
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta, "vmr", NS, flags)

    def _disk_info(self, uuid: str) -> tuple[DiskInfo, ...]:
        for folder in (self._inst_dir(uuid), self._resize_dir(uuid)):
            if os.path.isdir(folder):
                return tuple(self._describe(os.path.join(folder, name))
                             for name in DISK_NAMES
                             if os.path.exists(os.path.join(folder, name)))
        raise InstanceNotFound(f"{self.name}: no disks for {uuid} in {self.instances_path}")

    def _describe(self, path: str) -> DiskInfo:
        info = qemu_img.info(path, self.timeout_s)
        return DiskInfo(name=os.path.basename(path), virtual_gb=-(-info.virtual_size // GiB),
                        path=path, format=info.format, backing_file=info.backing_file)

    def _destroy(self, uuid: str) -> None:
        self._undefine_if(uuid, lambda facts: True)
        _rmtree(self._inst_dir(uuid))
        _rmtree(self._resize_dir(uuid))

    def _undefine_if(self, uuid: str, wanted) -> None:
        """Power off and undefine the domain if it is ours and `wanted(facts)`."""
        dom = self._lookup(uuid)
        if dom is None:
            return
        facts = self._facts(dom)
        if not (self._mine(facts) and wanted(facts)):
            return
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(undefine_flags(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                                         _checkpoints(dom)))

    # ------------------------------------------------------------------ disks

    def _fmt(self) -> str:
        return "qcow2" if self.use_cow_images else "raw"

    def _ensure_disks(self, spec: InstanceSpec, inst: str) -> None:
        """Create each disk the flavor asks for, or grow it to the flavor's size."""
        for name, size in _disks_for(spec.flavor).items():
            path = os.path.join(inst, name)
            if os.path.exists(path):
                self._grow(path, size)
            elif name == "disk":
                self._create_root(spec, path)
            else:
                qemu_img.create(path + ".part", self._fmt(), size, timeout_s=self.timeout_s)
                os.replace(path + ".part", path)

    def _create_root(self, spec: InstanceSpec, path: str) -> None:
        image, size, t = spec.image or self.image, spec.flavor.root_gb * GiB, self.timeout_s
        part = path + ".part"
        if not image:
            qemu_img.create(part, self._fmt(), size, timeout_s=t)
        else:
            base = self._cached_base(image)
            info = qemu_img.info(base, t)
            if info.virtual_size > size:
                raise DiskError(f"{self.name}: image {image} ({info.virtual_size} bytes) is "
                                f"larger than flavor {spec.flavor.name}'s root disk")
            if self.use_cow_images:
                qemu_img.create(part, "qcow2", size, backing=base, backing_fmt=info.format,
                                timeout_s=t)
            else:
                qemu_img.convert(base, part, "raw", src_fmt=info.format, timeout_s=t)
                qemu_img.resize(part, size, "raw", t)
        os.replace(part, path)          # a crash leaves a .part, never a half-made disk

    def _cached_base(self, image: str) -> str:
        """The base image's copy in `_base/` (keyed by its real path), made once."""
        if not os.path.isfile(image):
            raise DiskError(f"{self.name}: base image {image} not found")
        key = hashlib.sha1(os.path.realpath(image).encode()).hexdigest()
        cached = os.path.join(self.instances_path, BASE_DIR, key)
        if not os.path.exists(cached):
            qemu_img.info(image, self.timeout_s)        # refuse a corrupt image up front
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            copy_sparse(image, cached + ".part")
            os.replace(cached + ".part", cached)
        return cached

    def _grow(self, path: str, size: int) -> None:
        """Nova's _disk_resize without the file system step: qemu-img resize works on the
        qcow2 directly (the raw round trip only exists so resize2fs can run on it, and we
        do not grow guest file systems); a raw disk goes back to qcow2 when
        use_cow_images."""
        info = qemu_img.info(path, self.timeout_s)
        if info.virtual_size < size:
            qemu_img.resize(path, size, info.format, self.timeout_s)
        if info.format == "raw" and self.use_cow_images:
            qemu_img.convert(path, path + "_qcow.part", "qcow2", src_fmt="raw",
                             timeout_s=self.timeout_s)
            os.replace(path + "_qcow.part", path)

    def _disk_formats(self, inst: str) -> list[tuple[str, str]]:
        return [(name, qemu_img.info(os.path.join(inst, name), self.timeout_s).format)
                for name in DISK_NAMES if os.path.exists(os.path.join(inst, name))]

    # ------------------------------------------------------------------ domains

    def _ensure_domain(self, spec: InstanceSpec, power_on: bool, *, take_over: bool):
        """Define the domain for `spec.flavor` on this host's disks unless it already is;
        start it when `power_on`. `take_over`: replace another host's stopped definition
        of the same uuid (two hosts on one libvirt daemon)."""
        inst = self._inst_dir(spec.uuid)
        want = build_domain_xml(spec, spec.flavor, inst, self._disk_formats(inst),
                                domain_type=self.domain_type, owner=self.name,
                                role=ROLE_ACTIVE)
        dom = self._lookup(spec.uuid)
        if dom is not None:
            have = self._facts(dom)
            if (have.owner == self.name and have.role == ROLE_ACTIVE
                    and have.flavor == spec.flavor
                    and have.disk_paths == parse_domain_xml(want).disk_paths):
                want = None                 # already what we would define
            elif not self._mine(have) and (dom.isActive() or not take_over):
                raise DriverError(f"{self.name}: domain {spec.uuid} belongs to host "
                                  f"{have.owner}")
            elif dom.isActive():
                dom.destroy()
        if want is not None:
            dom = self._conn().defineXML(want)
        if power_on and not dom.isActive():
            dom.create()
        return dom

    # ------------------------------------------------------------------ shared storage probe

    def _probe_path(self, probe: str) -> str:
        if not probe or "/" in probe or probe in (".", ".."):
            raise DriverError(f"{self.name}: bad probe name {probe!r}")
        return os.path.join(self.instances_path, probe)

    async def create_probe(self, probe: str) -> None:
        path = self._probe_path(probe)
        await self._run(lambda: open(path, "a").close())

    async def probe_exists(self, probe: str) -> bool:
        return await self._run(os.path.exists, self._probe_path(probe))

    async def remove_probe(self, probe: str) -> None:
        await self._run(_unlink, self._probe_path(probe))

    # ------------------------------------------------------------------ resize, source side

    async def migrate_disk_and_power_off(self, instance: InstanceSpec, new_flavor: Flavor,
                                         shared_storage: bool,
                                         sink: DiskSink | None) -> tuple[DiskInfo, ...]:
        if not shared_storage and sink is None:
            raise DriverError(f"{self.name}: storage is not shared and no sink was given")
        uuid = instance.uuid
        await self._run(self._power_off_for_resize, instance)
        resize_dir = await self._run(self._move_to_resize_dir, uuid)
        sent = []
        for name in await self._run(self._disk_names, resize_dir):
            if shared_storage:
                info = await self._run(self._place_local, resize_dir, uuid, name)
            else:
                path, info = await self._run(self._outgoing, resize_dir, name)
                await self._send(sink, path, f"{uuid}/{name}")
                await self._run(_unlink, os.path.join(resize_dir, name + RBASE_SUFFIX))
            # Where the destination finds it (relative to its instances_path), as sent.
            sent.append(DiskInfo(name=name, virtual_gb=-(-info.virtual_size // GiB),
                                 path=f"{uuid}/{name}", format=info.format,
                                 backing_file=info.backing_file))
        return tuple(sent)

    def _power_off_for_resize(self, spec: InstanceSpec) -> None:
        """Power off the instance's (old) domain and mark it the resize source."""
        dom = self._lookup(spec.uuid)
        if dom is None:
            return
        facts = self._facts(dom)
        if not self._mine(facts):
            return                      # another host's definition on a shared daemon
        if facts.role != ROLE_RESIZE_SOURCE and facts.flavor not in (None, spec.flavor):
            return                      # the new domain already (same host, finished)
        if dom.isActive():
            dom.destroy()
        if facts.role != ROLE_RESIZE_SOURCE:
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            self._conn().defineXML(_with_meta(xml, role=ROLE_RESIZE_SOURCE))

    def _move_to_resize_dir(self, uuid: str) -> str:
        inst, resize = self._inst_dir(uuid), self._resize_dir(uuid)
        if os.path.isdir(resize):
            return resize               # renamed by an earlier call
        if not os.path.isdir(inst):
            raise InstanceNotFound(f"{self.name}: no disks for {uuid} in {self.instances_path}")
        os.rename(inst, resize)
        return resize

    @staticmethod
    def _disk_names(folder: str) -> list[str]:
        return [n for n in DISK_NAMES if os.path.exists(os.path.join(folder, n))]

    def _outgoing(self, resize_dir: str, name: str) -> tuple[str, qemu_img.ImageInfo]:
        """The file that leaves the host for `name`: a qcow2 overlay is flattened first
        (its backing file stays here) into `<name>_rbase`, kept until it was sent."""
        src = os.path.join(resize_dir, name)
        rbase = src + RBASE_SUFFIX
        if os.path.exists(rbase):
            return rbase, qemu_img.info(rbase, self.timeout_s)
        info = qemu_img.info(src, self.timeout_s)
        if info.format != "qcow2" or not info.backing_file:
            return src, info
        qemu_img.convert(src, rbase + ".part", "qcow2", src_fmt="qcow2",
                         timeout_s=self.timeout_s)
        os.replace(rbase + ".part", rbase)
        return rbase, qemu_img.info(rbase, self.timeout_s)

    def _place_local(self, resize_dir: str, uuid: str, name: str) -> qemu_img.ImageInfo:
        """Shared storage: put the outgoing copy in a new `<uuid>/`; `_resize` stays."""
        final = os.path.join(self._inst_dir(uuid), name)
        if not os.path.exists(final):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            src, _ = self._outgoing(resize_dir, name)
            if src.endswith(RBASE_SUFFIX):
                os.replace(src, final)  # the flattened copy is ours to move
            else:
                copy_sparse(src, final + ".part")
                os.replace(final + ".part", final)
        _unlink(os.path.join(resize_dir, name + RBASE_SUFFIX))
        return qemu_img.info(final, self.timeout_s)

    async def _send(self, sink: DiskSink, src: str, rel_path: str) -> None:
        try:
            await sink.send_file(src, rel_path)
        except DriverError:
            raise
        except Exception as e:          # the transport's own errors (Ray, network...)
            raise DiskError(f"{self.name}: sending {src} to {rel_path} failed: "
                            f"{type(e).__name__}: {e}") from e

    async def confirm_migration(self, uuid: str, shared_storage: bool) -> None:
        await self._run(self._confirm, uuid)

    def _confirm(self, uuid: str) -> None:
        _rmtree(self._resize_dir(uuid))
        # On the same host the domain with this uuid is the new one by now: keep it.
        self._undefine_if(uuid, lambda facts: facts.role == ROLE_RESIZE_SOURCE)

    async def finish_revert_migration(self, instance: InstanceSpec, power_on: bool) -> None:
        await self._run(self._finish_revert, instance, power_on)

    def _finish_revert(self, spec: InstanceSpec, power_on: bool) -> None:
        inst, resize = self._inst_dir(spec.uuid), self._resize_dir(spec.uuid)
        if os.path.isdir(resize):
            _rmtree(inst)               # a same-host or shared-storage copy
            os.rename(resize, inst)
        elif not os.path.isdir(inst):
            raise InstanceNotFound(f"{self.name}: neither {inst} nor {resize} exists")
        for name in DISK_NAMES:
            _unlink(os.path.join(inst, name + RBASE_SUFFIX))
            _unlink(os.path.join(inst, name + RBASE_SUFFIX + ".part"))
        self._ensure_domain(spec, power_on, take_over=True)

    # ------------------------------------------------------------------ resize, destination side

    async def finish_migration(self, instance: InstanceSpec, disks: tuple[DiskInfo, ...],
                               shared_storage: bool, power_on: bool) -> None:
        await self._run(self._finish, instance, disks, power_on)

    def _finish(self, spec: InstanceSpec, disks: tuple[DiskInfo, ...], power_on: bool) -> None:
        inst = self._inst_dir(spec.uuid)
        names = {d.name for d in disks} | {"disk"}
        missing = sorted(n for n in names if not os.path.exists(os.path.join(inst, n)))
        if missing:
            raise DiskError(f"{self.name}: disks {missing} of {spec.uuid} never arrived in "
                            f"{inst}")
        self._ensure_disks(spec, inst)
        self._ensure_domain(spec, power_on, take_over=True)

    async def revert_migration_dest(self, uuid: str, shared_storage: bool) -> None:
        await self._run(self._revert_dest, uuid, shared_storage)

    def _revert_dest(self, uuid: str, shared_storage: bool) -> None:
        # Never the source's domain (same host, or finish never ran): it is marked.
        self._undefine_if(uuid, lambda facts: facts.role != ROLE_RESIZE_SOURCE)
        if not shared_storage:
            _rmtree(self._inst_dir(uuid))

    # ------------------------------------------------------------------ inspection

    def describe_domain(self, uuid: str) -> tuple[str, bool] | None:
        """(live XML, running) of the domain with this uuid, None if undefined. Blocking;
        for tests and operators (a test:/// node is visible only on this connection)."""
        try:
            dom = self._lookup(uuid)
            return None if dom is None else (dom.XMLDesc(0), bool(dom.isActive()))
        except libvirt.libvirtError as e:
            raise DriverError(f"{self.name}: libvirt: {e}") from e
