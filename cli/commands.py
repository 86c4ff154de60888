"""What each `vmresize` command does; argument parsing and output helpers are in cli.py.

Ray is imported only inside the commands that talk to a cluster.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

from vmresize.cli.main import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, CliError, Out,
                                 _config, _state_dir, host_doc, instance_doc, iso,
                                 migration_doc)
from vmresize.events.log import CorruptLog, LogError

INSTANCE_COLUMNS = ["name", "status", "host", "flavor", "vm_state", "task_state",
                    "power_state", "version", "uuid"]
MIGRATION_COLUMNS = ["id", "status", "migration_type", "source_compute", "dest_compute",
                     "old_flavor", "new_flavor", "created_at", "updated_at"]
HOST_COLUMNS = ["name", "driver", "up", "vcpus_used", "vcpus_limit", "memory_mb_used",
                "memory_mb_limit", "disk_gb_used", "disk_gb_limit"]


# --------------------------------------------------------------------------- cluster access

def _connect(args):
    cfg = _config(args)
    from vmresize.actors.api import Cluster, NoCluster
    try:
        return Cluster.connect(cfg, args.ray_address)
    except NoCluster as exc:
        raise CliError(str(exc)) from None


def _refused(fn, *a, **kw):
    from vmresize.actors.controller import OperationError
    try:
        return fn(*a, **kw)
    except OperationError as exc:
        raise CliError(str(exc)) from None


def cmd_up(args, out: Out) -> int:
    cfg = _config(args)
    from vmresize.actors.api import Cluster, NoCluster, read_meta, write_meta
    from vmresize.actors import raylocal
    meta = read_meta(cfg.state_dir)
    if meta is not None:
        try:
            cluster = Cluster.connect(cfg, args.ray_address)
            _print_up(out, cluster, meta, "already up")
            return EXIT_OK
        except NoCluster:
            pass     # a stale record of an earlier `up`; start afresh
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    if args.ray_address:
        meta = {"address": args.ray_address, "started": False, "session": None}
    else:
        resources: dict[str, float] = {}
        for h in cfg.hosts:
            for k, v in h.resources.items():
                resources[k] = resources.get(k, 0) + v
        try:
            meta = raylocal.start_head(resources)
        except (RuntimeError, OSError) as exc:
            raise CliError(str(exc)) from None
        meta["started"] = True
    from vmresize.actors.runtime import namespace_for
    meta["namespace"] = namespace_for(cfg)
    write_meta(cfg.state_dir, meta)
    cluster = Cluster.start(cfg, ray_address=meta["address"], detached=True)
    cluster.owns_actors = False
    meta["api_url"], meta["api_runtime"] = _start_api(cfg, meta["namespace"])
    write_meta(cfg.state_dir, meta)
    _print_up(out, cluster, meta)
    return EXIT_OK


def _print_up(out: Out, cluster, meta: dict, title: str = "up") -> None:
    from vmresize.cli.main import host_doc
    hosts = cluster.hosts()
    if out.json:
        out.doc({"address": meta.get("address"), "api_url": meta.get("api_url"),
                 "hosts": [host_doc(h) for h in hosts]})
        return
    _print_hosts(out, hosts, f"{title} at {meta.get('address')}")
    if meta.get("api_url"):
        out.line(f"compute API at {meta['api_url']} (`vmresize clouds-yaml` prints the "
                 f"clouds.yaml entry)")


def _start_api(cfg, namespace: str) -> tuple[str | None, str | None]:
    """Start the compute API unless api.listen is empty; a failure to start it is a
    warning (the cluster is up and usable without it)."""
    if not cfg.api.listen:
        return None, None
    from vmresize.api import service
    try:
        return service.start(cfg, namespace, cfg.api.listen, cfg.api.runtime), \
            cfg.api.runtime
    except service.ApiStartError as exc:
        sys.stderr.write(f"vmresize: warning: the compute API is off: {exc}\n")
        return None, None


def cmd_down(args, out: Out) -> int:
    cfg = _config(args)
    from vmresize.actors.api import META_FILE, read_meta
    from vmresize.actors import raylocal
    meta = read_meta(cfg.state_dir)
    if meta is None:
        out.line(f"no cluster is up for {cfg.state_dir}")
        if out.json:
            out.doc({"stopped": 0})
        return EXIT_OK
    import ray
    from vmresize.actors.api import _init_ray
    from vmresize.actors.runtime import stop_actors
    stopped = 0
    try:
        _init_ray(meta["address"], meta.get("namespace", ""))
        if meta.get("api_runtime"):
            from vmresize.api import service
            service.stop(meta.get("namespace", ""), meta["api_runtime"])
        stopped = stop_actors(cfg, meta.get("namespace", ""))
        ray.shutdown()
    except (ConnectionError, RuntimeError, ValueError):
        pass      # Ray is gone already; still clean up what `up` started
    if meta.get("started"):
        raylocal.stop_head(meta.get("session"), meta.get("port"))
    (Path(cfg.state_dir) / META_FILE).unlink(missing_ok=True)
    out.line(f"stopped {stopped} actors" + (" and the local Ray" if meta.get("started")
                                             else ""))
    if out.json:
        out.doc({"stopped": stopped, "ray_stopped": bool(meta.get("started"))})
    return EXIT_OK


def cmd_boot(args, out: Out) -> int:
    cluster = _connect(args)
    inst = _refused(cluster.boot, args.name, args.flavor, args.host, args.stopped)
    out.doc(instance_doc(inst), f"instance {inst.name}")
    return EXIT_OK


def _wait_migration(cluster, handle, out: Out, timeout_s: float):
    """Wait for a resize or migration, showing its status as it moves."""
    if out.json or not sys.stderr.isatty():
        return _refused(handle.wait, timeout_s)
    from rich.console import Console
    deadline = time.monotonic() + timeout_s
    with Console(stderr=True).status(f"migration {handle.id}: {handle.first.status}") as st:
        while time.monotonic() < deadline:
            mig = handle.status()
            st.update(f"migration {handle.id}: {mig.status} "
                      f"({mig.source_compute} -> {mig.dest_compute})")
            if mig.status in ("finished", "error", "confirmed", "reverted"):
                break
            time.sleep(0.2)     # a progress display, not a synchronisation
    return _refused(handle.wait, max(1.0, deadline - time.monotonic()))


def _resize_like(args, out: Out, flavor) -> int:
    cluster = _connect(args)
    start = cluster.migrate if flavor is None else cluster.resize
    fargs = (args.name, args.host) if flavor is None else (args.name, flavor, args.host)
    handle = _refused(start, *fargs)
    mig = handle.first if args.no_wait else _wait_migration(cluster, handle, out,
                                                            args.timeout)
    out.doc(migration_doc(mig), f"migration {mig.id}")
    return EXIT_OK


def cmd_resize(args, out: Out) -> int:
    return _resize_like(args, out, args.flavor)


def cmd_migrate(args, out: Out) -> int:
    return _resize_like(args, out, None)


def cmd_confirm(args, out: Out) -> int:
    cluster = _connect(args)
    mig = _refused(cluster.confirm, args.name)
    out.doc(migration_doc(mig), f"migration {mig.id}")
    return EXIT_OK


def cmd_revert(args, out: Out) -> int:
    cluster = _connect(args)
    mig = _refused(cluster.revert, args.name)
    out.doc(migration_doc(mig), f"migration {mig.id}")
    return EXIT_OK


def _lifecycle(args, out: Out, action: str) -> int:
    cluster = _connect(args)
    if action == "reboot":
        inst = _refused(cluster.reboot, args.name, args.hard)
    else:
        inst = _refused(getattr(cluster, action), args.name)
    out.doc(instance_doc(inst), f"instance {inst.name}")
    return EXIT_OK


def cmd_stop(args, out: Out) -> int:
    return _lifecycle(args, out, "stop")


def cmd_start(args, out: Out) -> int:
    return _lifecycle(args, out, "start")


def cmd_reboot(args, out: Out) -> int:
    return _lifecycle(args, out, "reboot")


def cmd_delete(args, out: Out) -> int:
    return _lifecycle(args, out, "delete")


def cmd_show(args, out: Out) -> int:
    cluster = _connect(args)
    inst = _refused(cluster.instance, args.name)
    out.doc(instance_doc(inst), f"instance {inst.name}")
    return EXIT_OK


def _print_hosts(out: Out, hosts, title: str = "hosts") -> None:
    out.table([host_doc(h) for h in hosts], title, HOST_COLUMNS)


def cmd_list(args, out: Out) -> int:
    cluster = _connect(args)
    if args.what == "instances":
        out.table([instance_doc(i) for i in cluster.instances()], "instances",
                  INSTANCE_COLUMNS)
    elif args.what == "migrations":
        out.table([migration_doc(m) for m in cluster.migrations()], "migrations",
                  MIGRATION_COLUMNS)
    else:
        _print_hosts(out, cluster.hosts())
    return EXIT_OK


# --------------------------------------------------------------------------- offline

def _offline_state_dir(args, cfg=None) -> Path:
    cfg = cfg if cfg is not None else _config(args, required=False)
    state = Path(_state_dir(args, cfg))
    if not (state / "hosts").is_dir() or not any((state / "hosts").iterdir()):
        raise CliError(f"--state-dir: {state} holds no host logs", EXIT_BAD_INPUT)
    return state


class _SimMarker(msgspec.Struct):
    hosts: int      # `simulate --hosts N` made sim-1 ... sim-N (DESIGN §7)


def _expected_hosts(state: Path, cfg) -> tuple[list[str] | None, str]:
    """The hosts whose logs `state` must hold, and where that list comes from. A state
    directory `simulate` wrote says so in its marker: its hosts are sim-1..N whatever the
    config names. Otherwise the cluster config's hosts; None when there is neither."""
    from vmresize.cli.simulate import MARKER
    marker = state / MARKER
    if marker.exists():
        try:
            count = msgspec.json.decode(marker.read_bytes(), type=_SimMarker).hosts
        except msgspec.DecodeError as exc:
            raise CliError(f"{marker}: {exc}", EXIT_BAD_INPUT) from None
        return [f"sim-{i}" for i in range(1, count + 1)], str(marker)
    if cfg is not None:
        return [h.name for h in cfg.hosts], cfg.path or "the cluster config"
    return None, ""


