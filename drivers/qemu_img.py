"""qemu-img, run as a subprocess with a timeout: the only place that executes it.

Every failure is a `DiskError` carrying qemu-img's stderr (a timeout is a `DriverTimeout`).
`info` always passes `-U` (force-share) so it also reads images a running QEMU holds.
Blocking: callers in async code run these in a thread.
"""
from __future__ import annotations

import json
import subprocess

import msgspec

from vmresize.drivers.base import DiskError, DriverTimeout

QEMU_IMG = "qemu-img"
DEFAULT_TIMEOUT_S = 60.0
STDERR_CHARS_MAX = 2000          # enough for qemu-img's message, bounded for events


class ImageInfo(msgspec.Struct, frozen=True):
    path: str
    format: str
    virtual_size: int            # bytes the guest sees
    actual_size: int = 0         # bytes allocated on the host
    backing_file: str = ""       # as written in the image (may be relative)


def run(args: list[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Run `qemu-img ARGS`; return stdout or raise DiskError with stderr."""
    argv = [QEMU_IMG, *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        # subprocess.run kills the child before raising: nothing is left running.
        raise DriverTimeout(f"qemu-img {args[0]} took longer than {timeout_s:g} s: "
                            f"{' '.join(argv)}") from None
    except OSError as e:
        raise DiskError(f"cannot run qemu-img: {e}") from e
    if done.returncode != 0:
        stderr = done.stderr.strip()[-STDERR_CHARS_MAX:] or "(no stderr)"
        raise DiskError(f"qemu-img {args[0]} failed (exit {done.returncode}): {stderr}")
    return done.stdout


def info(path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ImageInfo:
    out = run(["info", "-U", "--output=json", path], timeout_s)
    try:
        raw = json.loads(out)
        return ImageInfo(path=path, format=raw["format"], virtual_size=int(raw["virtual-size"]),
                         actual_size=int(raw.get("actual-size", 0)),
                         backing_file=raw.get("backing-filename", ""))
    except (ValueError, KeyError, TypeError) as e:
        raise DiskError(f"qemu-img info {path}: unreadable output ({e}): {out[:200]!r}") from e


def create(path: str, fmt: str, size_bytes: int, *, backing: str = "", backing_fmt: str = "",
           timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "raw"]
    run([*args, path, str(size_bytes)], timeout_s)


def convert(src: str, dst: str, out_fmt: str, *, src_fmt: str = "",
            timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Copy `src` into a new image `dst`; the backing chain is merged (flattened)."""
    args = ["convert", "-q"]
    if src_fmt:
        args += ["-f", src_fmt]
    run([*args, "-O", out_fmt, src, dst], timeout_s)


def resize(path: str, size_bytes: int, fmt: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Grow `path` to `size_bytes` (never shrinks: qemu-img refuses without --shrink)."""
    run(["resize", "-q", "-f", fmt, path, str(size_bytes)], timeout_s)
