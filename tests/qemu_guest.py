"""Helpers for tests that boot a real QEMU guest through `qemu:///session`.

- `boot_sector()`: a 512-byte BIOS boot sector, assembled here in Python, that prints
  `VMRESIZE-GUEST sectors=0x<16 hex digits>` (its disk's size in 512-byte sectors, from
  INT 13h AH=48h) on COM1 and halts. Nothing is downloaded.
- `run_in_user_namespace(argv)`: runs a command as uid 1000 in new user, mount and PID
  namespaces (root's `qemu:///system` does not work on these machines, see
  shared/reference/real-qemu.md). The command runs under `reap` as PID 1, so when it ends
  the kernel kills everything left in the namespace: no libvirtd, virtlogd or QEMU can
  outlive the test, even on failure.
- `SessionDaemons`: starts virtlogd and libvirtd for the session by hand and stops them
  by PID (destroying every domain first).
- `python tests/qemu_guest.py scenario WORKDIR`: the scenario of test_qemu_resize.py
  (resize, revert, confirm, stop, start, reboots, delete), run inside the namespace;
  prints one JSON object.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from polling import poll  # noqa: E402  (also when run as a script inside unshare)

GUEST_TAG = b"VMRESIZE-GUEST sectors=0x"
MARKER = b"--- vmresize test: power-on follows ---\n"
SCENARIO_TIMEOUT_S = 90.0
DAEMON_START_TIMEOUT_S = 15.0
CONSOLE_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 0.3            # the guest ignores ACPI: only the fallback stops it
POLL_S = 0.05


# --------------------------------------------------------------------------- the guest

def _assemble(items: list, origin: int = 0x7C00) -> bytes:
    """Tiny two-pass assembler: bytes, label names, and (kind, label) fixups where kind
    is rel8 / rel16 (jump displacements) or abs16 (an address)."""
    sizes = {"rel8": 1, "rel16": 2, "abs16": 2}
    labels, pc = {}, 0
    for item in items:
        if isinstance(item, str):
            labels[item] = pc
        else:
            pc += len(item) if isinstance(item, bytes) else sizes[item[0]]
    out = bytearray()
    for item in items:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, tuple):
            kind, label = item
            end = len(out) + sizes[kind]
            if kind == "rel8":
                out += struct.pack("<b", labels[label] - end)
            elif kind == "rel16":
                out += struct.pack("<h", labels[label] - end)
            else:
                out += struct.pack("<H", origin + labels[label])
    return bytes(out)


def boot_sector() -> bytes:
    """16-bit real mode: print the banner, ask the BIOS for the boot disk's size (EDD),
    print it in hex, halt."""
    buf = 0x0600                                   # free low memory for the EDD result
    code = _assemble([
        b"\xFA\x31\xC0\x8E\xD8\x8E\xC0\x8E\xD0",    # cli; ds = es = ss = 0
        b"\xBC\x00\x7C\xFB\xFC",                   # sp = 0x7c00; sti; cld
        b"\x88\xD3",                               # bl = dl (boot drive)
        b"\xBE", ("abs16", "msg"), b"\xE8", ("rel16", "puts"),
        b"\xBE" + struct.pack("<H", buf),          # si = buf
        b"\xC7\x04\x1A\x00",                       # [si] = 0x1a (buffer size)
        b"\xB4\x48\x88\xDA\xCD\x13",               # ah = 0x48; dl = bl; int 13h
        b"\x72", ("rel8", "newline"),              # jc newline
        b"\xB9\x08\x00",                           # cx = 8 bytes of sector count
        b"\xBE" + struct.pack("<H", buf + 0x17),   # si = last byte of it
        "hexloop", b"\x8A\x04\x4E",                # al = [si]; si--
        b"\xE8", ("rel16", "puthex"), b"\xE2", ("rel8", "hexloop"),
        "newline", b"\xBE", ("abs16", "crlf"), b"\xE8", ("rel16", "puts"),
        "halt", b"\xF4\xEB\xFD",                   # hlt; jmp halt
        "puts", b"\xBA\xF8\x03",                   # dx = COM1
        b"\xAC\x84\xC0\x74\x03\xEE\xEB\xF8\xC3",   # lodsb; test; jz ret; out; jmp
        "puthex", b"\x50\xC0\xE8\x04\xE8", ("rel16", "nibble"),  # push ax; al >>= 4
        b"\x58\x24\x0F",                           # pop ax; al &= 15; fall into nibble
        "nibble", b"\x04\x30\x3C\x39\x76\x02\x04\x07",  # al += '0'; past '9': += 7
        b"\xBA\xF8\x03\xEE\xC3",                   # out COM1; ret
        "msg", GUEST_TAG + b"\x00",
        "crlf", b"\r\n\x00",
    ])
    assert len(code) <= 510, len(code)
    return code + bytes(510 - len(code)) + b"\x55\xAA"


def write_boot_image(path: str) -> str:
    with open(path, "wb") as f:
        f.write(boot_sector())
    return path


def guest_sectors(console_path: str) -> int | None:
    """The sector count the guest printed on its serial console, None until it did.
    Output before a `MARKER` line (written by the test before a power-on) does not
    count: it is from an earlier boot."""
    try:
        with open(console_path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    text = text[text.rfind(MARKER) + 1:] if MARKER in text else text
    start = text.rfind(GUEST_TAG)
    end = text.find(b"\r\n", start)
    if start < 0 or end < 0:
        return None
    return int(text[start + len(GUEST_TAG):end], 16)


def guest_boots(console_path: str) -> int:
    """How many times the guest printed its line into this console file."""
    try:
        with open(console_path, "rb") as f:
            return f.read().count(GUEST_TAG)
    except FileNotFoundError:
        return 0


def wait_for_guest(console_path: str, timeout_s: float = CONSOLE_TIMEOUT_S) -> int:
    try:
        # 0 sectors is not a disk the guest could report, so "true" means "printed".
        return poll(lambda: guest_sectors(console_path), timeout_s, POLL_S)
    except AssertionError:
        raise TimeoutError(f"no guest output in {console_path} after {timeout_s} s") from None


# --------------------------------------------------------------------------- namespaces

def unshare_available() -> str | None:
    """None when user namespaces work here, else the reason they do not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run(["unshare", "-U", "-m", "-p", "-f", "--mount-proc",
                               "--map-user=1000", "--map-group=1000", "true"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if done.returncode != 0:
        return f"unshare -U -m -p failed: {done.stderr.strip()}"
    return None


def run_in_user_namespace(argv: list[str], home: str, runtime_dir: str,
                          timeout_s: float = SCENARIO_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=home, XDG_RUNTIME_DIR=runtime_dir)
    env.pop("LIBVIRT_DEFAULT_URI", None)
    cmd = ["unshare", "-U", "-m", "-p", "--kill-child", "--mount-proc",
           "--map-user=1000", "--map-group=1000",
           sys.executable, os.path.abspath(__file__), "reap", "--", *argv]
    # --kill-child: if unshare is killed (timeout), PID 1 inside goes, and with it all.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def reap(argv: list[str]) -> int:
    """PID 1 of the namespace: run `argv`, reap every orphan (libvirtd waits for its
    QEMU children to vanish), exit with argv's status."""
    child = subprocess.Popen(argv)
    while True:
        pid, status = os.wait()
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


class SessionDaemons:
    """virtlogd and libvirtd for `qemu:///session`, started and stopped by PID."""

    def __init__(self) -> None:
        self.runtime = os.environ["XDG_RUNTIME_DIR"]
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "SessionDaemons":
        try:
            for name in ("virtlogd", "libvirtd"):
                self.procs.append(subprocess.Popen(
                    [shutil.which(name) or f"/usr/sbin/{name}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self._wait_socket(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_socket(self, name: str) -> None:
        sock = os.path.join(self.runtime, "libvirt",
                            "virtlogd-sock" if name == "virtlogd" else "libvirt-sock")
        proc = self.procs[-1]

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} (no {sock})")
            return os.path.exists(sock)

        try:
            poll(up, DAEMON_START_TIMEOUT_S, POLL_S)
        except AssertionError:
            raise RuntimeError(f"{name} did not start (no {sock})") from None

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._destroy_domains()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs = []

    def _destroy_domains(self) -> None:
        if not self.procs or self.procs[-1].poll() is not None:
            return
        import libvirt
        try:
            conn = libvirt.open("qemu:///session")
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            conn.close()
        except libvirt.libvirtError:
            pass                        # the namespace's end kills QEMU all the same


# --------------------------------------------------------------------------- the scenario

def _domain_view(driver, uuid: str) -> dict | None:
    from vmresize.drivers.libvirt_driver import parse_domain_xml
    described = driver.describe_domain(uuid)
    if described is None:
        return None
    facts = parse_domain_xml(described[0])
    return {"vcpus": facts.vcpus, "memory_mb": facts.memory_mb, "running": described[1],
            "disks": list(facts.disk_paths), "owner": facts.owner, "role": facts.role}


def _console(inst_dir: str) -> dict:
    path = os.path.join(inst_dir, "console.log")
    sectors = wait_for_guest(path)
    with open(path, "rb") as f:
        marker_kept = MARKER in f.read()    # False: QEMU truncated the file on start
    return {"sectors": sectors, "boots": guest_boots(path), "marker_kept": marker_kept}


def _image(path: str) -> dict:
    from vmresize.drivers import qemu_img
    info = qemu_img.info(path)
    return {"virtual_size": info.virtual_size, "format": info.format,
            "backing_file": info.backing_file}


async def _scenario(work: str) -> dict:
    import libvirt
    from vmresize.drivers.base import InstanceSpec
    from vmresize.drivers.libvirt_driver import LibvirtDriver
    from vmresize.drivers.transport import FileReceiver, PeerSink
    from vmresize.events.schema import Flavor, Resources

    old = Flavor("tiny", vcpus=1, memory_mb=64, root_gb=1)
    new = Flavor("small", vcpus=2, memory_mb=96, root_gb=2)
    uuid = "0b1d2c3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
    image = write_boot_image(os.path.join(work, "boot.img"))
    cap = Resources(8, 8192, 100)
    src = LibvirtDriver("host-a", "qemu:///session", os.path.join(work, "a"), cap, image=image)
    dst = LibvirtDriver("host-b", "qemu:///session", os.path.join(work, "b"), cap, image=image)
    a_dir, b_dir = os.path.join(src.instances_path, uuid), os.path.join(dst.instances_path, uuid)
    out: dict = {"steps": []}

    def note(step: str, **facts) -> None:
        out["steps"].append({"step": step, "t": round(time.monotonic() - t0, 2), **facts})

    t0 = time.monotonic()
    await src.spawn(InstanceSpec(uuid, "vm-1", old), power_on=True)
    note("spawned", **_console(a_dir),
         disk=_image(os.path.join(a_dir, "disk")), domain=_domain_view(src, uuid))

    async def resize() -> None:
        await dst.create_probe("probe-1")
        shared = await src.probe_exists("probe-1")
        await dst.remove_probe("probe-1")
        sink = PeerSink(FileReceiver(dst.instances_path))
        disks = await src.migrate_disk_and_power_off(InstanceSpec(uuid, "vm-1", old), new,
                                                     shared, sink)
        note("migrated", shared=shared, bytes_sent=sum(s.bytes_sent for s in sink.sent.values()),
             resize_dir=os.path.isdir(a_dir + "_resize"), source_domain=_domain_view(src, uuid))
        await dst.finish_migration(InstanceSpec(uuid, "vm-1", new), disks, shared, True)
        note("finished", **_console(b_dir),
             disk=_image(os.path.join(b_dir, "disk")), domain=_domain_view(dst, uuid))

    await resize()
    await dst.revert_migration_dest(uuid, False)
    with open(os.path.join(a_dir + "_resize", "console.log"), "ab") as f:
        f.write(MARKER)                 # what the guest prints after revert comes after it
    await src.finish_revert_migration(InstanceSpec(uuid, "vm-1", old), True)
    note("reverted", **_console(a_dir),
         disk=_image(os.path.join(a_dir, "disk")), domain=_domain_view(src, uuid),
         dest_dir=os.path.isdir(b_dir), resize_dir=os.path.isdir(a_dir + "_resize"))

    await resize()
    await src.confirm_migration(uuid, False)
    note("confirmed", resize_dir=os.path.isdir(a_dir + "_resize"),
         source_dir=os.path.isdir(a_dir), domain=_domain_view(dst, uuid))
    conn = libvirt.open("qemu:///session")     # the test's own, to look past the driver
    await _lifecycle(dst, conn, uuid, note)
    await dst.destroy(uuid)
    note("deleted", left={host.name: sorted(os.listdir(host.instances_path))
                          for host in (src, dst)},
         domains=[d.UUIDString() for d in conn.listAllDomains()])
    out["wall_s"] = round(time.monotonic() - t0, 2)
    conn.close()
    src.close()
    dst.close()
    return out


def _power(conn, uuid: str) -> dict:
    """libvirt's own word on the domain: running or not, why it stopped, its run id."""
    import libvirt
    dom = conn.lookupByUUIDString(uuid)
    state, reason = dom.state()
    reasons = {libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
               libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed"}
    return {"running": state == libvirt.VIR_DOMAIN_RUNNING, "id": dom.ID(),
            "stop_reason": reasons.get(reason, str(reason))
            if state == libvirt.VIR_DOMAIN_SHUTOFF else ""}


async def _lifecycle(host, conn, uuid: str, note) -> None:
    """Stop, start, reboot hard, reboot soft. The boot-sector guest ignores ACPI, so a
    stop and a soft reboot take the timeout -> destroy path."""
    inst = os.path.join(host.instances_path, uuid)
    console = os.path.join(inst, "console.log")

    def mark() -> None:
        with open(console, "ab") as f:
            f.write(MARKER)             # what the guest prints next comes after it

    async def timed(call) -> float:
        start = time.monotonic()
        await call
        return round(time.monotonic() - start, 2)

    before = _power(conn, uuid)
    took = await timed(host.power_off(uuid, timeout_s=STOP_TIMEOUT_S))
    note("stopped", call_s=took, before=before, after=_power(conn, uuid),
         domain=_domain_view(host, uuid))
    if _power(conn, uuid)["running"]:   # the rest would wait for a boot that never comes
        raise AssertionError("power_off returned with the guest still running")
    mark()
    took = await timed(host.power_on(uuid))
    note("started", call_s=took, **_console(inst), power=_power(conn, uuid),
         disk=_image(f"{inst}/disk"), domain=_domain_view(host, uuid))
    for hard in (True, False):
        before = _power(conn, uuid)
        mark()
        took = await timed(host.reboot(uuid, hard=hard, timeout_s=STOP_TIMEOUT_S))
        note("rebooted", hard=hard, call_s=took, **_console(inst), before=before,
             after=_power(conn, uuid), domain=_domain_view(host, uuid))


def scenario(work: str) -> int:
    with SessionDaemons() as daemons:
        result = asyncio.run(_scenario(work))
        result["daemon_pids"] = [p.pid for p in daemons.procs]
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["reap"]:
        return reap(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    if argv[:1] == ["scenario"] and len(argv) == 2:
        return scenario(argv[1])
    print("usage: qemu_guest.py reap -- CMD... | scenario WORKDIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