def cmd_audit(args, out: Out) -> int:
    cfg = _config(args, required=False)
    state = _offline_state_dir(args, cfg)
    expected, source = _expected_hosts(state, cfg)
    from vmresize.offline.audit import audit
    try:
        report = audit(state, args.as_of, expected)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    except CorruptLog as exc:
        raise CliError(f"corrupt log: {exc}", EXIT_BAD_INPUT) from None
    except LogError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if out.json:
        out.doc({**msgspec.to_builtins(report), "expected_hosts": expected,
                 "expected_hosts_from": source})
    else:
        _print_audit(out, report, state, args.as_of, source)
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_audit(out: Out, report, state: Path, as_of: str | None, source: str) -> None:
    for t in report.torn_tails:
        out.line(f"[yellow]torn tail[/] on {t.host}: {t.bytes_dropped} bytes at offset "
                 f"{t.offset} in {t.segment} (ignored)")
    if report.violations:
        out.table([msgspec.to_builtins(v) for v in report.violations], "violations",
                  ["invariant", "host", "offset", "message"])
    if as_of:
        out.line(f"as of {as_of}: " + ", ".join(f"{n} records of {h}"
                                                for h, n in report.records.items()))
    out.line(f"hosts expected as named in {source}" if source else
             "no cluster config: a host whose log is missing cannot be noticed")
    verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.violations)} violation(s)[/]"
    out.line(f"audit of {state}: {verdict} — {report.events} events from {report.hosts} "
             f"hosts, {report.instances} instances, {report.migrations} migrations "
             f"({report.open_migrations} open)")


