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


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (the sockets stay open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


# Ray gives its raylet a fixed 30 s to register with the GCS (ray/_private/node.py) and
# fails `ray start` past it: on a loaded machine, a start-up that is only slow.
_SLOW_START = "timed out during startup"


def start_head(resources: dict[str, float], timeout_s: float = 600) -> dict:
    """`ray start --head` on free ports; returns {address, port, session}. It returns
    as soon as a head is up; one that failed only because Ray's own start-up bound ran
    out is stopped and started again, until `timeout_s` (a bound for a machine so loaded
    that nothing starts: `ray start` was seen taking over 120 s at a load average of 85)."""
    deadline = time.monotonic() + timeout_s
    while True:
        port, proc = _ray_start(resources, max(1.0, deadline - time.monotonic()))
        if proc is not None and proc.returncode == 0:
            return {"address": f"127.0.0.1:{port}", "port": port,
                    "session": session_of(port)}
        stop_head(session_of(port), port)      # whatever the failed start left running
        output = "" if proc is None else (proc.stderr or proc.stdout).strip()
        if proc is not None and (_SLOW_START not in output
                                 or time.monotonic() >= deadline):
            tail = " ".join(output.splitlines()[-3:])
            raise RuntimeError(f"`ray start --head` failed ({proc.returncode}): {tail}")
        if proc is None:
            raise RuntimeError(f"`ray start --head` did not return within {timeout_s} s")


def _ray_start(resources: dict[str, float], timeout_s: float):
    """(port, the finished `ray start`, or None if it ran past `timeout_s`)."""
    options = ["dashboard-agent-grpc-port", "dashboard-port",
               "dashboard-agent-listen-port", "metrics-export-port",
               "node-manager-port", "object-manager-port", "runtime-env-agent-port"]
    # Ray starts its client server on 10001 whenever the client's dependencies are
    # installed (the test clients bring them): a second head on the machine then
    # collides with the first. Without them, giving the port is an error.
    from ray._private.utils import get_ray_client_dependency_error
    if get_ray_client_dependency_error() is None:
        options.append("ray-client-server-port")
    port, *others = free_ports(1 + len(options))
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--disable-usage-stats",
           "--include-dashboard=false", f"--num-cpus={os.cpu_count() or 2}"]
    # Every fixed port on a free one, so that this head never collides with another
    # Ray on the machine (a test's local Ray, another cluster's head).
    cmd += [f"--{option}={p}" for option, p in zip(options, others)]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    try:
        return port, subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                    env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return port, None


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def session_pids(session: str, port: int | None) -> tuple[list[int], list[int]]:
    """(raylets, everything else) of one Ray session: by session dir or GCS port in the
    command line, or, for agents that rename themselves, RAY_RAYLET_PID in the
    environment."""
    cmds = _cmdlines()
    mine = {pid for pid, cmd in cmds.items()
            if session in cmd or (port and f":{port}" in cmd)}
    mine.discard(os.getpid())
    raylets = [pid for pid in mine if "/raylet " in cmds[pid] or cmds[pid].endswith("/raylet")]
    for pid in cmds:
        if pid not in mine and any(_environ_has(pid, f"RAY_RAYLET_PID={r}".encode())
                                   for r in raylets):
            mine.add(pid)
    return raylets, sorted(mine - set(raylets))


def stop_head(session: str | None, port: int | None = None, grace_s: float = 5) -> int:
    """Stop every process of that Ray session, the raylet first (its workers and agents
    follow it); returns how many were signalled."""
    if not session:
        return 0
    raylets, rest = session_pids(session, port)
    for group in (raylets, rest):
        for pid in group:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in group):
            time.sleep(0.05)     # waiting for processes to exit, bounded
        for pid in group:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
    return len(raylets) + len(rest)


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
