"""Benchmark: the compute API against the Python API, in one run, on one cluster.

`vmresize up` a cluster of fake hosts with the compute API, boot --servers servers
through the Python API, then measure:
- `GET /v2.1/servers/detail?deleted=False` (what `openstack server list --long`
  sends), sequentially: p50 / p99 latency and requests/s; and `GET /v2.1` (the version
  document: the cost of the HTTP layer alone);
- resizes to VERIFY_RESIZE with --concurrency in flight: over HTTP (POST the resize
  action, then poll `GET /servers/{id}` every 100 ms as `--wait` does every 5 s) against the same
  number through the Python API (`Cluster.resize(...).wait()`), on distinct servers;
  with the actor runtime, the controller round trips the API made per HTTP resize
  (`ApiServer.stats`). The goal is HTTP >= GOAL x the Python API's rate; the load
  average is printed with the figures (the machine may be shared).

    .venv/bin/python bench/api.py [--servers 2000] [--resizes 300] [--concurrency 64]
                                  [--runtime actor|serve]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmresize.actors.raylocal import free_ports

VMRESIZE = str(Path(sys.executable).parent / "vmresize")
GOAL = 0.7          # HTTP resizes/s over the Python API's, in the same run


def cluster_yaml(hosts: int, port: int, runtime: str) -> str:
    lines = ["state_dir: ./state", "options: {step_timeout_s: 120}",
             "allocation_ratios: {vcpus: 16.0, memory_mb: 1.5, disk_gb: 1.0}",
             "flavors:", "  m1.tiny: {vcpus: 1, memory_mb: 512, root_gb: 1}",
             "  m1.small: {vcpus: 1, memory_mb: 1024, root_gb: 2}", "hosts:"]
    lines += [f"  - {{name: h{i}, vcpus: 64, memory_mb: 1048576, disk_gb: 100000}}"
              for i in range(hosts)]
    lines += ["api:", f"  listen: \"127.0.0.1:{port}\"", f"  runtime: {runtime}"]
    return "\n".join(lines) + "\n"


def cli(workdir: Path, *args: str) -> str:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([VMRESIZE, *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"vmresize {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Http:
    """One keep-alive connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()
        self.sent: dict[str, int] = {}       # requests by method (GIL-atomic updates)

    def request(self, method: str, path: str, body: dict | None = None):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                timeout=120)
        data = json.dumps(body).encode() if body is not None else None
        self.sent[method] = self.sent.get(method, 0) + 1
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json",
                              "OpenStack-API-Version": "compute 2.96"})
        r = conn.getresponse()
        return r.status, r.read()


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def latency(http: Http, path: str, n: int) -> dict:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        status, body = http.request("GET", path)
        took.append(time.perf_counter() - start)
        assert status == 200, (status, body[:200])
    return {"p50_ms": percentile(took, 0.5) * 1000, "p99_ms": percentile(took, 0.99) * 1000,
            "requests_per_s": n / sum(took), "bytes": len(body)}


def boot_all(cluster, names: list[str], concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda n: cluster.boot(n, "m1.tiny"), names))
    return len(names) / (time.perf_counter() - start)


def resize_http(http: Http, cluster, names: list[str], concurrency: int) -> float:
    ids = {n: cluster.instance(n).uuid for n in names}

    def one(name: str) -> None:
        sid = ids[name]
        status, body = http.request("POST", f"/v2.1/servers/{sid}/action",
                                    {"resize": {"flavorRef": "2"}})
        assert status == 202, (status, body)
        while True:
            status, body = http.request("GET", f"/v2.1/servers/{sid}")
            state = json.loads(body)["server"]["status"]
            if state == "VERIFY_RESIZE":
                return
            assert state == "RESIZE", state
            time.sleep(0.1)      # the poll interval (`--wait` polls too, every 5 s)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, names))
    return len(names) / (time.perf_counter() - start)


def resize_python(cluster, names: list[str], concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda n: cluster.resize(n, "m1.small").wait(120), names))
    return len(names) / (time.perf_counter() - start)


def api_stats(cluster, runtime: str) -> dict:
    """The API actor's request and cluster-call counts ({} with Ray Serve)."""
    if runtime != "actor":
        return {}
    import ray
    from vmresize.api.service import ACTOR_NAME
    return ray.get(ray.get_actor(ACTOR_NAME, namespace=cluster.namespace).stats.remote())


def per_resize(before: dict, after: dict, n: int) -> dict:
    calls = {k: (v - before.get("cluster_calls", {}).get(k, 0)) / n
             for k, v in after.get("cluster_calls", {}).items()}
    return {k: v for k, v in sorted(calls.items()) if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=2000)
    ap.add_argument("--resizes", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--runtime", choices=["actor", "serve"], default="actor")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmresize-bench-api-"))
    port = free_ports(1)[0]
    (work / "cluster.yaml").write_text(cluster_yaml(args.hosts, port, args.runtime))
    started = time.perf_counter()
    try:
        cli(work, "up")        # inside: an `up` that fails part way still gets its `down`
        up_s = time.perf_counter() - started
        from vmresize.actors.api import Cluster
        from vmresize.config import load
        cluster = Cluster.connect(load(work / "cluster.yaml"))
        http = Http(port)
        total = max(args.servers, 2 * args.resizes)
        boots = boot_all(cluster, [f"vm-{i:05d}" for i in range(total)], args.concurrency)
        version = latency(http, "/v2.1", 300)
        detail = latency(http, "/v2.1/servers/detail?deleted=False", args.requests)
        names = [f"vm-{i:05d}" for i in range(2 * args.resizes)]
        py_rate = resize_python(cluster, names[:args.resizes], args.concurrency)
        before, http.sent = api_stats(cluster, args.runtime), {}
        http_rate = resize_http(http, cluster, names[args.resizes:], args.concurrency)
        calls = per_resize(before, api_stats(cluster, args.runtime), args.resizes)
        gets = http.sent.get("GET", 0) / args.resizes
    finally:
        cli(work, "down")
    figures = {
        "runtime": args.runtime, "servers": total, "hosts": args.hosts, "up_s": up_s,
        "boots_per_s": boots,
        "version_p50_ms": version["p50_ms"], "version_p99_ms": version["p99_ms"],
        "version_requests_per_s": version["requests_per_s"],
        "detail_p50_ms": detail["p50_ms"], "detail_p99_ms": detail["p99_ms"],
        "detail_requests_per_s": detail["requests_per_s"], "detail_bytes": detail["bytes"],
        "resizes": args.resizes, "concurrency": args.concurrency,
        "resizes_per_s_http": http_rate, "resizes_per_s_python": py_rate,
        "http_over_python": http_rate / py_rate, "goal": GOAL,
        "goal_met": http_rate / py_rate >= GOAL,
        "gets_per_http_resize": gets,
        "controller_calls_per_http_resize": sum(calls.values()) if calls else None,
        **{f"calls_per_http_resize_{k}": v for k, v in calls.items()},
        "load_avg_1m": os.getloadavg()[0],
    }
    print(f"{'what':<44} {'figure':>12}")
    for key, value in figures.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<44} {shown:>12}")
    ratio = figures["http_over_python"]
    print(f"goal HTTP >= {GOAL}x Python: {'met' if ratio >= GOAL else 'MISSED'} "
          f"({ratio:.2f}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