def _event_doc(env) -> dict:
    from vmresize.projections.notifications import notifications
    return {"host": env.host, "offset": env.offset, "wall_time": env.wall_time,
            "time": iso(env.wall_time), "event": msgspec.to_builtins(env.event),
            "notifications": notifications(env)}


def cmd_events(args, out: Out) -> int:
    state = _offline_state_dir(args)
    from vmresize.events.store import open_host_logs
    try:
        readers = open_host_logs(state)
    except CorruptLog as exc:
        raise CliError(f"corrupt log: {exc}", EXIT_BAD_INPUT) from None
    except LogError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if args.host and args.host not in readers:
        raise CliError(f"--host: no log for host {args.host!r} (hosts: "
                       f"{', '.join(readers)})", EXIT_BAD_INPUT)
    if args.host:
        readers = {args.host: readers[args.host]}
    if args.request:
        return _print_request(out, state, readers, args.request)
    names = _instance_names(readers) if args.instance else {}
    if args.instance and args.instance not in names.values():
        raise CliError(f"--instance: no events for instance {args.instance!r}",
                       EXIT_BAD_INPUT)
    try:
        cursors = {h: args.start for h in readers}
        _print_events(out, readers, cursors, args.instance, names)
        while args.follow:
            time.sleep(0.5)       # --follow polls the files; a person is reading
            _print_events(out, readers, cursors, args.instance, names, refresh=True)
    except CorruptLog as exc:
        raise CliError(f"corrupt log: {exc}", EXIT_BAD_INPUT) from None
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return EXIT_OK


