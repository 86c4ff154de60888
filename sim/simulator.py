"""The deterministic simulator: the real Host shells and Controller in one process.

A virtual clock (sim/vclock.py), one seeded `random.Random`, and a transport that
delays, reorders, duplicates and drops messages. Hosts crash after any appended event
(or inside a driver call, through the FakeDriver's fault plan) and restart from their
logs; the controller crashes and restarts from its log too. After every appended event
the auditor's incremental checks run (capacity, version chains, state machine); at the
end every fault is healed, every migration must reach a final state (liveness), and the
whole state directory is audited as `vmresize audit` would. Same seed and arguments,
same history, same `digest`.

Each host's log and snapshots live on its own `SimDisk`: a host crash is a crash of that
disk (unsynced writes lost, the last one maybe torn), and the restarted host reopens its
log through the real recovery path. Storage faults: power loss and torn writes (a crash
inside an append's fsync), a full disk (the host refuses new work until space returns),
an fsync I/O error (the log stops: the host crashes and restarts), a corrupt snapshot
(the host rebuilds from its log). At the end every disk is synced and exported to the
state directory.

The oracles, beside the auditor's checks, liveness and the drivers' state: every reply
the controller received is backed by identical records in that host's log after every
restart and at the end; every driver call is made while the host's durable log holds an
open intent of its instance; no driver shrank a disk; no exception escaped; every stale
command (fault `stale`: a command of an earlier moment, under a new command id, as a
controller incarnation that missed its own replacement would send it) is refused,
logging nothing, since the instance moved past the version it expects. With
`resend=False` the controller's resends of a command whose intent a restarted host found
open are not delivered: that host must finish the step by itself.

Crashes are counted per (step, window): right after an intent is appended
(`after_intent`), after a driver call of the step returned and before its outcome
(`after_effect`), right after the outcome (`after_outcome`). Each run aims a few crashes
at one window chosen by its seed, so a sweep of seeds hits every window of every step.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import random
import shlex
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import msgspec

from vmresize.protocol import commands as c
from vmresize.config import ClusterConfig
from vmresize.actors.controller import (Controller, HostEntry, HostUnavailable,
                                        OperationError)
from vmresize.actors.host import HostPolicy
from vmresize.actors.shell import HostEventLog, HostShell
from vmresize.sim.vclock import VirtualLoop
from vmresize.drivers.fake import (Fault, FakeDriver, FakeStorage, FaultPlan, HostCrashed,
                                   Latency)
from vmresize.events import schema as ev
from vmresize.events.codec import encode
from vmresize.events.disk import SimDisk
from vmresize.events.log import _HEADER, DiskFull, LogFailed, SegmentLog
from vmresize.offline.audit import audit
from vmresize.projections.audit import _Checker
from vmresize.projections.fold import FoldState
from vmresize.protocol.states import RUNNING, MigrationStatus as MS, Step
from vmresize.protocol.table import INTENTS, STEP_OF_INTENT, STEPS

FAULT_KINDS = ("crash", "drop", "duplicate", "reorder", "delay", "stale", "driver",
               "power_loss", "torn_write", "disk_full", "io_error", "corrupt_snapshot")
WINDOWS = ("after_intent", "after_effect", "after_outcome")
CRASH_STEPS = tuple(dict.fromkeys(str(r.step) for r in STEPS.values() if r.intent))
CELLS = tuple(f"{step}/{w}" for step in CRASH_STEPS for w in WINDOWS)
REACHED = ("compensation", "abandoned", "released_dest", "released_source", "restored",
           "snapshots_rebuilt", "disk_full_refusals", "own_recoveries",
           "abandoned_findings")
# Driver calls that keep failing on a host (each tuple together): cleanups the controller
# abandons in the end, and a migration whose rollback fails too (the source released).
STUCK_CALLS = (("confirm_migration",), ("revert_migration_dest",),
               ("finish_revert_migration",), ("destroy",),
               ("migrate_disk_and_power_off", "finish_revert_migration"))
PROBE_PREFIX = ".vmresize-probe-"
SIM_ROOT = "/vmresize-sim"      # where the simulated disks keep a host's files
HEAL_S = 3600.0              # virtual seconds to settle everything once faults stop
VIRTUAL_LIMIT_S = 2 * HEAL_S    # a whole run, plus this per operation: stuck beyond it
VIRTUAL_S_PER_OPERATION = 10.0
HISTORY = 1000              # lines of `Simulator.history` kept
KEEP_ENDED = 1024           # ended migrations the checks keep (as many as the controller)
KEEP_DELETED = 128          # deleted instances the checks keep (a host keeps 16)
EPOCH = 1_767_225_600.0     # 2026-01-01T00:00:00Z: virtual time 0 on the wall clock


class SimConfig(msgspec.Struct, frozen=True):
    seed: int
    hosts: int = 4
    instances: int = 20
    operations: int = 200
    faults: tuple[str, ...] = FAULT_KINDS
    concurrency: int = 32
    crash_p: float = 0.002          # per appended event, a host crash right after it
    controller_crash_p: float = 0.0003
    drop_p: float = 0.01
    duplicate_p: float = 0.01
    stale_p: float = 0.02           # per command, an earlier one arrives again, new id
    driver_fail_p: float = 0.01
    driver_hang_p: float = 0.002
    driver_crash_p: float = 0.002
    power_loss_p: float = 0.001     # per fsync of a log segment, a power cut inside it
    torn_write_p: float = 0.001
    disk_full_p: float = 0.002      # per append, the disk fills up for a few seconds
    io_error_p: float = 0.001       # per append, its fsync fails with EIO
    corrupt_snapshot_p: float = 0.5     # per host crash, its newest snapshot is damaged
    aimed_crash_p: float = 0.8      # a crash in a window this seed aims at (twice at most)
    # Per host, one cleanup driver call fails many times: the controller abandons it and
    # the audit reports what it left (the test sweeps set 0.3). Off by default, so that
    # the logs of a plain `vmresize simulate` pass `vmresize audit`.
    stuck_p: float = 0.0
    stuck_calls: int = 12           # ... in a row: more than the controller's attempts
    snapshot_every: int = 48        # a host snapshots after this many events
    shared_pairs: bool = True       # odd hosts share storage with the next one
    resend: bool = True             # False: no resend reaches a restarted host's open intent


class SimResult(msgspec.Struct):
    seed: int
    operations: int
    resizes_finished: int
    resizes_failed: int
    crashes: int
    violations: int
    digest: str
    wall_s: float
    events: int
    faults: dict[str, int]
    virtual_s: float = 0.0
    resizes_per_s: float = 0.0
    events_per_s: float = 0.0
    violation_list: list[str] = []
    command: str = ""
    windows: dict[str, int] = {}    # host crashes per "step/window" (CELLS)
    reached: dict[str, int] = {}    # how often each path of REACHED was taken
    aimed_at: list[str] = []        # the windows this seed aimed crashes at


def reproduce(cfg: SimConfig) -> str:
    """The command line that runs `cfg` again (SimConfig fields the CLI has no option
    for are shown after it as a comment)."""
    parts = ["vmresize", "simulate", "--seed", str(cfg.seed), "--hosts", str(cfg.hosts),
             "--instances", str(cfg.instances), "--operations", str(cfg.operations),
             "--faults", ",".join(cfg.faults)]
    if not cfg.resend:
        parts.append("--no-resend")
    line = shlex.join(parts)
    defaults = SimConfig(seed=cfg.seed)
    extra = {f: getattr(cfg, f) for f in cfg.__struct_fields__
             if f not in ("seed", "hosts", "instances", "operations", "faults", "resend")
             and getattr(cfg, f) != getattr(defaults, f)}
    return line + (f"   # SimConfig options: {extra}" if extra else "")


class _Host:
    """One simulated compute host: its disk and driver survive crashes; its log (opened
    again from the disk), its shell and its tasks do not."""

    def __init__(self, name: str, disk: SimDisk, driver: FakeDriver, spill_dir: str):
        self.name = name
        self.disk = disk
        self.base = f"{SIM_ROOT}/{name}"
        self.log_dir = f"{self.base}/hosts/{name}/log"
        self.snapshot_dir = f"{self.base}/hosts/{name}/snapshots"
        self.raw_log: SegmentLog | None = None
        self.driver = driver
        self.shell: HostShell | None = None
        self.tasks: dict[asyncio.Future, None] = {}    # insertion order: deterministic
        self.generation = 0
        self.steps: dict[str, str] = {}     # command id -> step of its intent
        self.acked = _Acked(spill_dir)      # the records the controller was told of
        self.found_open: set[str] = set()   # intents open when this incarnation started
        self.resumed: set[str] = set()      # ... that it resumed by itself
        self.full_until = -1.0
        self.durable_pos = 0                # records of the durable log counted so far
        self.durable_count = 0
        self.durable_seg = ""
        self.observed = 0                   # records of the log the checks have seen


class _TappedLog(HostEventLog):
    """A host's log that reports every append to the simulator (checks, digest, crash
    points between events) and injects the disk faults of appends."""

    def __init__(self, sim: "Simulator", host: _Host, raw, clock):
        super().__init__(raw, host.name, clock)
        self.sim = sim
        self.sim_host = host
        self.generation = host.generation

    async def append(self, events: list):
        sim, host = self.sim, self.sim_host
        if self.generation != host.generation:
            raise HostCrashed()     # a task of a crashed incarnation: never append
        serving = host.shell is not None
        if serving:
            sim.disk_faults(host)
        try:
            envs = await super().append(events)
        except LogFailed:           # fail-stop: the host stops acknowledging and restarts
            sim.crash_host(host.name, "io_error")
            raise HostCrashed() from None
        except DiskFull:
            sim.reached["disk_full_refusals"] += 1
            raise
        sim.observe(envs)
        host.observed = envs[-1].offset + 1 if envs else host.observed
        window = sim.note_steps(host, envs)
        # No crash while the host is still starting (its shell is not serving yet).
        if serving and sim.crash_roll(window):
            sim.crash_host(host.name, "crash", window)
            raise HostCrashed()
        return envs


def _intent_first(sim: "Simulator", host: _Host) -> "_IntentFirst":
    """The wrapper, in a class named as the driver's (a host logs its driver's class)."""
    cls = type(type(host.driver).__name__, (_IntentFirst,), {})
    return cls(sim, host)


class _IntentFirst:
    """The FakeDriver as the shell sees it: every call first checks that the host's
    durable log holds an open intent of the call's instance (a breach is a violation);
    after a call, the host may crash before the step's outcome is logged."""

    ASYNC = ("spawn", "power_on", "power_off", "reboot", "create_probe", "probe_exists",
             "remove_probe", "migrate_disk_and_power_off", "finish_migration",
             "confirm_migration", "revert_migration_dest", "finish_revert_migration",
             "destroy", "disk_info")

    def __init__(self, sim: "Simulator", host: _Host):
        self._sim, self._host = sim, host

    def __getattr__(self, name):
        attr = getattr(self._host.driver, name)
        if name not in self.ASYNC:
            return attr

        def call(*args, **kw):
            step = self._sim.check_intent(self._host, name, args[0] if args else "")
            return self._after(attr(*args, **kw), step)
        return call

    async def _after(self, coro, step: str):
        try:
            return await coro
        finally:
            sim, host = self._sim, self._host
            if step and host.shell is not None and sim.crash_roll(f"{step}/after_effect"):
                sim.crash_host(host.name, "crash", f"{step}/after_effect")
                raise HostCrashed()


