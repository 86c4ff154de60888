"""The `vmresize` command line through subprocesses, as a user runs it (DESIGN §7).

Offline commands run on copies of the recorded fixture `events/fixtures/v1`; bad input
must exit 2 with one error line; one round trip runs on a real detached cluster that
`vmresize up` starts and `vmresize down` stops (in a finaliser, whatever happens).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from polling import poll  # noqa: E402
from vmresize.actors.raylocal import free_ports

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "events" / "fixtures" / "v1"
VMRESIZE = str(Path(sys.executable).parent / "vmresize")
COMMANDS = ("up", "down", "boot", "resize", "migrate", "confirm", "revert", "show", "list",
            "events", "audit", "simulate", "demo")

CLUSTER_YAML = """\
state_dir: ./state
options:
  allow_resize_to_same_host: false
  use_cow_images: true
  resize_confirm_window_s: 0
  max_attempts: 3
  step_timeout_s: 30
allocation_ratios: {vcpus: 1.0, memory_mb: 1.0, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 0, disk_gb: 0}
flavors:
  m1.tiny:   {vcpus: 1, memory_mb: 512,  root_gb: 1}
  m1.small:  {vcpus: 1, memory_mb: 2048, root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096, root_gb: 40}
hosts:
  - name: compute-1
    driver: fake
    vcpus: 8
    memory_mb: 16384
    disk_gb: 400
  - name: compute-2
    driver: fake
    vcpus: 8
    memory_mb: 16384
    disk_gb: 400
"""


def vmresize(*args: str, cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_COLOR="1", COLUMNS="200")
    return subprocess.run([VMRESIZE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmresize: error: "), proc.stderr
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (None) under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    state = tmp_path / "v1"
    shutil.copytree(FIXTURE, state)
    return state


@pytest.fixture
def bad_config(tmp_path) -> Path:
    """CLUSTER_YAML with the second host's memory_mb set to -5."""
    head, sep, second = CLUSTER_YAML.partition("  - name: compute-2\n")
    path = tmp_path / "bad.yaml"
    path.write_text(head + sep + second.replace("memory_mb: 16384", "memory_mb: -5"))
    return path


# --------------------------------------------------------------------------- help

