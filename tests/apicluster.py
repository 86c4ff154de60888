"""A cluster brought up with `vmresize up` and its compute API on a free port, for the
compute API's tests (one per test module: `up` takes seconds)."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmresize.actors.raylocal import free_ports

BIN = Path(sys.executable).parent
VMRESIZE = str(BIN / "vmresize")
OPENSTACK = str(BIN / "openstack")

CLUSTER_YAML = """\
state_dir: ./state
options: {{step_timeout_s: 30}}
allocation_ratios: {{vcpus: 1.0, memory_mb: 1.0, disk_gb: 1.0}}
reserved: {{vcpus: 0, memory_mb: 0, disk_gb: 0}}
flavors:
  m1.tiny:   {{vcpus: 1, memory_mb: 512,  root_gb: 1}}
  m1.small:  {{vcpus: 1, memory_mb: 2048, root_gb: 20}}
  m1.medium: {{vcpus: 2, memory_mb: 4096, root_gb: 40}}
hosts:
  - {{name: compute-1, vcpus: 8, memory_mb: 16384, disk_gb: 400}}
  - {{name: compute-2, vcpus: 8, memory_mb: 16384, disk_gb: 400}}
images:
  - {{name: cirros}}
api:
  listen: "127.0.0.1:{port}"
{api_extra}"""


def run(*cmd: str, cwd: Path, env: dict | None = None, timeout_s: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_COLOR="1", COLUMNS="250",
                    **(env or {}))
    proc = subprocess.run(list(cmd), cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


class LineProcess:
    """A helper process spoken to in JSON lines, each answer awaited with a bound."""

    def __init__(self, argv: list[str], cwd: Path | None = None):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0,
                                     env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        self.buffer = b""

    def send(self, doc) -> None:
        self.proc.stdin.write(json.dumps(doc).encode() + b"\n")

    def line(self, deadline: float) -> dict | None:
        """The next answer, or None once `deadline` (time.monotonic) has passed."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise AssertionError(f"{self.proc.args} exited {self.proc.wait()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class OpenstackCli:
    """The real `openstack` CLI run through `oscfork.py`: one process imports it, every
    command runs in a child forked from it (the same `main` the `openstack` script
    calls), so a command costs its requests and not a new interpreter's imports."""

    def __init__(self):
        self.helper: LineProcess | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="vmresize-osc-"))

    def run(self, argv: list[str], cwd: Path, env: dict, timeout_s: float) -> tuple:
        """(exit code, stdout, stderr) of `openstack *argv`."""
        if self.helper is None:
            self.helper = LineProcess([sys.executable,
                                       str(Path(__file__).with_name("oscfork.py"))])
            assert self.helper.line(time.monotonic() + 300) == {"ready": True}
        out, err = self.scratch / "out", self.scratch / "err"
        self.helper.send({"argv": argv, "cwd": str(cwd), "env": env, "out": str(out),
                          "err": str(err)})
        deadline = time.monotonic() + timeout_s
        pid = self.helper.line(deadline)["pid"]
        done = self.helper.line(deadline)
        if done is None:
            os.kill(pid, signal.SIGKILL)
            self.helper.line(time.monotonic() + 60)
            raise subprocess.TimeoutExpired(["openstack", *argv], timeout_s,
                                            out.read_text(), err.read_text())
        return done["code"], out.read_text(), err.read_text()

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None


class VmresizeViews:
    """`vmresize show / list / audit --json` run in `vmresizeq.py`, one process that
    stays connected to the cluster: a new `vmresize` pays seconds joining Ray each
    time. Started after `up`, closed before `down`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.helper: LineProcess | None = None

    def run(self, argv: list[str], timeout_s: float) -> tuple:
        if self.helper is None:
            self.helper = LineProcess([sys.executable,
                                       str(Path(__file__).with_name("vmresizeq.py"))],
                                      cwd=self.workdir)
        self.helper.send(argv)
        done = self.helper.line(time.monotonic() + timeout_s)
        if done is None:
            self.helper.proc.kill()
            self.helper = None
            raise subprocess.TimeoutExpired(["vmresize", *argv], timeout_s)
        return done["code"], done["out"], done["err"]

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None


class ApiCluster:
    def __init__(self, workdir: Path, api_extra: str = ""):
        self.workdir = workdir
        self.port = free_ports(1)[0]
        (workdir / "cluster.yaml").write_text(CLUSTER_YAML.format(port=self.port,
                                                                  api_extra=api_extra))
        self.state_dir = workdir / "state"
        self.clouds = workdir / "clouds.yaml"
        self.url = ""
        self.cli = OpenstackCli()
        self.views = VmresizeViews(workdir)

    def up(self) -> None:
        doc = json.loads(self.vmresize("up", "--json", timeout_s=600).stdout)
        self.url = doc["api_url"]
        assert self.url == f"http://127.0.0.1:{self.port}/v2.1", doc
        self.clouds.write_text(self.vmresize("clouds-yaml").stdout)

    def down(self) -> None:
        self.views.close()
        self.vmresize("down", timeout_s=300, check=False)

    def close(self) -> None:
        """Down, and the helper processes stopped."""
        self.down()
        self.cli.close()

    def vmresize(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(VMRESIZE, *args, cwd=self.workdir, **kw)

    def vm_json(self, *args: str, timeout_s: float = 300):
        """`vmresize *args --json`, read-only commands (show, list, audit)."""
        code, out, err = self.views.run([*args, "--json"], timeout_s)
        assert code == 0, f"vmresize {' '.join(args)} --json exited {code}:\n{out}\n{err}"
        return json.loads(out)

    def openstack(self, *args: str, check: bool = True, env: dict | None = None,
                  timeout_s: float = 300) -> subprocess.CompletedProcess:
        argv = ["--os-cloud", "vmresize", *args]
        full_env = dict(os.environ, NO_COLOR="1", COLUMNS="250",
                        OS_CLIENT_CONFIG_FILE=str(self.clouds), **(env or {}))
        code, out, err = self.cli.run(argv, self.workdir, full_env, timeout_s)
        if check and code != 0:
            raise AssertionError(f"openstack {' '.join(argv)} exited {code}:\n{out}\n{err}")
        return subprocess.CompletedProcess([OPENSTACK, *argv], code, out, err)

    def os_json(self, *args: str):
        return json.loads(self.openstack(*args, "-f", "json").stdout)

    def log_bytes(self) -> dict[str, bytes]:
        """Every log segment's bytes: what must not change after a refusal."""
        return {str(p.relative_to(self.state_dir)): p.read_bytes()
                for p in sorted(self.state_dir.rglob("*.seg"))}
