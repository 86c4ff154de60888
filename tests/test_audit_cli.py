"""`vmresize audit` as a user runs it: the hosts it expects (from the simulator's marker
or the cluster config), and `--as-of` (HOST:OFFSET or an ISO time; a bare offset is
refused with the reason, exit 2)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import strategies as s

VMRESIZE = str(Path(sys.executable).parent / "vmresize")

CONFIG = """\
state_dir: ./state
allocation_ratios: {vcpus: 16.0, memory_mb: 1.5, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 512, disk_gb: 0}
flavors:
  m1.tiny: {vcpus: 1, memory_mb: 512, root_gb: 1}
hosts:
"""


def vmresize(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_COLOR="1", COLUMNS="200")
    return subprocess.run([VMRESIZE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def audit_doc(*args: str, cwd: Path, code: int, as_of: str | None = None) -> dict:
    proc = vmresize("--json", *args, "audit", *(["--as-of", as_of] if as_of else []),
                    cwd=cwd)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def write_config(path: Path, hosts: list[str]) -> Path:
    path.write_text(CONFIG + "".join(
        f"  - {{name: {h}, vcpus: 8, memory_mb: 16384, disk_gb: 400}}\n" for h in hosts))
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """A state directory `vmresize simulate --hosts 3` wrote."""
    cwd = tmp_path_factory.mktemp("sim")
    proc = vmresize("--state-dir", str(cwd / "state"), "--json", "simulate", "--seed", "5",
                    "--hosts", "3", "--instances", "6", "--operations", "30", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "state"


@pytest.fixture
def sim_copy(simulated, tmp_path) -> Path:
    shutil.copytree(simulated, tmp_path / "state")
    return tmp_path / "state"


# --------------------------------------------------------------------------- expected hosts

def test_a_simulated_state_dir_expects_the_simulators_hosts(sim_copy, tmp_path):
    # the config in the working directory names compute-* hosts: the marker wins
    write_config(tmp_path / "cluster.yaml", ["compute-1", "compute-2"])
    report = audit_doc("--state-dir", str(sim_copy), cwd=tmp_path, code=0)
    assert report["ok"] and report["expected_hosts"] == ["sim-1", "sim-2", "sim-3"]
    assert report["expected_hosts_from"].endswith("sim-meta.json")
    on_disk = sorted(p.name for p in (sim_copy / "hosts").iterdir())
    assert on_disk == report["expected_hosts"]


def test_a_simulated_host_whose_log_is_gone_is_named(sim_copy, tmp_path):
    shutil.rmtree(sim_copy / "hosts" / "sim-3")
    report = audit_doc("--state-dir", str(sim_copy), cwd=tmp_path, code=1)
    lost = [v for v in report["violations"] if v["invariant"] == "host-log"]
    assert lost == [{"invariant": "host-log", "host": "sim-3", "offset": 0, "offsets": [],
                     "message": "host sim-3 is in the cluster but has no log"}]
    assert report["hosts"] == 2


def test_a_simulated_host_whose_log_is_empty_is_named(sim_copy, tmp_path):
    for segment in (sim_copy / "hosts" / "sim-2" / "log").glob("*.seg"):
        segment.write_bytes(b"")
    proc = vmresize("--state-dir", str(sim_copy), "audit", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "host-log" in proc.stdout and "sim-2 is in the cluster but has an empty log" \
        in proc.stdout


def _compute_state_dir(tmp_path: Path, hosts: list[str]) -> Path:
    """A clean history on `hosts`: an instance booted on the first, resized to the
    second and confirmed."""
    h = s.History(hosts=tuple(hosts))
    h.boot(hosts[0], "u", s.TINY)
    h.resize("m", "u", hosts[0], hosts[1], s.TINY, s.SMALL)
    h.full_resize("m")
    h.confirm("m")
    return s.write_state_dir(h.logs, tmp_path / "state")


@pytest.mark.parametrize("explicit", [True, False])
def test_a_host_of_the_config_with_no_log_is_named(tmp_path, explicit):
    hosts = [f"compute-{i}" for i in range(1, 5)]
    state = _compute_state_dir(tmp_path, hosts)
    config = write_config(tmp_path / "cluster.yaml", [*hosts, "compute-5"])
    args = ["--config", str(config)] if explicit else []     # else ./cluster.yaml
    report = audit_doc(*args, "--state-dir", str(state), cwd=tmp_path, code=1)
    assert [(v["invariant"], v["host"]) for v in report["violations"]] == [
        ("host-log", "compute-5")]
    assert report["expected_hosts"] == [*hosts, "compute-5"]
    assert report["expected_hosts_from"] == str(config.resolve())


def test_without_config_or_marker_only_the_logs_there_are_checked(tmp_path):
    state = _compute_state_dir(tmp_path, [f"compute-{i}" for i in range(1, 5)])
    report = audit_doc("--state-dir", str(state), cwd=tmp_path, code=0)
    assert report["ok"] and report["expected_hosts"] is None
    proc = vmresize("--state-dir", str(state), "audit", cwd=tmp_path)
    assert "a host whose log is missing cannot be noticed" in proc.stdout


# --------------------------------------------------------------------------- --as-of

def test_as_of_a_bare_offset_exits_2_saying_why(simulated, tmp_path):
    proc = vmresize("--state-dir", str(simulated), "audit", "--as-of", "7", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmresize: error: --as-of: a bare "
                                                   "offset is refused")
    assert "different moment on every host" in lines[0] and "HOST:7" in lines[0]
    assert proc.stdout == ""


def test_as_of_a_record_audits_its_cut(simulated, tmp_path):
    logs = s.read_host_logs(simulated)
    offset = len(logs["sim-2"]) // 2
    report = audit_doc("--state-dir", str(simulated), as_of=f"sim-2:{offset}",
                       cwd=tmp_path, code=0)
    assert report["ok"] and report["records"]["sim-2"] == offset + 1
    assert report["events"] == sum(report["records"].values()) < sum(map(len, logs.values()))
    proc = vmresize("--state-dir", str(simulated), "audit", "--as-of", f"sim-2:{offset}",
                    cwd=tmp_path)
    assert f"as of sim-2:{offset}: " in proc.stdout
    assert f"{offset + 1} records of sim-2" in proc.stdout


def test_as_of_an_iso_time_still_works(simulated, tmp_path):
    logs = s.read_host_logs(simulated)
    times = sorted(env.wall_time for envs in logs.values() for env in envs)
    moment = datetime.fromtimestamp(times[len(times) // 2], tz=timezone.utc).isoformat()
    report = audit_doc("--state-dir", str(simulated), as_of=moment, cwd=tmp_path,
                       code=0)
    assert 0 < report["events"] < len(times)


@pytest.mark.parametrize("bad", ["sim-9:0", "sim-1:100000", "soon"])
def test_as_of_a_record_not_there_exits_2(simulated, tmp_path, bad):
    proc = vmresize("--state-dir", str(simulated), "audit", "--as-of", bad, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("vmresize: error: --as-of: ")
