"""The `vmresize` command line (DESIGN §7).

Offline commands (`audit`, `events`, `simulate`) never import Ray; the others join the
cluster that `vmresize up` left running. Errors are one line on stderr,
`vmresize: error: ...`, and the exit code says what kind: 0 ok; 1 refused, failed, or
violations found; 2 bad input or a corrupt log.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from vmresize.config import ClusterConfig, ConfigError, load, with_api_listen

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- output

def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def instance_doc(inst) -> dict:
    from vmresize.projections.state import server_status
    return {"uuid": inst.uuid, "name": inst.name, "host": inst.host,
            "flavor": inst.flavor.name, "vm_state": inst.vm_state,
            "task_state": inst.task_state, "power_state": inst.power_state,
            "status": server_status(inst), "version": inst.version,
            "vcpus": inst.flavor.vcpus, "memory_mb": inst.flavor.memory_mb,
            "migration_id": inst.migration_id or None}


def migration_doc(mig) -> dict:
    return {"id": mig.id, "instance_uuid": mig.instance_uuid,
            "source_compute": mig.source_compute, "dest_compute": mig.dest_compute,
            "source_node": mig.source_compute, "dest_node": mig.dest_compute,
            "status": mig.status, "migration_type": mig.migration_type,
            "old_flavor": mig.old_flavor.name, "new_flavor": mig.new_flavor.name,
            "created_at": iso(mig.created_at), "updated_at": iso(mig.updated_at),
            "reason": mig.reason or None}


def host_doc(h) -> dict:
    return {"name": h.name, "driver": h.driver, "up": h.up, "vcpus": h.vcpus,
            "memory_mb": h.memory_mb, "disk_gb": h.disk_gb, "vcpus_used": h.vcpus_used,
            "memory_mb_used": h.memory_mb_used, "disk_gb_used": h.disk_gb_used,
            "vcpus_limit": h.limit.vcpus, "memory_mb_limit": h.limit.memory_mb,
            "disk_gb_limit": h.limit.disk_gb}


class Out:
    """Human tables on stdout (rich), or JSON documents with --json."""

    def __init__(self, json_mode: bool):
        self.json = json_mode
        self._console = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console()
        return self._console

    def doc(self, doc, title: str = "") -> None:
        if self.json:
            sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
            return
        from rich.table import Table
        table = Table(title=title, show_header=False)
        for k, v in doc.items():
            table.add_row(str(k), "" if v is None else str(v))
        self.console.print(table)

    def table(self, rows: list[dict], title: str, columns: list[str]) -> None:
        if self.json:
            sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
            return
        from rich.table import Table
        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
        self.console.print(table)

    def line(self, text: str) -> None:
        if not self.json:
            self.console.print(text)


# --------------------------------------------------------------------------- arguments

COMMANDS = {
    "up": "start a local Ray (or join --ray-address), the host actors and the controller",
    "down": "stop the actors and the Ray that `up` started; logs stay",
    "boot": "spawn an instance",
    "resize": "resize an instance to another flavor; waits for VERIFY_RESIZE",
    "migrate": "cold-migrate an instance (same flavor, another host)",
    "confirm": "confirm a resize waiting in VERIFY_RESIZE",
    "revert": "revert a resize waiting in VERIFY_RESIZE",
    "stop": "power an instance off (clean shutdown, then hard); a stopped one stays so",
    "start": "power an instance on; a running one stays so",
    "reboot": "reboot a running instance (--hard: reset)",
    "delete": "delete an instance (confirms or rolls back a resize first); holds nothing",
    "show": "show one instance",
    "list": "list instances, migrations or hosts",
    "events": "print the logs (offline)",
    "audit": "check the invariants over the logs (offline, no cluster needed)",
    "clouds-yaml": "print the clouds.yaml entry (cloud `vmresize`) for the running API",
    "password-hash": "read a password on stdin, print its salted hash for api.users",
    "simulate": "run the deterministic simulator",
    "demo": "a local cluster of fake hosts: boot, resize, confirm, revert, stop, start, "
            "delete, a crash, an audit",
}


def _globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument("--config", default=d(None), metavar="PATH",
                        help="cluster.yaml (default ./cluster.yaml)")
    parser.add_argument("--state-dir", default=d(None), metavar="DIR",
                        help="where the logs live (overrides state_dir)")
    parser.add_argument("--json", action="store_true", default=d(False),
                        help="machine output: one JSON document, or JSON lines")
    parser.add_argument("--ray-address", default=d(None), metavar="ADDR",
                        help="join this Ray cluster instead of a local one")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(f"{self.prog.split(' ', 1)[-1] if ' ' in self.prog else 'arguments'}"
                       f": {message}", EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmresize", description="Resize and cold-migrate virtual "
                     "machines across compute hosts: an event-sourced actor system.",
                     epilog="commands: " + ", ".join(COMMANDS))
    _globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    _globals(common, suppress=True)
    p = {name: sub.add_parser(name, help=text, parents=[common], description=text)
         for name, text in COMMANDS.items()}
    p["boot"].add_argument("name")
    p["boot"].add_argument("--flavor", required=True)
    p["boot"].add_argument("--host")
    p["boot"].add_argument("--stopped", action="store_true")
    p["resize"].add_argument("name")
    p["resize"].add_argument("flavor")
    for name in ("resize", "migrate"):
        if name == "migrate":
            p[name].add_argument("name")
        p[name].add_argument("--host")
        p[name].add_argument("--no-wait", action="store_true")
        p[name].add_argument("--timeout", type=float, default=600.0,
                             help="seconds to wait (default 600)")
    for name in ("confirm", "revert", "show", "stop", "start", "reboot", "delete"):
        p[name].add_argument("name")
    p["reboot"].add_argument("--hard", action="store_true")
    p["list"].add_argument("what", choices=["instances", "migrations", "hosts"])
    p["events"].add_argument("--host")
    p["events"].add_argument("--instance", metavar="NAME")
    p["events"].add_argument("--from", dest="start", type=int, default=0, metavar="N")
    p["events"].add_argument("--follow", action="store_true")
    p["events"].add_argument("--request", metavar="ID",
                             help="the events one request caused (e.g. an HTTP "
                                  "x-openstack-request-id)")
    p["audit"].add_argument(
        "--as-of", metavar="HOST:OFFSET|ISO-TIME",
        help="audit a consistent cut: that record and every record it depends on, or "
             "every record at or before that time (a bare offset is refused: offsets "
             "count each host's log on its own)")
    s = p["simulate"]
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--hosts", type=int, default=4)
    s.add_argument("--instances", type=int, default=20)
    s.add_argument("--operations", type=int, default=200)
    s.add_argument("--faults", default=",".join(
        ("crash", "drop", "duplicate", "reorder", "delay", "stale", "driver",
         "power_loss", "torn_write", "disk_full", "io_error", "corrupt_snapshot")))
    s.add_argument("--no-resend", action="store_true",
                   help="a restarted host finishes its open steps with no resend")
    s.add_argument("--plot", metavar="FILE")
    p["demo"].add_argument("--keep", action="store_true", help="leave the state dir as is")
    p["up"].add_argument("--api-listen", metavar="HOST:PORT",
                         help="serve the compute API here (overrides api.listen; "
                              "\"\" turns it off)")
    p["clouds-yaml"].add_argument("--user", metavar="NAME",
                                  help="with api.auth keystone: the user to write in")
    return parser


def _config(args, required: bool = True) -> ClusterConfig | None:
    path = args.config or "cluster.yaml"
    if not args.config and not Path(path).exists() and not required:
        return None
    try:
        cfg = load(path, args.state_dir)
        listen = getattr(args, "api_listen", None)
        if listen is not None:
            cfg = with_api_listen(cfg, listen)
        return cfg
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


def _state_dir(args, cfg: ClusterConfig | None) -> str:
    if args.state_dir:
        return str(Path(args.state_dir).resolve())
    if cfg is not None:
        return cfg.state_dir
    raise CliError("--state-dir: needed when there is no ./cluster.yaml", EXIT_BAD_INPUT)


# --------------------------------------------------------------------------- commands

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return EXIT_BAD_INPUT
        from vmresize.cli import commands as cli_commands
        handler = getattr(cli_commands, "cmd_" + args.command.replace("-", "_"))
        return handler(args, Out(args.json))
    except CliError as exc:
        _error(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_FAILED


def _error(message: str) -> None:
    sys.stderr.write(f"vmresize: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
