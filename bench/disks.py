"""Disk benchmark: qemu-img steps of a resize, and the disk move between two "hosts".

Builds a 2 GiB qcow2 holding 512 MiB of random data (a sparse raw converted), an overlay
on it, and times qemu-img's create, info, flatten (convert) and resize. Then moves the
flattened image from hostA/ to hostB/ through send_file + FileReceiver in process (the
code path of the Ray transport, minus Ray), copies it with LocalSink (copy_file_range:
shared storage, same host) and with `cp --sparse=always`, in the same run, rotating
which goes first. Our transports fsync before they rename, so cp is timed twice: alone,
and followed by an fsync of its copy (the same durability). Beside each wall time, the
CPU time it took (this process and its children: user + system), which another
program's load on a shared machine disturbs less than the wall time.

Usage: python bench/disks.py [--dir DIR] [--rounds N]. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import filecmp
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from vmresize.drivers import qemu_img
from vmresize.drivers.transport import FileReceiver, LocalSink, data_extents, send_file

GiB, MiB = 1 << 30, 1 << 20
VIRTUAL_BYTES = 2 * GiB
DATA_BYTES = 512 * MiB
PIECE_BYTES = 16 * MiB              # data written in pieces spread over the disk
MEMORY_FS = {"tmpfs", "ramfs"}
QEMU_IMG_TIMEOUT_S = 300.0
# DESIGN §8: the move at least this fraction of cp's rate, with and without its fsync
TARGETS = {"ratio_vs_cp_fsync": 0.8, "ratio_vs_cp": 0.5}


def fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (longest mount point wins)."""
    best, kind = "", "unknown"
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def pick_dir(wanted: str | None) -> str:
    for candidate in ([wanted] if wanted else ["/var/tmp", os.getcwd(), "/tmp"]):
        if not os.path.isdir(candidate) or fs_type(candidate) in MEMORY_FS:
            continue
        st = os.statvfs(candidate)
        if st.f_bavail * st.f_frsize < 4 * DATA_BYTES + VIRTUAL_BYTES // 2:
            continue
        return tempfile.mkdtemp(prefix="vmresize-bench-", dir=candidate)
    sys.exit("bench/disks.py: no directory on a real disk with ~2.5 GiB free "
             "(tmpfs would measure memory, not the disk); pass --dir")


