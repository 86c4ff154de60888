"""`vmresize simulate`: run the deterministic simulator, show progress and a summary,
print JSON for programs, and draw the timeline as an SVG with `--plot`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import msgspec

from vmresize.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, CliError, _config
from vmresize.config import default

MARKER = "sim-meta.json"
LIMITS = {"hosts": 10_000, "instances": 1_000_000, "operations": 10_000_000}


def _check_args(args) -> tuple[str, ...]:
    from vmresize.sim.simulator import FAULT_KINDS
    for name, top in LIMITS.items():
        value = getattr(args, name)
        if not 1 <= value <= top:
            raise CliError(f"--{name}: expected 1 to {top}, got {value}", EXIT_BAD_INPUT)
    if args.seed < 0:
        raise CliError(f"--seed: expected an int >= 0, got {args.seed}", EXIT_BAD_INPUT)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULT_KINDS]
    if unknown:
        raise CliError(f"--faults: unknown fault {unknown[0]!r} (known: "
                       f"{','.join(FAULT_KINDS)})", EXIT_BAD_INPUT)
    return faults


def _state_dir_for(args, cfg) -> Path:
    state = Path(args.state_dir or cfg.state_dir).resolve()
    if state.exists() and any(state.iterdir()) and not (state / MARKER).exists():
        raise CliError(f"--state-dir: {state} holds data that `simulate` did not write; "
                       f"give an empty or simulator directory", EXIT_BAD_INPUT)
    return state


def reproduce_command(args, faults) -> str:
    parts = ["vmresize", "simulate", "--seed", str(args.seed), "--hosts", str(args.hosts),
             "--instances", str(args.instances), "--operations", str(args.operations),
             "--faults", ",".join(faults)]
    if getattr(args, "no_resend", False):
        parts.append("--no-resend")
    if args.config:
        parts[1:1] = ["--config", args.config]
    return shlex.join(parts)


def run_simulate(args, out) -> int:
    from vmresize.sim.simulator import SimConfig, SimResult, Simulator, _exception
    faults = _check_args(args)
    cfg = _config(args, required=False) or default(args.state_dir)
    state = _state_dir_for(args, cfg)
    sim_cfg = SimConfig(seed=args.seed, hosts=args.hosts, instances=args.instances,
                        operations=args.operations, faults=faults,
                        resend=not args.no_resend)
    command = reproduce_command(args, faults)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    console = Console(stderr=True)
    sim = None
    try:
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(f"simulate seed {args.seed}", total=args.operations)
            sim = Simulator(cfg, sim_cfg, state,
                            progress=lambda done, total: bar.update(task, completed=done))
            result = sim.run()
        state.mkdir(parents=True, exist_ok=True)
        (state / MARKER).write_text(msgspec.json.encode(sim_cfg).decode())
    except Exception as exc:    # a bug of the simulator itself: still a reproducible failure
        result = SimResult(seed=args.seed, operations=0, resizes_finished=0,
                           resizes_failed=0, crashes=0, violations=1, digest="",
                           wall_s=0.0, events=0, faults={},
                           violation_list=[_exception("the simulator raised", exc)])
    result.command = command
    _summary(console, result)
    if args.plot and sim is not None:
        Path(args.plot).write_text(svg_timeline(sim.timeline, result))
        console.print(f"timeline drawn in {args.plot}")
    if out.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    if result.violations:
        sys.stderr.write(f"vmresize: error: {result.violations} violation(s) with seed "
                         f"{args.seed}; reproduce with: {result.command}\n")
        return EXIT_FAILED
    return EXIT_OK


def _summary(console, r) -> None:
    from rich.table import Table
    table = Table(title=f"simulation, seed {r.seed}", show_header=False)
    for key in ("operations", "resizes_finished", "resizes_failed", "crashes", "events",
                "violations", "digest", "wall_s", "virtual_s", "resizes_per_s",
                "events_per_s"):
        table.add_row(key, str(getattr(r, key)))
    table.add_row("faults", ", ".join(f"{k} {v}" for k, v in r.faults.items()))
    hit = [cell for cell, n in r.windows.items() if n]
    table.add_row("crash windows hit", f"{len(hit)} of {len(r.windows)}")
    table.add_row("reached", ", ".join(f"{k} {v}" for k, v in r.reached.items()))
    console.print(table)
    for line in r.violation_list:
        console.print(f"[red]{line}[/]")


def svg_timeline(points, result, width: int = 800, height: int = 300) -> str:
    """Open migrations and memory used (% of all hosts' limits) over virtual time."""
    import xml.etree.ElementTree as ET
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(width),
                     height=str(height + 40), viewBox=f"0 0 {width} {height + 40}")
    ET.SubElement(svg, "rect", width="100%", height="100%", fill="white")
    t_max = max((p[0] for p in points), default=1) or 1
    m_max = max((p[1] for p in points), default=1) or 1
    series = [(1, m_max, "#d62728", f"open migrations (max {m_max})"),
              (2, 100.0, "#1f77b4", "memory used, % of limit")]
    for idx, top, color, label in series:
        coords = " ".join(f"{40 + (width - 60) * p[0] / t_max:.1f},"
                          f"{height - (height - 20) * p[idx] / top:.1f}" for p in points)
        ET.SubElement(svg, "polyline", points=coords, fill="none", stroke=color)
        text = ET.SubElement(svg, "text", x=str(50 + 330 * (idx - 1)), y=str(height + 25),
                             fill=color, style="font: 13px sans-serif")
        text.text = label
    title = ET.SubElement(svg, "text", x="40", y="15", style="font: 13px sans-serif")
    title.text = (f"seed {result.seed}: {result.operations} operations, {result.crashes} "
                  f"crashes, {result.violations} violations, {t_max:.0f} s virtual")
    return ET.tostring(svg, encoding="unicode")
