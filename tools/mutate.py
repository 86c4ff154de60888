"""Mutation testing: mutate one file at a time and check that its tests notice.

    .venv/bin/python tools/mutate.py                      # every target of mutation.toml
    .venv/bin/python tools/mutate.py projections/audit.py --jobs 2
    .venv/bin/python tools/mutate.py --list
    .venv/bin/python tools/mutate.py projections/audit.py --retry-survivors

Run by hand, not in CI: a full run takes tens of minutes. For each target file of
tools/mutation.toml, cosmic-ray makes every mutant (one operator at one place: `<` for
`<=`, `and` for `or`, a constant changed, a loop that never runs...) and runs the
target's fast subset of tests against it; a mutant the tests pass on has survived.

Nothing here touches the working tree: each worker mutates its own copy of it (tracked
and untracked files, so uncommitted work is measured) under --work, and imports the
`vmresize.*` packages from that copy through a path entry of symlinks laid out as the
installed namespace (the editable install maps `vmresize.projections` to the working
tree's folder, which mutating a copy alone would not reach). With --jobs N, N copies
run as cosmic-ray HTTP workers on loopback ports.

--retry-survivors runs again only the mutants that survived the last run of a target
(its session stays in --work), on a fresh copy of the tree: after adding the tests that
should kill them. The target file itself must not have changed since that run.

Prints a table, the survivors' diffs (also in WORK/<target>/survivors.txt) and, last,
one JSON line of the figures. Why each survivor is equivalent, when it is:
tools/mutation-notes.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tools" / "mutation.toml"
BIN = Path(sys.executable).parent
PORT_WAIT_S = 60


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # a SIGTERM unwinds like ^C, so that the workers started below are stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = tomllib.loads(CONFIG.read_text())
    targets = config["targets"]
    if args.list:
        for name, spec in targets.items():
            print(f"{name}: {' '.join(spec['tests'])}")
        return 0
    chosen = args.targets or list(targets)
    unknown = [t for t in chosen if t not in targets]
    if unknown:
        print(f"mutate: {unknown[0]} is not a target of {CONFIG} (targets: "
              f"{', '.join(targets)})", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    figures = {}
    for target in chosen:
        figures[target] = run_target(target, targets[target], config, work, args.jobs,
                                     args.retry_survivors)
    _print_table(figures)
    total = {k: sum(f[k] for f in figures.values()) for k in
             ("mutants", "killed", "survived", "incompetent", "skipped")}
    total["kill_rate"] = _rate(total)
    print(json.dumps({"targets": figures, "total": total}))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help="files to mutate (default: all of them)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="workers, each in its own copy of the tree (default: cores)")
    p.add_argument("--work", default=str(ROOT / ".mutation"),
                   help="where the copies and sessions go (default: .mutation/)")
    p.add_argument("--list", action="store_true", help="print the targets and exit")
    p.add_argument("--retry-survivors", action="store_true",
                   help="run again only the survivors of the last run of each target")
    return p


# --------------------------------------------------------------------------- one target

def run_target(target: str, spec: dict, config: dict, work: Path, jobs: int,
               retry: bool = False) -> dict:
    base = work / target.replace("/", "_")
    session = base / "session.sqlite"
    if retry:
        _check_unchanged(base, target)
    elif base.exists():
        shutil.rmtree(base)
    for old in base.glob("tree-*"):
        shutil.rmtree(old)
    trees = [_copy_tree(base / f"tree-{i}") for i in range(1, max(jobs, 1) + 1)]
    command = shlex.join([str(BIN / "python"), "-m", "pytest", "-x", "-q",
                          "-p", "no:cacheprovider", "--hypothesis-seed=0", *spec["tests"]])
    started = time.monotonic()
    baseline = subprocess.run(shlex.split(command), cwd=trees[0], env=_env(trees[0]),
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"mutate: the tests of {target} fail unmutated:\n"
                         f"{baseline.stdout[-3000:]}{baseline.stderr[-2000:]}")
    timeout_s = 3 * (time.monotonic() - started) + config.get("timeout_extra_s", 30)
    excluded = config.get("exclude_operators", []) + spec.get("exclude_operators", [])
    cr_config = _write_cr_config(base, target, command, timeout_s, config, len(trees),
                                 excluded)
    if retry:
        with sqlite3.connect(session) as db:
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
    else:
        shutil.copy2(ROOT / target, base / "target.orig")
        _cr(["cosmic-ray", "init", str(cr_config), str(session)], trees[0])
        _cr(["cr-filter-operators", str(session), str(cr_config)], trees[0])
    print(f"mutate: {target}: {_count(session)} mutants, tests: {' '.join(spec['tests'])}"
          f", {timeout_s:.0f} s timeout, {len(trees)} worker(s)", file=sys.stderr)
    workers = _start_workers(trees) if len(trees) > 1 else []
    try:
        _cr(["cosmic-ray", "exec", str(cr_config), str(session)], trees[0])
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=30)
    figures, survivors = _results(session)
    (base / "survivors.txt").write_text("".join(survivors))
    for diff in survivors:
        print(diff, file=sys.stderr)
    figures["wall_s"] = round(time.monotonic() - started, 1)
    return figures


def _check_unchanged(base: Path, target: str) -> None:
    orig = base / "target.orig"
    if not orig.exists():
        raise SystemExit(f"mutate: no earlier run of {target} in {base}")
    if orig.read_bytes() != (ROOT / target).read_bytes():
        raise SystemExit(f"mutate: {target} changed since its last run: its mutants are "
                         f"numbered afresh, run it without --retry-survivors")


def _copy_tree(dest: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) under `dest`, and
    `dest/.shim/vmresize/<package>` -> `dest/<folder>` for every mapped package."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    shim = dest / ".shim" / "vmresize"
    shim.mkdir(parents=True)
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for package, folder in mapping.items():
        (shim / package.split(".", 1)[1]).symlink_to(dest / folder)
    return dest


def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree / ".shim"), PYTHONDONTWRITEBYTECODE="1",
                RAY_USAGE_STATS_ENABLED="0")


def _write_cr_config(base: Path, target: str, command: str, timeout_s: float,
                     config: dict, workers: int, excluded: list[str]) -> Path:
    lines = ["[cosmic-ray]", f"module-path = {json.dumps(target)}",
             f"timeout = {timeout_s:.1f}", "excluded-modules = []",
             f"test-command = {json.dumps(command)}", "",
             "[cosmic-ray.distributor]",
             f"name = {json.dumps('http' if workers > 1 else 'local')}", ""]
    if workers > 1:
        urls = [f"http://127.0.0.1:{port}" for port in _free_ports(workers)]
        lines += ["[cosmic-ray.distributor.http]", f"worker-urls = {json.dumps(urls)}", ""]
    lines += ["[cosmic-ray.filters.operators-filter]",
              f"exclude-operators = {json.dumps(excluded)}"]
    path = base / "cosmic-ray.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_workers(trees: list[Path]) -> list[subprocess.Popen]:
    urls = json.loads(_read_urls(trees[0].parent / "cosmic-ray.toml"))
    procs = []
    for tree, url in zip(trees, urls):
        port = int(url.rsplit(":", 1)[1])
        procs.append(subprocess.Popen([str(BIN / "cosmic-ray"), "http-worker", "--port",
                                       str(port)], cwd=tree, env=_env(tree),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_port(port, procs[-1])
    return procs


def _read_urls(cr_config: Path) -> str:
    for line in cr_config.read_text().splitlines():
        if line.startswith("worker-urls = "):
            return line.split(" = ", 1)[1]
    raise AssertionError("no worker-urls")


def _wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + PORT_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mutate: the worker on port {port} exited ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)     # a worker process starting up: nothing to wait on but its port
    raise SystemExit(f"mutate: no worker listening on port {port} after {PORT_WAIT_S} s")


def _cr(command: list[str], cwd: Path) -> None:
    subprocess.run([str(BIN / command[0]), *command[1:]], cwd=cwd, env=_env(cwd),
                   check=True, stdout=subprocess.DEVNULL)


def _count(session: Path) -> int:
    return sum(1 for _ in _dump(session))


def _dump(session: Path):
    out = subprocess.run([str(BIN / "cosmic-ray"), "dump", str(session)],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        yield json.loads(line)


# --------------------------------------------------------------------------- figures

def _results(session: Path) -> tuple[dict, list[str]]:
    figures = dict(mutants=0, killed=0, survived=0, incompetent=0, skipped=0)
    survivors = []
    for job, result in _dump(session):
        figures["mutants"] += 1
        worker = (result or {}).get("worker_outcome")
        outcome = (result or {}).get("test_outcome")
        if worker == "skipped":
            figures["skipped"] += 1
        elif outcome == "killed":
            figures["killed"] += 1
        elif outcome == "survived":
            figures["survived"] += 1
            mutation = job["mutations"][0]
            survivors.append(f"--- survived: {mutation['operator_name']} "
                             f"#{mutation['occurrence']} at line "
                             f"{mutation['start_pos'][0]}\n{result['diff']}\n")
        else:
            figures["incompetent"] += 1
    figures["kill_rate"] = _rate(figures)
    return figures, survivors


def _rate(f: dict) -> float:
    """Killed among the mutants that ran (filtered and incompetent ones did not)."""
    ran = f["killed"] + f["survived"]
    return round(f["killed"] / ran, 4) if ran else 0.0


def _print_table(figures: dict) -> None:
    print(f"{'target':32} {'mutants':>8} {'skipped':>8} {'killed':>7} {'survived':>9} "
          f"{'incomp.':>8} {'kill rate':>10} {'wall s':>8}")
    for target, f in figures.items():
        print(f"{target:32} {f['mutants']:>8} {f['skipped']:>8} {f['killed']:>7} "
              f"{f['survived']:>9} {f['incompetent']:>8} {f['kill_rate']:>10.1%} "
              f"{f['wall_s']:>8}")


if __name__ == "__main__":
    sys.exit(main())