def _print_request(out, state, readers, request_id: str) -> int:
    """`events --request ID`: the controller's records of that request, then the host
    events of its instance while it ran."""
    from vmresize.api.actions import request_records
    try:
        records, uuid, start, end = request_records(state, request_id)
    except CorruptLog as exc:
        raise CliError(f"corrupt log: {exc}", EXIT_BAD_INPUT) from None
    if not records:
        raise CliError(f"--request: no request {request_id!r} in the controller's log",
                       EXIT_BAD_INPUT)
    envs = list(records)
    for r in readers.values():
        envs += [env for env in r.envelopes()
                 if getattr(env.event, "instance_uuid", None) == uuid
                 and start <= env.wall_time <= end]
    envs.sort(key=lambda env: (env.wall_time, env.host, env.offset))
    for env in envs:
        if out.json:
            sys.stdout.write(msgspec.json.encode(_event_doc(env)).decode() + "\n")
        else:
            out.line(f"{iso(env.wall_time)} {env.host}:{env.offset} "
                     f"[bold]{type(env.event).__name__}[/]")
    return EXIT_OK


def _instance_names(readers) -> dict[str, str]:
    names = {}
    for r in readers.values():
        for env in r.envelopes():
            e = env.event
            name = getattr(e, "name", None) or getattr(getattr(e, "spec", None), "name", None)
            if name and getattr(e, "instance_uuid", None):
                names[e.instance_uuid] = name
    return names


def _print_events(out, readers, cursors, instance, names, refresh=False) -> None:
    from vmresize.events.store import HostLogReader
    for host, r in readers.items():
        if refresh:
            r = readers[host] = HostLogReader(r.log_dir.parent.parent.parent, host)
        for env in r.envelopes(cursors[host]):
            cursors[host] = env.offset + 1
            uuid = getattr(env.event, "instance_uuid", None)
            if instance and names.get(uuid) != instance:
                continue
            if out.json:
                sys.stdout.write(msgspec.json.encode(_event_doc(env)).decode() + "\n")
            else:
                e = env.event
                what = ", ".join(f"{k}={v}" for k, v in msgspec.structs.asdict(e).items()
                                 if k in ("instance_uuid", "instance_version",
                                          "migration_id", "step", "reason", "name"))
                out.line(f"{iso(env.wall_time)} {env.host}:{env.offset} "
                         f"[bold]{type(e).__name__}[/] {what}")
        sys.stdout.flush()


def cmd_clouds_yaml(args, out: Out) -> int:
    cfg = _config(args)
    from vmresize.actors.api import read_meta
    meta = read_meta(cfg.state_dir) or {}
    url = meta.get("api_url")
    if not url:
        raise CliError(f"no compute API is up for {cfg.state_dir}; start one with "
                       f"`vmresize up` (api.listen must not be empty)")
    from vmresize.api.clouds import clouds_yaml
    try:
        text = clouds_yaml(cfg, url, args.user)
    except KeyError as exc:
        raise CliError(exc.args[0], EXIT_BAD_INPUT) from None
    if out.json:
        out.doc({"api_url": url, "clouds_yaml": text})
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_password_hash(args, out: Out) -> int:
    import getpass
    from vmresize.api.auth import hash_password
    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
        getpass.getpass("password: ")
    if not password:
        raise CliError("password: empty", EXIT_BAD_INPUT)
    digest = hash_password(password)
    if out.json:
        out.doc({"password_hash": digest})
    else:
        sys.stdout.write(digest + "\n")
    return EXIT_OK


def cmd_simulate(args, out: Out) -> int:
    from vmresize.cli.simulate import run_simulate
    return run_simulate(args, out)


def cmd_demo(args, out: Out) -> int:
    from vmresize.cli.demo import run_demo
    return run_demo(args, out)