def cpu_s() -> float:
    """CPU seconds used so far by this process (all its threads) and its waited-for
    children."""
    own, kids = (resource.getrusage(w)
                 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def make_seed(path: str) -> None:
    """A sparse raw image with DATA_BYTES of random data spread over VIRTUAL_BYTES."""
    pieces = DATA_BYTES // PIECE_BYTES
    stride = VIRTUAL_BYTES // pieces
    with open(path, "wb") as f:
        f.truncate(VIRTUAL_BYTES)
        for i in range(pieces):
            os.pwrite(f.fileno(), os.urandom(PIECE_BYTES), i * stride)


def allocated_bytes(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(n for _, n in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def qemu_img_steps(work: str) -> tuple[dict[str, float], str]:
    """Time each qemu-img step of a resize; return the times and the flattened image."""
    t = QEMU_IMG_TIMEOUT_S
    seed, base = f"{work}/seed.raw", f"{work}/_base.qcow2"
    overlay, flat = f"{work}/hostA/disk", f"{work}/hostA/disk_rbase"
    os.makedirs(f"{work}/hostA")
    make_seed(seed)
    steps = {"convert_raw_to_qcow2": timed(
        lambda: qemu_img.convert(seed, base, "qcow2", src_fmt="raw", timeout_s=t))}
    os.unlink(seed)
    steps["create_overlay"] = timed(
        lambda: qemu_img.create(overlay, "qcow2", VIRTUAL_BYTES, backing=base,
                                backing_fmt="qcow2", timeout_s=t))
    steps["info"] = statistics.median(timed(qemu_img.info, overlay, t) for _ in range(5))
    steps["flatten"] = timed(
        lambda: qemu_img.convert(overlay, flat, "qcow2", src_fmt="qcow2", timeout_s=t))
    assert qemu_img.info(flat, t).backing_file == ""
    return steps, flat


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def one_cp(src: str, dst_dir: str) -> tuple[float, float, float]:
    dst = f"{dst_dir}/cp-disk"
    c0, t0 = cpu_s(), time.perf_counter()
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    copied = time.perf_counter() - t0
    fsync_path(dst)
    durable, cpu = time.perf_counter() - t0, cpu_s() - c0
    assert filecmp.cmp(src, dst, shallow=False)
    os.unlink(dst)
    return copied, durable, cpu


def one_move(src: str, dst_dir: str):
    c0, t0 = cpu_s(), time.perf_counter()
    stats = asyncio.run(send_file(FileReceiver(dst_dir), src, "uuid/disk"))
    moved, cpu = time.perf_counter() - t0, cpu_s() - c0
    assert filecmp.cmp(src, f"{dst_dir}/uuid/disk", shallow=False)
    shutil.rmtree(f"{dst_dir}/uuid")
    return moved, cpu, stats


def one_local(src: str, dst_dir: str) -> tuple[float, float]:
    c0, t0 = cpu_s(), time.perf_counter()
    asyncio.run(LocalSink(dst_dir).send_file(src, "uuid/disk"))
    copied, cpu = time.perf_counter() - t0, cpu_s() - c0
    assert filecmp.cmp(src, f"{dst_dir}/uuid/disk", shallow=False)
    shutil.rmtree(f"{dst_dir}/uuid")
    return copied, cpu


def move_rounds(flat: str, work: str, rounds: int) -> dict:
    dst = f"{work}/hostB"
    os.makedirs(dst)
    cp_s, cp_fsync_s, move_s, local_s, stats = [], [], [], [], None
    cpu: dict[str, list[float]] = {"cp_fsync_cpu_s": [], "move_cpu_s": [], "local_cpu_s": []}
    order = ["cp", "move", "local"]
    for i in range(rounds):
        # Rotate the order so none always meets another's writeback.
        for which in order[i % 3:] + order[:i % 3]:
            os.sync()                   # start each from a clean page cache state
            if which == "cp":
                copied, durable, used = one_cp(flat, dst)
                cp_s.append(copied)
                cp_fsync_s.append(durable)
                cpu["cp_fsync_cpu_s"].append(used)
            elif which == "move":
                moved, used, stats = one_move(flat, dst)
                move_s.append(moved)
                cpu["move_cpu_s"].append(used)
            else:
                copied, used = one_local(flat, dst)
                local_s.append(copied)
                cpu["local_cpu_s"].append(used)
    return {"cp_s": statistics.median(cp_s), "cp_fsync_s": statistics.median(cp_fsync_s),
            "move_s": statistics.median(move_s), "local_s": statistics.median(local_s),
            "stats": stats, "cpu": {k: statistics.median(v) for k, v in cpu.items()},
            "all": {"cp_s": cp_s, "cp_fsync_s": cp_fsync_s, "move_s": move_s,
                    "local_s": local_s}}


def run(work: str, rounds: int) -> dict:
    load_at_start = os.getloadavg()[0]
    steps, flat = qemu_img_steps(work)
    size, allocated = os.path.getsize(flat), allocated_bytes(flat)
    moves = move_rounds(flat, work, rounds)
    grown = f"{work}/hostB/disk"
    shutil.copyfile(flat, grown)
    os.sync()                           # time the resize, not the copy's writeback
    steps["resize"] = timed(qemu_img.resize, grown, 2 * VIRTUAL_BYTES, "qcow2",
                            QEMU_IMG_TIMEOUT_S)
    stats = moves["stats"]
    rate = lambda s: round(size / s)                                     # noqa: E731
    fig = {
        "dir": os.path.dirname(work), "fs": fs_type(work), "rounds": rounds,
        "file_bytes": size, "allocated_bytes": allocated, "bytes_sent": stats.bytes_sent,
        "sent_le_allocated": stats.bytes_sent <= allocated,
        "move_s": round(moves["move_s"], 3), "cp_s": round(moves["cp_s"], 3),
        "cp_fsync_s": round(moves["cp_fsync_s"], 3), "local_s": round(moves["local_s"], 3),
        "move_bytes_per_s": rate(moves["move_s"]), "cp_bytes_per_s": rate(moves["cp_s"]),
        "cp_fsync_bytes_per_s": rate(moves["cp_fsync_s"]),
        "local_bytes_per_s": rate(moves["local_s"]),
        "ratio_vs_cp": round(moves["cp_s"] / moves["move_s"], 3),
        "ratio_vs_cp_fsync": round(moves["cp_fsync_s"] / moves["move_s"], 3),
        "ratio_local_vs_cp_fsync": round(moves["cp_fsync_s"] / moves["local_s"], 3),
        **{k: round(v, 3) for k, v in moves["cpu"].items()},
        "load_avg_1m_start": round(load_at_start, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "qemu_img_s": {k: round(v, 4) for k, v in steps.items()},
        "runs_s": {k: [round(x, 3) for x in v] for k, v in moves["all"].items()},
        "targets": TARGETS,
    }
    fig["targets_met"] = {k: fig[k] >= v for k, v in TARGETS.items()}
    return fig


def table(fig: dict) -> str:
    rows = [(f"qemu-img {k}", f"{v:.3f} s", "") for k, v in fig["qemu_img_s"].items()]
    rows += [
        ("move: send_file + FileReceiver", f"{fig['move_s']:.3f} s",
         f"{fig['move_bytes_per_s'] / MiB:.0f} MiB/s, CPU {fig['move_cpu_s']:.3f} s"),
        ("cp --sparse=always", f"{fig['cp_s']:.3f} s", f"{fig['cp_bytes_per_s'] / MiB:.0f} MiB/s"),
        ("cp --sparse=always + fsync", f"{fig['cp_fsync_s']:.3f} s",
         f"{fig['cp_fsync_bytes_per_s'] / MiB:.0f} MiB/s, CPU {fig['cp_fsync_cpu_s']:.3f} s"),
        ("local copy: LocalSink (copy_file_range)", f"{fig['local_s']:.3f} s",
         f"{fig['local_bytes_per_s'] / MiB:.0f} MiB/s, CPU {fig['local_cpu_s']:.3f} s"),
        ("move rate / cp rate", f"{fig['ratio_vs_cp']:.2f}x", ""),
        ("move rate / (cp + fsync) rate", f"{fig['ratio_vs_cp_fsync']:.2f}x", ""),
        ("local copy rate / (cp + fsync) rate", f"{fig['ratio_local_vs_cp_fsync']:.2f}x", ""),
        ("bytes sent / allocated", f"{fig['bytes_sent']} / {fig['allocated_bytes']}",
         "ok" if fig["sent_le_allocated"] else "MORE THAN ALLOCATED"),
    ]
    rows += [(f"target: {name} >= {target}", f"{fig[name]:.2f}x",
              "met" if fig["targets_met"][name] else "MISSED")
             for name, target in fig["targets"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"disk benchmark in {fig['dir']} ({fig['fs']}), image {fig['file_bytes']} bytes, "
             f"median of {fig['rounds']} rounds, load average {fig['load_avg_1m_start']} "
             f"at the start, {fig['load_avg_1m']} at the end"]
    lines += [f"  {name:<{width}}  {value:>24}  {extra}" for name, value, extra in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to work (a real disk, not tmpfs)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = pick_dir(args.dir)
    try:
        figures = run(work, max(1, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
