"""A cluster brought up with `vmresize up` and its compute API on a free port, for the
compute API's tests (one per test module: `up` takes seconds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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


class ApiCluster:
    def __init__(self, workdir: Path, api_extra: str = ""):
        self.workdir = workdir
        self.port = free_ports(1)[0]
        (workdir / "cluster.yaml").write_text(CLUSTER_YAML.format(port=self.port,
                                                                  api_extra=api_extra))
        self.state_dir = workdir / "state"
        self.clouds = workdir / "clouds.yaml"
        self.url = ""

    def up(self) -> None:
        doc = json.loads(self.vmresize("up", "--json", timeout_s=600).stdout)
        self.url = doc["api_url"]
        assert self.url == f"http://127.0.0.1:{self.port}/v2.1", doc
        self.clouds.write_text(self.vmresize("clouds-yaml").stdout)

    def down(self) -> None:
        self.vmresize("down", timeout_s=300, check=False)

    def vmresize(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(VMRESIZE, *args, cwd=self.workdir, **kw)

    def vm_json(self, *args: str):
        return json.loads(self.vmresize(*args, "--json").stdout)

    def openstack(self, *args: str, check: bool = True, env: dict | None = None):
        return run(OPENSTACK, "--os-cloud", "vmresize", *args, cwd=self.workdir,
                   env={"OS_CLIENT_CONFIG_FILE": str(self.clouds), **(env or {})},
                   check=check)

    def os_json(self, *args: str):
        return json.loads(self.openstack(*args, "-f", "json").stdout)

    def log_bytes(self) -> dict[str, bytes]:
        """Every log segment's bytes: what must not change after a refusal."""
        return {str(p.relative_to(self.state_dir)): p.read_bytes()
                for p in sorted(self.state_dir.rglob("*.seg"))}
