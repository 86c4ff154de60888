"""Start and stop the local Ray head that `vmresize up` runs, and only that one.

`ray stop` would stop every Ray of the machine; `stop_head` stops the processes of one
session (found by its session directory in their command lines).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ") \
                    .decode("utf-8", "replace")
            except OSError:
                continue
    return out


def session_of(port: int) -> str | None:
    for cmd in _cmdlines().values():
        if f"--gcs_server_port={port}" in cmd:
            m = re.search(r"(/\S*/session_[\w.-]+)", cmd)
            if m:
                return m.group(1)
    return None


def start_head(resources: dict[str, float], timeout_s: float = 120) -> dict:
    """`ray start --head` on a free port; returns {address, port, session}."""
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--disable-usage-stats",
           "--include-dashboard=false", f"--num-cpus={os.cpu_count() or 2}"]
    # Every fixed port on a free one, so that this head never collides with another
    # Ray on the machine (a test's local Ray, another cluster's head).
    for option in ("ray-client-server-port", "dashboard-agent-grpc-port",
                   "dashboard-agent-listen-port", "metrics-export-port",
                   "node-manager-port", "object-manager-port", "runtime-env-agent-port"):
        cmd.append(f"--{option}={free_port()}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"`ray start --head` failed ({proc.returncode}): {tail}")
    return {"address": f"127.0.0.1:{port}", "port": port, "session": session_of(port)}


def stop_head(session: str | None, timeout_s: float = 20) -> int:
    """Terminate every process of that Ray session; returns how many were signalled."""
    if not session:
        return 0
    pids = [pid for pid, cmd in _cmdlines().items()
            if session in cmd and pid != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