def test_help_lists_every_command(tmp_path):
    proc = vmresize("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"^\s{2,}(\w+)\s", proc.stdout, re.M))
    assert set(COMMANDS) <= listed, proc.stdout
    for command in COMMANDS:
        sub = vmresize(command, "--help", cwd=tmp_path)
        assert sub.returncode == 0, (command, sub.stderr)
        assert "usage: vmresize" in sub.stdout, (command, sub.stdout)


# --------------------------------------------------------------------------- offline

def test_audit_of_the_recorded_fixture_passes_and_writes_nothing(fixture_copy, tmp_path):
    before = tree(fixture_copy)
    proc = vmresize("--state-dir", str(fixture_copy), "--json", "audit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["violations"] == []
    assert report["events"] > 0 and report["hosts"] == 3
    assert tree(fixture_copy) == before


def test_events_prints_one_envelope_per_line(fixture_copy, tmp_path):
    before = tree(fixture_copy)
    proc = vmresize("--state-dir", str(fixture_copy), "--json", "events", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert docs and all({"host", "offset", "wall_time", "event"} <= d.keys() for d in docs)
    assert all(isinstance(d["event"]["type"], str) and isinstance(d["offset"], int)
               for d in docs)
    assert {d["host"] for d in docs} == {"sim-1", "sim-2", "sim-3"}
    audited = json.loads(vmresize("--state-dir", str(fixture_copy), "--json", "audit",
                                  cwd=tmp_path).stdout)
    assert len(docs) == audited["events"]

    part = vmresize("--state-dir", str(fixture_copy), "--json", "events", "--host", "sim-1",
                    "--from", "5", cwd=tmp_path)
    assert part.returncode == 0, part.stderr
    tail = [json.loads(line) for line in part.stdout.splitlines()]
    assert tail and tail[0]["offset"] == 5 and {d["host"] for d in tail} == {"sim-1"}
    assert [d["offset"] for d in tail] == list(range(5, 5 + len(tail)))
    assert tail == [d for d in docs if d["host"] == "sim-1" and d["offset"] >= 5]
    assert tree(fixture_copy) == before


IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s*(\S+)\s*$")


@pytest.mark.parametrize("command", [["audit"], ["events", "--json"]])
def test_offline_commands_never_import_ray(fixture_copy, tmp_path, command):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vmresize.cli.main",
         "--state-dir", str(fixture_copy), *command],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = [m.group(1) for m in map(IMPORT_LINE.match, proc.stderr.splitlines()) if m]
    assert "vmresize.projections.audit" in modules or "vmresize.events.store" in modules
    assert not [m for m in modules if m == "ray" or m.startswith("ray.")]


# --------------------------------------------------------------------------- bad input

def test_bad_config_fixture_is_what_it_claims(bad_config):
    text = bad_config.read_text()
    assert text.count("memory_mb: -5") == 1
    assert text.index("memory_mb: -5") > text.index("name: compute-2")


@pytest.mark.parametrize("command", [["up"], ["list", "hosts"],
                                     ["boot", "vm", "--flavor", "m1.small"],
                                     ["show", "vm"], ["resize", "vm", "m1.medium"]])
def test_an_invalid_config_exits_2_naming_the_field(bad_config, tmp_path, command):
    state = tmp_path / "state"
    proc = vmresize("--config", str(bad_config), "--state-dir", str(state), *command,
                    cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_error_line(proc)
    assert "hosts[1].memory_mb" in line and "-5" in line
    assert not state.exists()


def test_a_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("flavors:\n  m1.small: {vcpus: 1, memory_mb: 2048, root_gb: 20}\n"
                    "hosts:\n\t- {name: compute-1, vcpus: 8, memory_mb: 1, disk_gb: 1}\n")
    for command in (["up"], ["show", "vm"]):
        proc = vmresize("--config", str(path), "--state-dir", str(tmp_path / "s"), *command,
                        cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert re.search(r"line 4, column 1\b", one_error_line(proc)), proc.stderr
    assert not (tmp_path / "s").exists()


def test_audit_of_a_missing_or_empty_state_dir_exits_2_and_creates_nothing(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for state in (missing, empty):
        proc = vmresize("--state-dir", str(state), "audit", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        one_error_line(proc)
    assert not missing.exists() and list(empty.iterdir()) == []


def test_simulate_with_an_unknown_fault_exits_2(tmp_path):
    state = tmp_path / "sim"
    proc = vmresize("--state-dir", str(state), "simulate", "--seed", "1", "--faults",
                    "crash,bogus", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "--faults" in line and "bogus" in line
    assert not state.exists()


def _corrupt_middle(state: Path) -> Path:
    segment = state / "hosts" / "sim-2" / "log" / "00000000000000000000.seg"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    return segment


def test_audit_of_a_corrupt_log_exits_2_naming_segment_and_offset(fixture_copy, tmp_path):
    segment = _corrupt_middle(fixture_copy)
    before = tree(fixture_copy)
    proc = vmresize("--state-dir", str(fixture_copy), "audit", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_error_line(proc)
    assert str(segment) in line and re.search(r"\boffset \d+", line), line
    assert tree(fixture_copy) == before        # nothing truncated, no lock file


def test_events_of_a_corrupt_log_exits_2_naming_segment_and_offset(fixture_copy, tmp_path):
    segment = _corrupt_middle(fixture_copy)
    proc = vmresize("--state-dir", str(fixture_copy), "--json", "events", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_error_line(proc)
    assert str(segment) in line and re.search(r"\boffset \d+", line), line


def test_commands_without_a_cluster_say_how_to_start_one(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(CLUSTER_YAML)
    proc = vmresize("--config", str(config), "--state-dir", str(tmp_path / "s"), "show",
                    "x", cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    line = one_error_line(proc)
    assert "no cluster is up" in line and "vmresize up" in line


# --------------------------------------------------------------------------- simulate

def test_simulate_is_deterministic_and_its_logs_pass_audit(tmp_path):
    def simulate(seed: int, state: str, *extra: str) -> dict:
        proc = vmresize("--state-dir", str(tmp_path / state), "--json", "simulate",
                        "--seed", str(seed), "--hosts", "3", "--instances", "10",
                        "--operations", "60", *extra, cwd=tmp_path)
        assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-2000:]}"
        return json.loads(proc.stdout)      # stdout carries only the JSON

    first, again = simulate(7, "s7"), simulate(7, "s7-again", "--plot", "out.svg")
    other = simulate(8, "s8")
    assert isinstance(first["digest"], str) and first["digest"]
    same = ("digest", "operations", "resizes_finished", "resizes_failed", "crashes",
            "events", "violations", "faults")
    assert {k: first[k] for k in same} == {k: again[k] for k in same}
    assert other["digest"] != first["digest"]
    assert first["operations"] == 60 and first["violations"] == 0

    hosts = sorted(p.name for p in (tmp_path / "s7" / "hosts").iterdir())
    assert hosts == ["sim-1", "sim-2", "sim-3"]
    proc = vmresize("--state-dir", str(tmp_path / "s7"), "--json", "audit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["hosts"] == 3 and report["events"] == first["events"]

    root = ET.parse(tmp_path / "out.svg").getroot()
    assert root.tag.rpartition("}")[2] == "svg"


# --------------------------------------------------------------------------- a real cluster

def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), fields[19]


def _alive(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == start


class RayProcesses:
    """The processes of the Ray each `vmresize up` started (found by its session
    directory, its port, or as children and agents of its raylet), so that the tests can
    check `down` stopped them all and the finaliser can end the ones it did not."""

    def __init__(self):
        self.seen: dict[int, str] = {}       # pid -> start time
        self.survivors: dict[int, str] = {}
        self.ups = 0

    def record(self, state: Path) -> None:
        meta = json.loads((state / "ray-meta.json").read_text())
        session, port = meta.get("session") or "\0", f":{meta['port']}"
        procs = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        "utf-8", "replace")
                    env = (entry / "environ").read_bytes()
                except OSError:
                    continue
                procs[int(entry.name)] = (cmd, env)
        ours = {pid for pid, (cmd, _) in procs.items()
                if session in cmd or re.search(re.escape(port) + r"\b", cmd)}
        raylets = {pid for pid in ours if "raylet/raylet" in procs[pid][0]}
        for pid, (_, env) in procs.items():
            st = _stat(pid)
            if st and (st[1] in raylets or any(f"RAY_RAYLET_PID={r}\0".encode() in env
                                               for r in raylets)):
                ours.add(pid)
        ours.discard(os.getpid())
        self.seen.update({pid: st[2] for pid in ours if (st := _stat(pid))})
        self.ups += 1

    def after_down(self, timeout_s: float = 2) -> None:
        try:
            poll(lambda: not any(_alive(*ps) for ps in self.seen.items()), timeout_s)
        except AssertionError:
            pass                 # the survivors are recorded just below
        self.survivors.update({p: s for p, s in self.seen.items() if _alive(p, s)})
        self.seen.clear()

    def kill_survivors(self) -> None:
        for pid, start in {**self.seen, **self.survivors}.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_processes():
    procs = RayProcesses()
    yield procs
    procs.kill_survivors()


def _poll(fn, timeout_s: float, interval_s: float = 0.2):
    return poll(fn, timeout_s, interval_s)


def _http(port: int, method: str, path: str, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=json.dumps(body).encode() if body else None,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload) if payload else None


def test_round_trip_on_a_detached_cluster_survives_down_and_up(tmp_path, ray_processes):
    config, state = tmp_path / "cluster.yaml", tmp_path / "state"
    port = free_ports(1)[0]
    config.write_text(CLUSTER_YAML + f'api: {{listen: "127.0.0.1:{port}"}}\n')

    def cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return vmresize("--config", str(config), "--state-dir", str(state), *args,
                        cwd=tmp_path, timeout_s=timeout_s)

    def doc(*args: str, timeout_s: float = 300):
        proc = cli("--json", *args, timeout_s=timeout_s)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    up = False
    try:
        up = True
        proc = cli("--json", "up", timeout_s=600)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        started = json.loads(proc.stdout)
        hosts = started["hosts"]
        assert started["api_url"] == f"http://127.0.0.1:{port}/v2.1", proc.stderr
        ray_processes.record(state)
        assert sorted((h["name"], h["up"]) for h in hosts) == [("compute-1", True),
                                                               ("compute-2", True)]
        inst = doc("boot", "vm", "--flavor", "m1.small", "--host", "compute-1")
        assert (inst["status"], inst["host"], inst["flavor"]) == ("ACTIVE", "compute-1",
                                                                  "m1.small")
        mig = doc("resize", "vm", "m1.medium", "--no-wait")
        assert mig["status"] == "pre-migrating" and mig["migration_type"] == "resize"
        assert isinstance(mig["id"], str) and mig["instance_uuid"] == inst["uuid"]

        shown = _poll(lambda: (d := doc("show", "vm"))["status"] == "VERIFY_RESIZE" and d,
                      timeout_s=300)
        assert (shown["host"], shown["flavor"]) == ("compute-2", "m1.medium")
        done = doc("confirm", "vm")
        assert (done["id"], done["status"]) == (mig["id"], "confirmed")
        used = {h["name"]: (h["vcpus_used"], h["memory_mb_used"], h["disk_gb_used"])
                for h in doc("list", "hosts")}
        assert used == {"compute-1": (0, 0, 0), "compute-2": (2, 4096, 40)}
        before = doc("show", "vm")
        assert (before["status"], before["power_state"]) == ("ACTIVE", 1)
        migrations = doc("list", "migrations")
        assert [(m["id"], m["status"]) for m in migrations] == [(mig["id"], "confirmed")]
        # flavors made through the compute API are controller events: they outlive
        # down / up (a deleted one stays deleted)
        huge = {"flavor": {"name": "m1.huge", "ram": 1024, "vcpus": 2, "disk": 40,
                           "id": "huge"}}
        status, made = _http(port, "POST", "/v2.1/flavors", huge)
        assert status == 200 and made["flavor"]["id"] == "huge", made
        assert _http(port, "POST", "/v2.1/flavors", huge)[0] == 409
        status, made = _http(port, "POST", "/v2.1/flavors", {"flavor": {
            "name": "m1.gone", "ram": 1, "vcpus": 1, "disk": 1}})
        gone_id = made["flavor"]["id"]
        assert _http(port, "DELETE", f"/v2.1/flavors/{gone_id}")[0] == 202

        assert cli("down", timeout_s=300).returncode == 0
        up = False
        ray_processes.after_down()
        gone = cli("show", "vm")
        assert gone.returncode == 1 and "vmresize up" in gone.stderr, gone.stderr

        up = True
        doc("up", timeout_s=600)
        ray_processes.record(state)
        after = doc("show", "vm")
        keys = ("uuid", "status", "host", "flavor", "vm_state", "task_state", "power_state",
                "version")
        assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
        assert {h["name"]: (h["vcpus_used"], h["memory_mb_used"], h["disk_gb_used"])
                for h in doc("list", "hosts")} == used
        assert doc("list", "migrations") == migrations
        flavors = {f["name"]: f for f in _http(port, "GET", "/v2.1/flavors/detail")[1][
            "flavors"]}
        assert "m1.gone" not in flavors
        assert (flavors["m1.huge"]["id"], flavors["m1.huge"]["ram"]) == ("huge", 1024)
        assert _http(port, "GET", f"/v2.1/flavors/{gone_id}")[0] == 404
        assert cli("down", timeout_s=300).returncode == 0
        up = False
        ray_processes.after_down()
    finally:
        if up:
            cli("down", timeout_s=300)
            ray_processes.after_down()

    report = doc("audit")
    assert report["ok"] and report["hosts"] == 2 and report["events"] > 0


def test_down_stops_every_process_of_the_ray_that_up_started(ray_processes):
    if not ray_processes.ups:
        pytest.skip("the round trip did not run")
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80].replace(b"\0", b" ")
             .decode("utf-8", "replace") for pid in ray_processes.survivors if _stat(pid)}
    assert not ray_processes.survivors, names
