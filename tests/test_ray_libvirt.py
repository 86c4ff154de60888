"""Libvirt hosts under the Ray runtime: two host actors on libvirt's test:/// driver
(a private node each) with real image files under two instances paths, so a resize
streams the disks from one host actor to the other through Ray (chunked, checksummed,
sparse) and the destination grows them with qemu-img."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import msgspec
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("libvirt")

from vmresize.actors import Cluster  # noqa: E402
from vmresize.config import parse  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.libvirt]

NODE_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>16</cores><threads>1</threads>
    <active>16</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>33554432</memory>
</node>
"""


def _config(tmp: Path):
    (tmp / "node.xml").write_text(NODE_XML)
    text = f"""
options: {{step_timeout_s: 60}}
allocation_ratios: {{vcpus: 4.0, memory_mb: 1.0, disk_gb: 1.0}}
reserved: {{vcpus: 0, memory_mb: 0, disk_gb: 0}}
flavors:
  tiny:  {{vcpus: 1, memory_mb: 64, root_gb: 1}}
  small: {{vcpus: 2, memory_mb: 128, root_gb: 2, ephemeral_gb: 1}}
hosts:
  - {{name: kvm-a, driver: libvirt, uri: "test://{tmp}/node.xml",
      instances_path: "{tmp}/a", vcpus: 8, memory_mb: 4096, disk_gb: 50}}
  - {{name: kvm-b, driver: libvirt, uri: "test://{tmp}/node.xml",
      instances_path: "{tmp}/b", vcpus: 8, memory_mb: 4096, disk_gb: 50}}
"""
    cfg = parse(text, "test")
    return msgspec.structs.replace(cfg, state_dir=str(tmp / "state"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raylibvirt")
    c = Cluster.start(_config(tmp))
    c.tmp = tmp
    yield c
    c.stop()
    if ray.is_initialized():
        ray.shutdown()


def virtual_gib(path: Path) -> float:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["virtual-size"] / 2**30


def test_resize_streams_disks_between_host_actors_and_confirm_cleans_up(cluster):
    inst = cluster.boot("lv-1", "tiny", host="kvm-a")
    src = cluster.tmp / "a" / inst.uuid
    assert virtual_gib(src / "disk") == 1
    mig = cluster.resize("lv-1", "small").wait(120)
    assert (mig.status, mig.dest_compute) == ("finished", "kvm-b")
    dest = cluster.tmp / "b" / inst.uuid
    assert virtual_gib(dest / "disk") == 2 and virtual_gib(dest / "disk.local") == 1
    assert not list(dest.glob("*.part*")), "a partial transfer file was left behind"
    assert (cluster.tmp / "a" / f"{inst.uuid}_resize").is_dir()
    cluster.confirm("lv-1")
    assert not (cluster.tmp / "a" / f"{inst.uuid}_resize").exists()
    assert cluster.instance("lv-1").host == "kvm-b"


def test_revert_removes_the_copy_and_restores_the_source(cluster):
    inst = cluster.boot("lv-2", "tiny", host="kvm-a")
    cluster.resize("lv-2", "small").wait(120)
    assert (cluster.tmp / "b" / inst.uuid / "disk").exists()
    assert cluster.revert("lv-2").status == "reverted"
    assert not (cluster.tmp / "b" / inst.uuid).exists()
    assert virtual_gib(cluster.tmp / "a" / inst.uuid / "disk") == 1
    assert not (cluster.tmp / "a" / f"{inst.uuid}_resize").exists()
    back = cluster.instance("lv-2")
    assert (back.host, back.flavor.name, back.status) == ("kvm-a", "tiny", "ACTIVE")
    assert cluster.audit().ok