class Simulator:
    def __init__(self, cluster: ClusterConfig, cfg: SimConfig, state_dir: str | Path,
                 *, progress: Callable[[int, int], None] | None = None,
                 shell_class=HostShell, controller_class=Controller):
        self.cluster = cluster
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.rng = random.Random(cfg.seed)
        self.progress = progress
        self.shell_class = shell_class
        self.controller_class = controller_class
        self.faults_on = True
        self.injected: dict[str, int] = {k: 0 for k in FAULT_KINDS}
        self.hash = hashlib.sha256()
        # Its end-state checks are the final audit's (of the logs): it keeps none of
        # their bookkeeping, and of ended migrations only the last KEEP_ENDED, of deleted
        # instances the last KEEP_DELETED.
        self.checker = _Checker(end_state=False, keep_ended=KEEP_ENDED,
                                keep_deleted=KEEP_DELETED,
                                on_forget=self._forgot_migration)
        self.events = 0
        self.hosts: dict[str, _Host] = {}
        self.controller: Controller | None = None
        self.controller_tasks: dict[asyncio.Future, None] = {}
        self.controller_generation = 0
        self.controller_ready: asyncio.Event | None = None
        self.done_ops = 0
        self.finished = 0
        self.failed = 0
        self.crashes = 0
        # What happened lately (crashes, refusals), for a person debugging a seed.
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY)
        self.timeline: list[tuple[float, int, float]] = []
        self.unexpected: list[str] = []
        self.breaches: list[str] = []       # what the oracles found as it happened
        # Instances and migrations with an abandoned cleanup: what it leaves behind is
        # for an operator, and findings about them are expected, not violations.
        self.abandoned_ids: set[str] = set()
        self._excused: set[str] | None = None      # ... with their migrations, at the end
        self.windows: dict[str, int] = {cell: 0 for cell in CELLS}
        self.reached: dict[str, int] = {k: 0 for k in REACHED}
        # Three windows a third of the table apart: a sweep of N seeds aims at each
        # window about 3 N / len(CELLS) times.
        self.aimed_at = [CELLS[(cfg.seed + k * len(CELLS) // 3) % len(CELLS)]
                         for k in range(3)]
        self.sample_every = max(1, cfg.operations // 100)
        # Commands delivered lately, which the `stale` fault sends again.
        self.recent: collections.deque = collections.deque(maxlen=64)

    # ------------------------------------------------------------------ randomness

    def roll(self, kind: str, p: float) -> bool:
        if not self.faults_on or kind not in self.cfg.faults or p <= 0:
            return False
        if self.rng.random() < p:
            self.injected[kind] += 1
            return True
        return False

    def crash_roll(self, window: str) -> bool:
        """A host crash right here? Likelier in the window this seed aims at."""
        if window in self.aimed_at and self.windows[window] < 2 \
                and self.roll("crash", self.cfg.aimed_crash_p):
            return True
        return self.roll("crash", self.cfg.crash_p)

    def new_id(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"

    def clock(self) -> float:
        return EPOCH + asyncio.get_running_loop().time()

    # ------------------------------------------------------------------ observation

    def observe(self, envs) -> None:
        for env in envs:
            self.hash.update(encode(env))
            self.checker.feed(env)
            self.events += 1
            if self.events % self.sample_every == 0:
                self._sample(env.wall_time - EPOCH)

    def note_steps(self, host: _Host, envs) -> str:
        """Keep track of which step each open intent belongs to; return the crash window
        the host is in right after these events ("" if none)."""
        window = ""
        for env in envs:
            e = env.event
            kind = type(e)
            if kind is ev.ReleaseStarted or kind is ev.RestoreStarted:
                self.reached["compensation"] += 1
            elif kind is ev.ClaimReleased:
                self.reached["released_dest"] += 1
            elif kind is ev.Failed and e.step == Step.MIGRATE:
                self.reached["released_source"] += 1    # the source lets go by itself
            elif kind is ev.SourceRestored:
                self.reached["restored"] += 1
            if getattr(e, "closes", ""):
                self.reached["abandoned"] += 1
                self.abandoned_ids.update(
                    i for i in (e.instance_uuid, getattr(e, "migration_id", "")) if i)
            cid = e.command_id
            closed = host.steps.pop(getattr(e, "closes", "") or cid, None)
            if kind in INTENTS and (kind is not ev.Claimed or e.probe_pending):
                host.steps[cid] = window_step = str(STEP_OF_INTENT[kind].step)
                window = f"{window_step}/after_intent"
            elif closed is not None:
                window = f"{closed}/after_outcome"
        return window

    def _sample(self, t: float) -> None:
        """One point of the timeline `--plot` draws: open migrations, memory used."""
        p = self.checker.p
        open_migrations = sum(1 for m in p.migrations.values() if not m.final)
        used = sum(l.used.memory_mb for l in p.ledgers.values())
        limit = sum(l.limit.memory_mb for l in p.ledgers.values()) or 1
        self.timeline.append((round(t, 3), open_migrations, round(100 * used / limit, 2)))

    # ------------------------------------------------------------------ hosts

    def _policy(self) -> tuple[HostPolicy, object]:
        first = self.cluster.hosts[0]
        return first, self.cluster.limit(first)

    def build_hosts(self) -> None:
        first, limit = self._policy()
        storage = None
        # The disks keep their files' durable bytes in unlinked files in the state
        # directory (which nothing else reads until the disks are exported there).
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, self.cfg.hosts + 1):
            name = f"sim-{i}"
            disk = SimDisk(random.Random(self.rng.getrandbits(32)),
                           spill_dir=str(self.state_dir))
            if not (self.cfg.shared_pairs and i % 2 == 0 and storage is not None):
                storage = FakeStorage()     # odd hosts start a pool, even ones share it
            plan = FaultPlan(seed=self.rng.getrandbits(32))
            if "driver" in self.cfg.faults:
                plan.fail_p = self.cfg.driver_fail_p
                plan.hang_p = self.cfg.driver_hang_p
                if self.rng.random() < self.cfg.stuck_p:
                    # A cleanup that keeps failing: the controller ends up abandoning it.
                    methods = self.rng.choice(STUCK_CALLS)
                    first_call = self.rng.randint(1, 3)
                    plan.exact = [Fault(method, "fail", call=first_call + i)
                                  for method in methods
                                  for i in range(self.cfg.stuck_calls)]
            if "crash" in self.cfg.faults:
                plan.crash_p = self.cfg.driver_crash_p
            driver = FakeDriver(name, first.capacity, storage=storage, faults=plan,
                                latency=Latency(0.05, 0.2),
                                on_crash=lambda n=name: self._driver_crash(n),
                                rng=random.Random(self.rng.getrandbits(32)))
            self.hosts[name] = host = _Host(name, disk, driver, str(self.state_dir))
            disk.on_fsync = lambda path, h=host: self._in_fsync(h, path)

    def _driver_crash(self, name: str) -> None:
        self.crash_host(name, "driver crash")
        raise HostCrashed()

    def _host_task(self, host: _Host, coro):
        task = asyncio.ensure_future(coro)
        host.tasks[task] = None
        task.add_done_callback(lambda t: host.tasks.pop(t, None))
        return task

    async def start_host(self, name: str) -> None:
        """Open the host's log from its disk (the real recovery path: a torn tail is
        cut), check that it still backs every reply the controller got, start a shell."""
        host = self.hosts[name]
        first, limit = self._policy()
        host.raw_log = SegmentLog(host.log_dir, disk=host.disk, fsync=True)
        host.durable_pos = host.durable_count = 0
        host.durable_seg = ""
        self.check_acked(host, "after a restart" if host.generation else "at start")
        log = _TappedLog(self, host, host.raw_log, self.clock)
        # Records an append wrote but a crash cut short of acknowledging may survive it:
        # they are in the log, so the checks and the digest see them now.
        host.observed = min(host.observed, host.raw_log.next_offset)
        survivors = list(log.replay(host.observed))
        self.observe(survivors)
        self.note_steps(host, survivors)
        host.observed = host.raw_log.next_offset
        shell = self.shell_class(
            HostPolicy(name=name, limit=limit), log, _intent_first(self, host),
            capacity=first.capacity, step_timeout_s=self.cluster.options.step_timeout_s,
            spawn_task=lambda coro, h=host: self._host_task(h, coro),
            snapshot_dir=host.snapshot_dir, snapshot_every=self.cfg.snapshot_every,
            disk=host.disk)
        await shell.start()
        host.found_open = set(shell.open_intents)
        # What the shell set going by itself (the simulator peeks at its in-flight map).
        host.resumed = host.found_open & set(shell._inflight)
        self.reached["own_recoveries"] += len(host.resumed)
        if host.found_open - host.resumed:
            self.breaches.append(
                f"recovery: {name} started with open intents it did not resume: "
                f"{sorted(host.found_open - host.resumed)[:3]}")
        host.shell = shell

    def check_acked(self, host: _Host, when: str) -> None:
        """The oracle of durability: every envelope the controller was given by this
        host is in the host's log, byte for byte."""
        acked = host.acked
        if acked.first is None:
            return
        expect = acked.from_offset(acked.first)
        offset, digest = next(expect, (None, b""))
        at = None
        for at, record in host.raw_log.read(acked.first):   # streamed: the log is long
            if offset is None:
                return
            if at < offset:
                continue
            if at > offset or _digest(record) != digest:
                break
            offset, digest = next(expect, (None, b""))
        else:
            if offset is None:
                return
        self.breaches.append(
            f"durability: {host.name} offset {offset}, which the controller was told "
            f"of, is {'different' if at == offset else 'gone'} {when}")

    def _in_fsync(self, host: _Host, path: str) -> None:
        """A power cut inside the fsync of an append: its write may be lost or torn."""
        if host.shell is None or not path.endswith(".seg"):
            return
        if self.roll("power_loss", self.cfg.power_loss_p):
            self.crash_host(host.name, "power_loss")
            raise HostCrashed()
        if self.roll("torn_write", self.cfg.torn_write_p):
            self.crash_host(host.name, "torn_write")
            raise HostCrashed()

    def disk_faults(self, host: _Host) -> None:
        """Before an append: the disk may fill up for a while, or the fsync fail."""
        loop = asyncio.get_running_loop()
        if host.full_until < loop.time() and self.roll("disk_full", self.cfg.disk_full_p):
            host.disk.set_free_bytes(0)
            host.full_until = loop.time() + 1 + self.rng.random() * 9
            loop.call_later(host.full_until - loop.time(), host.disk.set_free_bytes, None)
        if self.roll("io_error", self.cfg.io_error_p):
            host.disk.fail_fsync(1)

    def durable_next(self, host: _Host) -> int:
        """The offset after the last record a power cut now would leave in the log."""
        disk = host.disk
        segs = sorted(n for n in disk.list_dir(host.log_dir) if n.endswith(".seg"))
        if not segs:
            return 0
        seg = segs[-1]
        if seg != host.durable_seg:
            host.durable_seg, host.durable_pos, host.durable_count = seg, 0, 0
        base = host.durable_pos             # what was counted is not read again
        data = disk.durable_bytes(f"{host.log_dir}/{seg}", base)
        pos, count = 0, host.durable_count
        while pos + _HEADER.size <= len(data):
            size, _ = _HEADER.unpack_from(data, pos)
            if pos + _HEADER.size + size > len(data):
                break
            pos += _HEADER.size + size
            count += 1
        host.durable_pos, host.durable_count = base + pos, count
        return int(seg[:20]) + count

    def check_intent(self, host: _Host, method: str, arg) -> str:
        """The driver oracle: `method` is called while the host's durable log holds an
        open intent of the instance it is about. Returns that intent's step."""
        shell = host.shell
        if shell is None:
            return ""
        uuid = getattr(arg, "uuid", arg)
        if isinstance(uuid, str) and uuid.startswith(PROBE_PREFIX):
            mig = shell.state.migrations.get(uuid.removeprefix(PROBE_PREFIX))
            uuid = mig.instance_uuid if mig is not None else uuid
        cid = shell.busy.get(uuid)
        offset = shell.open_intents.get(cid) if cid else None
        if offset is None or offset >= self.durable_next(host):
            self.breaches.append(
                f"intent-first: {host.name}.{method}({uuid}) called while the durable "
                f"log holds no open intent of it"
                + ("" if offset is None else f" (intent at {offset} not synced)"))
            return ""
        return host.steps.get(cid, "")

    def crash_host(self, name: str, kind: str = "crash", window: str = "") -> None:
        """The host's process dies and its disk loses what was not synced (a power loss
        keeps none of it; other crashes a random prefix, the last write maybe torn)."""
        host = self.hosts[name]
        if host.shell is None:
            return
        self.crashes += 1
        if window:
            self.windows[window] += 1
        self.history.append(f"crash {name} ({kind}{' ' + window if window else ''})")
        host.shell = None
        host.generation += 1
        current = asyncio.current_task()
        for task in list(host.tasks):
            if task is not current:
                task.cancel()
        if kind == "power_loss":
            host.disk.crash(keep_bytes=0, keep_changes=0)
        else:
            host.disk.crash()
        host.disk.set_free_bytes(None)
        host.full_until = -1.0
        self._maybe_corrupt_snapshot(host)
        delay = 1 + self.rng.random() * 10
        asyncio.get_running_loop().call_later(delay, self._restart_soon, name)

    def _maybe_corrupt_snapshot(self, host: _Host) -> None:
        try:
            snaps = sorted(n for n in host.disk.list_dir(host.snapshot_dir)
                           if n.endswith(".snap"))
        except FileNotFoundError:
            return
        if snaps and self.roll("corrupt_snapshot", self.cfg.corrupt_snapshot_p):
            host.disk.corrupt(f"{host.snapshot_dir}/{snaps[-1]}")
            self.reached["snapshots_rebuilt"] += 1

    def _restart_soon(self, name: str) -> None:
        asyncio.ensure_future(self._restart(name))

    async def _restart(self, name: str) -> None:
        host = self.hosts[name]
        if host.shell is not None:
            return
        try:
            await self.start_host(name)
        except (OSError, LogFailed, HostCrashed) as exc:
            # The process died starting (an fsync EIO while its log recovered a torn
            # tail, say): as a supervisor would, start it again a little later.
            self.history.append(f"restart of {name} failed: {exc!r}")
            host.generation += 1
            for task in list(host.tasks):
                task.cancel()
            if host.raw_log is not None:
                try:
                    host.raw_log.close()
                except (OSError, LogFailed):
                    pass
            host.disk.crash()
            asyncio.get_running_loop().call_later(1 + self.rng.random() * 10,
                                                  self._restart_soon, name)

    # ------------------------------------------------------------------ transport

    def _delay(self) -> float:
        d = 0.001
        if "delay" in self.cfg.faults and self.faults_on:
            d += self.rng.expovariate(1 / 0.02)
            self.injected["delay"] += 1
        if self.roll("reorder", 0.05):
            d += self.rng.random() * 2.0
        return d

    async def call(self, host_name: str, cmd: c.Command, timeout_s: float):
        if self.roll("drop", self.cfg.drop_p):
            await asyncio.sleep(timeout_s)
            raise HostUnavailable(f"{host_name}: request lost")
        await asyncio.sleep(self._delay())
        host = self.hosts[host_name]
        shell = host.shell
        if shell is None:
            await asyncio.sleep(0.5)
            raise HostUnavailable(f"{host_name} is down")
        if not self._deliverable(host, cmd.command_id):
            return await self._own_outcome(host, cmd.command_id, timeout_s)
        if self.roll("duplicate", self.cfg.duplicate_p):
            self._host_task(host, self._deliver_again(host, cmd))
        self._maybe_stale(host)
        self.recent.append((host_name, cmd))
        task = self._host_task(host, shell.handle(cmd))
        try:
            reply = await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            raise HostUnavailable(f"{host_name}: no reply in {timeout_s} s") from None
        except HostCrashed:
            raise HostUnavailable(f"{host_name} crashed") from None
        except asyncio.CancelledError:
            if task.cancelled() and asyncio.current_task().cancelling() == 0:
                raise HostUnavailable(f"{host_name} crashed") from None
            raise
        return await self._reply(host, reply, timeout_s)

    async def _reply(self, host: _Host, reply, timeout_s: float):
        if self.roll("drop", self.cfg.drop_p):
            await asyncio.sleep(timeout_s)
            raise HostUnavailable(f"{host.name}: reply lost")
        await asyncio.sleep(self._delay())
        self._acknowledged(host, reply.events)
        self._check_closed(host, reply)
        return reply

    def _check_closed(self, host: _Host, reply) -> None:
        """The oracle under the controller's compensation: a host answers a step that
        logged an intent only once the step has its outcome, so the controller never
        plans on a step still under way. A cleanup whose driver failed is the one step
        left open on purpose (the controller retries it, then abandons it)."""
        open_ = {}
        for env in reply.events:
            e = env.event
            if type(e) in INTENTS and (type(e) is not ev.Claimed or e.probe_pending):
                open_[e.command_id] = type(e)
            else:
                open_.pop(getattr(e, "closes", "") or e.command_id, None)
        for cid, intent in open_.items():
            if STEP_OF_INTENT[intent].on_failure == "retry" and reply.retryable:
                continue
            self.breaches.append(f"reply: {host.name} answered {reply.command_id} "
                                 f"with {intent.__name__} of {cid} still open")

    def _acknowledged(self, host: _Host, envs) -> None:
        for env in envs:
            host.acked.add(env.offset, _digest(encode(env)))

    def _deliverable(self, host: _Host, cid: str) -> bool:
        """With `resend` off, a command whose intent this incarnation of the host found
        open at start-up reaches it again only once the host tried to finish it by
        itself and left it open (a cleanup step whose driver failed)."""
        if self.cfg.resend or cid not in host.found_open:
            return True
        return cid in host.resumed and cid not in host.shell._inflight \
            and cid in host.shell.open_intents

    async def _own_outcome(self, host: _Host, cid: str, timeout_s: float):
        """Wait, like a controller reading the host's events, for the outcome the host
        logs by itself; answer as the host would from its log."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            shell = host.shell
            if shell is None:
                raise HostUnavailable(f"{host.name} is down")
            if cid not in shell.open_intents and cid in shell.commands:
                return await self._reply(host, shell._reply_from_log(cid), timeout_s)
            if self._deliverable(host, cid):
                raise HostUnavailable(f"{host.name}: its own recovery of {cid} failed")
            if asyncio.get_running_loop().time() >= deadline:
                raise HostUnavailable(f"{host.name}: no outcome of {cid} in {timeout_s} s")
            await asyncio.sleep(0.5)

    async def _deliver_again(self, host: _Host, cmd: c.Command) -> None:
        await asyncio.sleep(self._delay() * 3)
        shell = host.shell
        if shell is not None and self._deliverable(host, cmd.command_id):
            try:
                await shell.handle(cmd)
            except (HostCrashed, asyncio.CancelledError):
                pass

    def _maybe_stale(self, host: _Host) -> None:
        """Now and then one of the commands this host was sent lately arrives again
        under a new command id, so the host cannot answer it from its log: only the
        version it expects tells the host it is stale."""
        if not (self.faults_on and "stale" in self.cfg.faults and self.cfg.stale_p > 0
                and self.rng.random() < self.cfg.stale_p):
            return
        earlier = [cmd for name, cmd in self.recent if name == host.name]
        if earlier:
            self._host_task(host, self._deliver_stale(host, self.rng.choice(earlier)))

    async def _deliver_stale(self, host: _Host, cmd: c.Command) -> None:
        await asyncio.sleep(self._delay() * 3)
        shell = host.shell
        inst = shell.state.instances.get(cmd.instance_uuid) if shell is not None else None
        if inst is None or inst.version <= cmd.instance_version:
            return      # not stale here (yet): a new command, which no controller sent
        self.injected["stale"] += 1
        stale = msgspec.structs.replace(cmd, command_id=cmd.command_id + ":stale")
        try:
            reply = await shell.handle(stale)
        except (HostCrashed, asyncio.CancelledError):
            return
        if reply.ok or reply.events:
            self.breaches.append(
                f"stale: {host.name} accepted {type(cmd).__name__} {stale.command_id} "
                f"expecting instance version {cmd.instance_version} while at "
                f"{inst.version}: {[type(e.event).__name__ for e in reply.events]}")

    async def events_since(self, host_name: str, offset: int, timeout_s: float,
                           limit: int | None = None) -> list:
        await asyncio.sleep(self._delay())
        host = self.hosts[host_name]
        if host.shell is None:
            await asyncio.sleep(0.5)
            raise HostUnavailable(f"{host_name} is down")
        envs = list(itertools.islice(host.shell.log.replay(offset), limit))
        self._acknowledged(host, envs)
        return envs

    # ------------------------------------------------------------------ controller

    def _controller_task(self, coro):
        task = asyncio.ensure_future(coro)
        self.controller_tasks[task] = None
        task.add_done_callback(lambda t: self.controller_tasks.pop(t, None))
        return task

    async def start_controller(self) -> None:
        o = self.cluster.options
        ctl = self.controller_class(
            log=self.controller_log, transport=self,
            hosts=[HostEntry(h, "fake", self.cluster.hosts[0].capacity, self._policy()[1])
                   for h in self.hosts],
            flavors=self.cluster.all_flavors(),
            options=msgspec.structs.replace(o, cleanup_attempts=8),
            clock=self.clock, sleep=asyncio.sleep, new_id=self.new_id,
            spawn_task=self._controller_task,
            snapshot_dir=str(self.state_dir / "controller" / "snapshots"),
            snapshot_every=max(2000, self.cfg.operations // 4))
        self.controller = ctl
        await ctl.start()
        self.controller_ready.set()

    def crash_controller(self) -> None:
        if self.controller is None:
            return
        self.crashes += 1
        self.history.append("crash controller")
        self.controller = None
        self.controller_generation += 1
        self.controller_ready.clear()
        for task in list(self.controller_tasks):
            task.cancel()
        self._controller_task(self._restart_controller())

    async def _restart_controller(self) -> None:
        await asyncio.sleep(1 + self.rng.random() * 5)
        await self.start_controller()

    async def ask(self, method: str, *args, **kw):
        """Call the controller like a client would: again, with the same request id,
        if the controller crashed meanwhile."""
        kw.setdefault("request_id", self.new_id())
        while True:
            await self.controller_ready.wait()
            ctl = self.controller
            generation = self.controller_generation
            call = asyncio.ensure_future(getattr(ctl, method)(*args, **kw))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
            if generation == self.controller_generation:
                raise AssertionError(f"{method} cancelled without a controller crash")

    # ------------------------------------------------------------------ workload

    async def _boot_all(self) -> list[str]:
        names = [f"vm-{i}" for i in range(1, self.cfg.instances + 1)]
        flavors = self._boot_flavors()
        sem = asyncio.Semaphore(self.cfg.concurrency)
        plan = [(n, self.rng.choice(flavors), self.rng.random() < 0.1) for n in names]

        async def boot(name, flavor, stopped):
            async with sem:
                try:
                    await self.ask("boot", name, flavor, stopped=stopped)
                except OperationError as exc:
                    self.history.append(f"boot {name} refused: {exc}")

        await asyncio.gather(*(boot(*p) for p in plan))
        return names

    def _boot_flavors(self) -> list[str]:
        """Flavors to boot with: the cluster starts at most about 40% full."""
        first, limit = self._policy()
        budget_mb = 0.4 * limit.memory_mb * self.cfg.hosts / self.cfg.instances
        small = self._small_flavors()
        fit = [f for f in small if self.cluster.flavor(f).memory_mb <= budget_mb]
        return fit or small[:1]

    def _small_flavors(self) -> list[str]:
        """Flavors small enough that the cluster stays about half full (so most resizes
        find a host and some do not), smallest first; at least two to resize between."""
        first, limit = self._policy()
        per_host = max(1.0, self.cfg.instances / self.cfg.hosts) * 2
        fl = sorted(self.cluster.all_flavors().values(),
                    key=lambda f: (f.memory_mb, f.root_gb, f.name))
        ok = [f.name for f in fl if f.resources().memory_mb * per_host <= limit.memory_mb
              and f.resources().disk_gb * per_host <= limit.disk_gb]
        return ok if len(ok) >= 2 else [f.name for f in fl[:2]]

    async def _client(self, names: list[str], busy: set[str], budget: list[int]) -> None:
        flavors = self._small_flavors()
        while budget[0] > 0:
            name = self.rng.choice(names)
            if name in busy:
                await asyncio.sleep(0.01)
                continue
            budget[0] -= 1
            busy.add(name)
            try:
                await self._operate(name, flavors)
            finally:
                busy.discard(name)
                self.done_ops += 1
                if self.progress:
                    self.progress(self.done_ops, self.cfg.operations)

    async def _operate(self, name: str, flavors: list[str]) -> None:
        ctl = self.controller or await self._wait_controller()
        try:
            inst = ctl.instance_by_name(name)
        except OperationError:
            await self._reboot_deleted(name)
            return
        mig = ctl.view.migrations.get(inst.migration_id)
        full = self._memory_used(ctl) > 0.6     # keep the cluster from filling up
        roll = self.rng.random()
        try:
            if mig is not None and mig.status == MS.FINISHED:
                if roll < 0.05:
                    await self.ask("act", name, "delete")
                else:
                    op = "confirm" if roll < (0.2 if full else 0.6) else "revert"
                    await self.ask(op, name)
            elif roll < 0.04:
                await self._resize_then_delete(name, inst, flavors)
            elif roll < 0.16:
                action = "start" if inst.power_state != RUNNING else (
                    "stop" if roll < 0.10 else "reboot")
                await self.ask("act", name, action, hard=roll < 0.07)
            elif full or roll < 0.3:
                await self.ask("resize", name, None)
                self.finished += 1
            else:
                await self.ask("resize", name, self._pick_flavor(inst.flavor.name, flavors))
                self.finished += 1
        except OperationError as exc:
            self.failed += 1
            self.history.append(f"{name}: {exc}")

    async def _resize_then_delete(self, name, inst, flavors) -> None:
        """A delete while a resize is under way: the resize is rolled back (or confirmed
        if it got to VERIFY_RESIZE), then the instance deleted; nothing stays held."""
        resize = asyncio.ensure_future(self.ask(
            "resize", name, self._pick_flavor(inst.flavor.name, flavors)))
        await asyncio.sleep(self.rng.random() * 0.5)
        try:
            await self.ask("act", name, "delete")
        finally:
            try:
                await resize
            except OperationError as exc:
                self.history.append(f"{name}: {exc}")

    async def _reboot_deleted(self, name: str) -> None:
        """Boot a deleted instance's name again, so the population stays the same."""
        try:
            await self.ask("boot", name, self.rng.choice(self._boot_flavors()))
        except OperationError as exc:
            self.history.append(f"boot {name} refused: {exc}")

    def _memory_used(self, ctl: Controller) -> float:
        """Fraction of the cluster's memory limit the ledgers hold (kept incrementally
        by the checker's projection)."""
        limit = self._policy()[1].memory_mb * len(self.hosts) or 1
        return sum(l.used.memory_mb for l in self.checker.p.ledgers.values()) / limit

    def _pick_flavor(self, current: str, flavors: list[str]) -> str:
        """Mostly up (a shrink is refused, which is worth testing, but not every time)."""
        bigger = flavors[flavors.index(current) + 1:] if current in flavors else []
        if bigger and self.rng.random() < 0.85:
            return self.rng.choice(bigger)
        return self.rng.choice(flavors)

    async def _wait_controller(self) -> Controller:
        await self.controller_ready.wait()
        return self.controller

    async def _chaos(self) -> None:
        """Crash the controller now and then while the workload runs."""
        while self.faults_on:
            await asyncio.sleep(1.0)
            if self.roll("crash", self.cfg.controller_crash_p * 50) and self.controller:
                self.crash_controller()

    # ------------------------------------------------------------------ run

    async def _main(self) -> None:
        self.controller_ready = asyncio.Event()
        self.build_hosts()
        self.controller_log = SegmentLog(self.state_dir / "controller" / "log", fsync=False)
        for name in self.hosts:
            await self.start_host(name)
        await self.start_controller()
        chaos = asyncio.ensure_future(self._chaos())
        names = await self._boot_all()
        busy: set[str] = set()
        budget = [self.cfg.operations]
        clients = min(self.cfg.concurrency, max(1, len(names) // 2))
        await asyncio.gather(*(self._client(names, busy, budget) for _ in range(clients)))
        await self._heal()
        chaos.cancel()

    async def _heal(self) -> None:
        """Stop injecting faults, bring everything back, and drive every migration to a
        final state: liveness."""
        self.faults_on = False
        for host in self.hosts.values():
            host.driver.faults.heal()
        for name, host in self.hosts.items():
            if host.shell is None:
                await self.start_host(name)
        try:
            await asyncio.wait_for(self._settle(), HEAL_S)
        except asyncio.TimeoutError:
            self.breaches.append(f"liveness: requests still running {HEAL_S:.0f} s "
                                 f"(virtual) after every fault was healed")

    async def _settle(self) -> None:
        if self.controller is None:
            await self.controller_ready.wait()
        ctl = self.controller
        while True:
            pending = [t for t in ctl.tasks.values() if not t.done()]
            pending += [t for h in self.hosts.values() for t in h.tasks if not t.done()]
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        for mig in list(ctl.view.migrations.values()):
            if mig.status == MS.FINISHED:
                await self.ask("confirm", ctl.view.instances[mig.instance_uuid].name)

    def _unhandled(self, loop, context) -> None:
        """A task died with an exception nobody awaited: expected for the tasks of a
        crashed host (HostCrashed) or a lost message; anything else is a bug."""
        exc = context.get("exception")
        if isinstance(exc, (HostCrashed, HostUnavailable, asyncio.CancelledError)):
            return
        self.unexpected.append(f"unexpected: {context.get('message')}: {exc!r}")

    def driver_mismatches(self) -> list[str]:
        """What the fake hypervisors hold that the logs do not say, or the reverse:
        a domain, a disk directory, a `_resize` directory or a probe file."""
        view = self.controller.view
        live = {u: i for u, i in view.instances.items()
                if not i.deleted and i.vm_state not in ("error", "building")}
        errored = {u for u, i in view.instances.items() if i.vm_state == "error"}
        problems = []
        pools: dict[int, tuple] = {}
        for name, host in self.hosts.items():
            want = {u for u, i in live.items() if i.host == name}
            got = set(host.driver.domains) - errored
            if got != want:
                problems.append(f"drivers: {name} domains: extra {sorted(got - want)}, "
                                f"missing {sorted(want - got)}")
            pools.setdefault(id(host.driver.storage), (host.driver.storage, []))[1].append(name)
        for storage, names in pools.values():
            want = {u for u, i in live.items() if i.host in names}
            dirs = {d for d in storage.dirs if d.removesuffix("_resize") not in errored}
            left = sorted(d for d in dirs if d.endswith("_resize"))
            got = {d for d in dirs if not d.endswith("_resize")}
            if left:
                problems.append(f"drivers: {names}: _resize dirs left: {left}")
            if got != want:
                problems.append(f"drivers: {names} disks: extra {sorted(got - want)}, "
                                f"missing {sorted(want - got)}")
            if storage.probes:
                problems.append(f"drivers: {names}: probes left: {storage.probes}")
        return problems

    def fault_counts(self) -> dict[str, int]:
        counts = dict(self.injected)
        for host in self.hosts.values():
            inj = host.driver.injected
            counts["driver"] += inj.get("fail", 0) + inj.get("hang", 0)
            counts["crash"] += inj.get("crash", 0)
        return {k: counts[k] for k in self.cfg.faults} | {
            k: v for k, v in counts.items() if v}

    def liveness(self) -> list[str]:
        problems = []
        ctl = self.controller
        if ctl is None:
            return ["liveness: the controller is down at the end"]
        for mig in ctl.migrations():
            if not mig.final:
                problems.append(f"liveness: migration {mig.id} stuck in {mig.status}")
        for inst in ctl.instances():
            if inst.task_state is not None:
                problems.append(f"liveness: instance {inst.name} stuck in "
                                f"{inst.task_state}")
        return problems

    def run(self) -> SimResult:
        """Run the simulation; whatever goes wrong in it is a violation in the result
        (with the command that reproduces it), never an exception."""
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        started = time.perf_counter()
        loop = VirtualLoop()
        loop.set_exception_handler(self._unhandled)
        problems: list[str] = []
        limit_s = VIRTUAL_LIMIT_S + VIRTUAL_S_PER_OPERATION * self.cfg.operations
        try:
            loop.run_until_complete(asyncio.wait_for(self._main(), limit_s))
        except asyncio.TimeoutError:
            problems.append(f"liveness: the run did not end in {limit_s:.0f} s (virtual)")
        except (Exception, HostCrashed) as exc:
            problems.append(_exception("the simulation raised", exc))
        virtual_s = loop.time()
        try:
            self._cancel_all(loop)
        finally:
            loop.close()
        problems += self._close_and_export()
        problems += [f"{v.invariant} at {v.host}:{v.offset}: {v.message}"
                     for v in self.checker.violations]
        problems += self.unexpected
        problems += self.breaches
        for check in (self.liveness, self.driver_mismatches, self.data_loss,
                      self._audit):
            try:
                found = check()
                if check in (self.driver_mismatches, self._audit):
                    found = self._excuse_abandoned(found)
                problems += found
            except Exception as exc:
                problems.append(_exception(f"{check.__name__} raised", exc))
        wall_s = time.perf_counter() - started
        return SimResult(
            seed=self.cfg.seed, operations=self.done_ops, resizes_finished=self.finished,
            resizes_failed=self.failed, crashes=self.crashes, violations=len(problems),
            digest=self.hash.hexdigest()[:32], wall_s=round(wall_s, 3), events=self.events,
            faults=self.fault_counts(), virtual_s=round(virtual_s, 3),
            resizes_per_s=round(self.finished / wall_s, 1) if wall_s else 0.0,
            events_per_s=round(self.events / wall_s, 1) if wall_s else 0.0,
            violation_list=problems[:50], command=reproduce(self.cfg),
            windows=dict(self.windows), reached=dict(self.reached),
            aimed_at=list(self.aimed_at))

    @staticmethod
    def _cancel_all(loop) -> None:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    def _close_and_export(self) -> list[str]:
        """Check every log against the replies once more, close it, sync each disk once
        and write its files into the state directory, where `vmresize audit` reads them."""
        problems = []
        for host in self.hosts.values():
            try:
                if host.raw_log is not None:
                    self.check_acked(host, "at the end")
                    host.raw_log.close()
            except Exception as exc:
                problems.append(_exception(f"closing {host.name}'s log raised", exc))
            host.disk.sync_all()
            # No fsync of the exported files: the audit reads them right away.
            host.disk.export(self.state_dir, under=host.base, fsync=False)
            host.disk.forget()      # the files are exported: the audit reads them there
            host.acked.file.close()
        if getattr(self, "controller_log", None) is not None:
            self.controller_log.close()
        return problems

    def _forgot_migration(self, mig) -> None:
        """The checks forgot an ended migration: if its instance had an abandoned
        cleanup, findings about it are still expected."""
        if mig.instance_uuid in self.abandoned_ids:
            self.abandoned_ids.add(mig.id)

    def _excuse_abandoned(self, found: list[str]) -> list[str]:
        """Findings about an instance with an abandoned cleanup, or any migration of it
        (a later resize of it may trip over what the cleanup left), are expected."""
        ids = self._excused if self._excused is not None else self._excused_ids()
        kept = [p for p in found if not any(i in p for i in ids)]
        self.reached["abandoned_findings"] += len(found) - len(kept)
        return kept

    def data_loss(self) -> list[str]:
        return [f"data loss: {name}: {what}" for name, host in self.hosts.items()
                for what in host.driver.data_loss]

    def _excused_ids(self) -> set[str]:
        return self.abandoned_ids | {mid for mid, m in self.checker.p.migrations.items()
                                     if m.instance_uuid in self.abandoned_ids}

    def _release_run_state(self) -> None:
        """The run is over and checked: each host's shell and the checks' fold go
        before the final audit, so that its memory does not add to theirs (the
        controller and the drivers stay, for `driver_mismatches`)."""
        self._excused = self._excused_ids()
        for host in self.hosts.values():
            host.shell = host.raw_log = None
            host.tasks.clear()
        self.checker.s = FoldState()

    def _audit(self) -> list[str]:
        self._release_run_state()
        report = audit(self.state_dir)
        return [f"audit {v.invariant} at {v.host}:{v.offset}: {v.message}"
                for v in report.violations]


class _Acked:
    """The records of a host's log the controller was told of, as an 8-byte digest per
    offset, kept in an unlinked temporary file (a slot of 9 bytes per offset: a flag,
    then the digest), since they are as many as the log's records."""

    SLOT = 9

    def __init__(self, spill_dir: str):
        self.file = tempfile.TemporaryFile(dir=spill_dir, buffering=0)
        self.first: int | None = None       # the lowest offset told of
        self.end = 0                        # one past the highest

    def add(self, offset: int, digest: bytes) -> None:
        os.pwrite(self.file.fileno(), b"\x01" + digest, offset * self.SLOT)
        self.first = offset if self.first is None else min(self.first, offset)
        self.end = max(self.end, offset + 1)

    def from_offset(self, start: int, batch: int = 4096):
        """(offset, digest) of every record told of, from `start` on, in order."""
        fd = self.file.fileno()
        for base in range(start, self.end, batch):
            chunk = os.pread(fd, batch * self.SLOT, base * self.SLOT)
            for i in range(0, len(chunk), self.SLOT):
                if chunk[i]:
                    yield base + i // self.SLOT, chunk[i + 1:i + self.SLOT]


def _digest(record) -> bytes:
    return hashlib.blake2b(record, digest_size=8).digest()


def _exception(what: str, exc: BaseException) -> str:
    """One line: the exception and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"exception: {what}: {type(exc).__name__}: {exc}{where}"
