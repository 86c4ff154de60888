"""The host shell: one compute host's log, driver and state, and the only place where
host side effects happen.

For every command: read state -> decide -> append the intent (durably) -> driver ->
append the outcome -> reply. A repeated `command_id` is answered from the log; one still
running is joined. On start the shell replays its log (snapshot + tail), logs its
capacity if it changed, and recovers every step whose intent has no outcome by running
its driver call again (driver calls are idempotent) and appending the outcome, so no
instance is left in a transient state and no claim leaks. The same class runs inside a
Ray actor and inside the deterministic simulator.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import msgspec

from vmresize.protocol import commands as c
from vmresize.protocol.commands import Rejected, Reply
from vmresize.actors.host import HostPolicy, decide, probe_name
from vmresize.drivers.base import DriverError, DriverTimeout, InstanceSpec
from vmresize.events import schema as ev
from vmresize.events.codec import decode_host, encode
from vmresize.events.log import load_snapshot, save_snapshot
from vmresize.events.schema import RUNNING, SHUTDOWN, Envelope
from vmresize.projections.fold import Projection, apply

INTENTS = (ev.SpawnStarted, ev.MigrationStarted, ev.FinishStarted, ev.ConfirmStarted,
           ev.RevertStarted, ev.RevertFinishStarted)


class HostSnapshot(msgspec.Struct):
    projection: Projection
    commands: dict[str, list[int]]
    open_intents: dict[str, int]


_SNAPSHOT_DECODER = msgspec.msgpack.Decoder(HostSnapshot)


class HostEventLog:
    """Typed view of a raw log: appends events as envelopes stamped by `clock`."""

    def __init__(self, raw, host: str, clock: Callable[[], float]):
        self.raw = raw
        self.host = host
        self.clock = clock

    async def append(self, events: list) -> list[Envelope]:
        envs: list[Envelope] = []

        def stamp(offset: int, event) -> bytes:
            env = Envelope(self.host, offset, self.clock(), event)
            envs.append(env)
            return encode(env)

        await self.raw.append_async(events, stamp)
        return envs

    def replay(self, start: int = 0, stop: int | None = None):
        for offset, payload in self.raw.read(start, stop):
            env = decode_host(payload)
            assert env.offset == offset, (env.offset, offset)
            yield env


class HostShell:
    def __init__(self, policy: HostPolicy, log: HostEventLog, driver, *,
                 capacity: ev.Resources, step_timeout_s: float = 60.0,
                 snapshot_dir: str | None = None, snapshot_every: int = 0,
                 sink_factory: Callable[[str], object] | None = None,
                 spawn_task: Callable = None):
        self.name = policy.name
        self.policy = policy
        self.log = log
        self.driver = driver
        self.capacity = capacity
        self.step_timeout_s = step_timeout_s
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.sink_factory = sink_factory
        self._spawn_task = spawn_task or asyncio.ensure_future
        self.state = Projection()
        self.commands: dict[str, list[int]] = {}
        self.open_intents: dict[str, int] = {}      # command_id -> offset of its intent
        self._inflight: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._since_snapshot = 0
        self.recovered = 0

    # ------------------------------------------------------------------ start-up

    def replay(self) -> int:
        """Fold the log into state; returns how many records were read."""
        start = 0
        if self.snapshot_dir:
            snap = load_snapshot(self.snapshot_dir)
            if snap is not None:
                start, data = snap
                s = _SNAPSHOT_DECODER.decode(data)
                self.state, self.commands, self.open_intents = (
                    s.projection, s.commands, s.open_intents)
        n = 0
        for env in self.log.replay(start):
            self._record(env)
            n += 1
        return n

    async def start(self) -> None:
        self.replay()
        limit = self.policy.limit
        ledger = self.state.ledgers.get(self.name)
        if ledger is None or ledger.limit != limit or ledger.capacity != self.capacity:
            await self._append([ev.HostConfigured(driver=type(self.driver).__name__,
                                                  capacity=self.capacity, limit=limit)])
        for command_id in sorted(self.open_intents, key=self.open_intents.get):
            self.recovered += 1
            self._inflight[command_id] = self._spawn_task(self._resume_open(command_id))

    async def _resume_open(self, command_id: str) -> Reply:
        try:
            env = next(self.log.replay(self.open_intents[command_id],
                                       self.open_intents[command_id] + 1))
            return await self._effect(env)
        finally:
            self._inflight.pop(command_id, None)

    # ------------------------------------------------------------------ bookkeeping

    def _record(self, env: Envelope) -> None:
        apply(self.state, env)
        cid = env.event.command_id
        if cid:
            self.commands.setdefault(cid, []).append(env.offset)
            if isinstance(env.event, INTENTS):
                self.open_intents[cid] = env.offset
            else:
                self.open_intents.pop(cid, None)

    async def _append(self, events: list) -> list[Envelope]:
        envs = await self.log.append(events)
        for env in envs:
            self._record(env)
        self._since_snapshot += len(envs)
        if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
            self.save_snapshot()
        return envs

    def save_snapshot(self) -> None:
        if not self.snapshot_dir:
            return
        snap = HostSnapshot(self.state, self.commands, self.open_intents)
        offset = self.state.offsets.get(self.name, 0)
        save_snapshot(self.snapshot_dir, offset, msgspec.msgpack.encode(snap))
        self._since_snapshot = 0

    def _reply_from_log(self, command_id: str) -> Reply:
        offsets = self.commands[command_id]
        envs = [next(self.log.replay(o, o + 1)) for o in offsets]
        return _reply(command_id, envs)

    # ------------------------------------------------------------------ commands

    async def handle(self, cmd: c.Command) -> Reply:
        cid = cmd.command_id
        task = self._inflight.get(cid)
        if task is None:
            if cid in self.commands and cid not in self.open_intents:
                return self._reply_from_log(cid)
            task = self._spawn_task(self._run(cmd))
            self._inflight[cid] = task
            task.add_done_callback(lambda _t, cid=cid: self._inflight.pop(cid, None))
        return await asyncio.shield(task)

    async def _run(self, cmd: c.Command) -> Reply:
        cid = cmd.command_id
        if cid in self.open_intents:
            env = next(self.log.replay(self.open_intents[cid], self.open_intents[cid] + 1))
            return await self._effect(env)
        direct = _DIRECT.get(type(cmd))
        async with self._lock:
            result = decide(self.state, self.policy, cmd)
            if isinstance(result, Rejected):
                return Reply(command_id=cid, ok=False, reason=result.reason)
            if direct is None:
                if isinstance(cmd, c.PrepResize) and isinstance(result[0], ev.Claimed):
                    result = await self._create_probe(result)
                if isinstance(result[0], ev.ClaimRejected):
                    # An earlier try of this command may have created the probe.
                    await self._quietly(self.driver.remove_probe(probe_name(cmd.migration_id)))
                envs = await self._append(result)
        if direct is not None:
            return await getattr(self, direct)(cmd)
        if isinstance(envs[-1].event, INTENTS):
            return await self._effect(envs[-1], envs[:-1])
        return _reply(cid, envs)

    async def _create_probe(self, events: list) -> list:
        claimed = events[0]
        try:
            await self._call(self.driver.create_probe(claimed.probe))
        except DriverError as exc:
            return [ev.ClaimRejected(command_id=claimed.command_id,
                                     migration_id=claimed.migration_id,
                                     instance_uuid=claimed.instance_uuid, dest=self.name,
                                     reason=f"shared-storage probe failed: {exc}")]
        return events

    async def _call(self, coro):
        try:
            return await asyncio.wait_for(coro, self.step_timeout_s)
        except asyncio.TimeoutError:
            raise DriverTimeout(f"{self.name}: step took longer than "
                                f"{self.step_timeout_s} s") from None

    # ------------------------------------------------------------------ effects

    async def _effect(self, intent: Envelope, before: list | None = None) -> Reply:
        """Run the driver call of an intent and append its outcome."""
        e = intent.event
        outcome = await getattr(self, _EFFECTS[type(e)])(e)
        if outcome is None:      # a cleanup step failed: the intent stays open
            return Reply(command_id=e.command_id, ok=False, retryable=True,
                         reason=self._last_error, events=(before or []) + [intent])
        envs = await self._append(outcome)
        return _reply(e.command_id, (before or []) + [intent] + envs)

    def _mig(self, e):
        return self.state.migrations[e.migration_id]

    def _old_spec(self, mig, uuid: str) -> InstanceSpec:
        return InstanceSpec(uuid=uuid, name=self._name_of(uuid), flavor=mig.old_flavor)

    def _name_of(self, uuid: str) -> str:
        inst = self.state.instances.get(uuid)
        return inst.name if inst else uuid

    async def _spawn(self, e: ev.SpawnStarted):
        spec = InstanceSpec(uuid=e.instance_uuid, name=e.name, flavor=e.flavor, image=e.image)
        try:
            disks = await self._call(self.driver.spawn(spec, power_on=not e.stopped))
        except DriverError as exc:
            await self._quietly(self.driver.destroy(e.instance_uuid))
            return [_next(ev.SpawnFailed, e, reason=str(exc))]
        return [_next(ev.Spawned, e, power_state=SHUTDOWN if e.stopped else RUNNING,
                      disks=tuple(disks))]

    async def _migrate(self, e: ev.MigrationStarted):
        spec = e.spec
        old = InstanceSpec(uuid=e.instance_uuid, name=spec.name, flavor=spec.old_flavor)
        power = RUNNING if spec.vm_state == "active" else SHUTDOWN
        shared = spec.source == spec.dest
        probed = shared
        try:
            shared = shared or (bool(e.probe) and
                                await self._call(self.driver.probe_exists(e.probe)))
            probed = True
            sink = None if shared or self.sink_factory is None else self.sink_factory(spec.dest)
            disks = await self._call(self.driver.migrate_disk_and_power_off(
                old, spec.new_flavor, shared, sink))
        except DriverError as exc:
            rolled_back = await self._quietly(
                self.driver.finish_revert_migration(old, power_on=power == RUNNING))
            # Only a source that knew the storage was not shared may have sent disks.
            return [_next(ev.Failed, e, step="migrate", reason=str(exc),
                          rolled_back=rolled_back, power_state=power,
                          shared_storage=shared, dest_copy=probed and not shared)]
        return [_next(ev.DiskMigrated, e, shared_storage=shared, disks=tuple(disks))]

    async def _finish(self, e: ev.FinishStarted):
        mig = self._mig(e)
        new = InstanceSpec(uuid=e.instance_uuid, name=self._name_of(e.instance_uuid),
                           flavor=mig.new_flavor)
        power_on = mig.vm_state == "active"
        await self._quietly(self.driver.remove_probe(probe_name(e.migration_id)))
        try:
            await self._call(self.driver.finish_migration(new, e.disks, e.shared_storage,
                                                          power_on))
        except DriverError as exc:
            rolled_back = await self._quietly(
                self.driver.revert_migration_dest(e.instance_uuid, e.shared_storage))
            return [_next(ev.Failed, e, step="finish", reason=str(exc),
                          rolled_back=rolled_back)]
        return [_next(ev.Finished, e, power_state=RUNNING if power_on else SHUTDOWN)]

    async def _cleanup(self, e, coro, outcome, **fields):
        """A step that cannot be rolled back, only retried until it succeeds."""
        try:
            await self._call(coro)
        except DriverError as exc:
            self._last_error = f"{type(e).__name__} on {self.name}: {exc}"
            return None
        return [_next(outcome, e, **fields)]

    async def _confirm(self, e: ev.ConfirmStarted):
        return await self._cleanup(e, self.driver.confirm_migration(
            e.instance_uuid, e.shared_storage), ev.Confirmed)

    async def _revert_dest(self, e: ev.RevertStarted):
        return await self._cleanup(e, self.driver.revert_migration_dest(
            e.instance_uuid, e.shared_storage), ev.DestReverted)

    async def _finish_revert(self, e: ev.RevertFinishStarted):
        mig = self._mig(e)
        power_on = mig.vm_state == "active"
        return await self._cleanup(
            e, self.driver.finish_revert_migration(self._old_spec(mig, e.instance_uuid),
                                                   power_on),
            ev.Reverted, power_state=RUNNING if power_on else SHUTDOWN)

    async def _restore(self, cmd: c.RestoreSource) -> Reply:
        mig = self.state.migrations[cmd.migration_id]
        power_on = mig.vm_state == "active"
        try:
            await self._call(self.driver.finish_revert_migration(
                self._old_spec(mig, cmd.instance_uuid), power_on))
        except DriverError as exc:
            return Reply(command_id=cmd.command_id, ok=False, retryable=True,
                         reason=f"restore on {self.name}: {exc}")
        return await self._outcome_of(cmd, ev.SourceRestored,
                                      power_state=RUNNING if power_on else SHUTDOWN)

    async def _release(self, cmd: c.ReleaseClaim) -> Reply:
        mig = self.state.migrations[cmd.migration_id]
        if cmd.role == "dest":
            await self._quietly(self.driver.remove_probe(probe_name(mig.id)))
            if cmd.remove_disks and mig.source_compute != self.name:
                # Drop what the source sent before it failed; never on shared storage,
                # where the instance's own directory is the same one.
                if not await self._quietly(self.driver.destroy(cmd.instance_uuid)):
                    return Reply(command_id=cmd.command_id, ok=False, retryable=True,
                                 reason=f"release on {self.name}: destroy failed")
        return await self._outcome_of(cmd, ev.ClaimReleased, role=cmd.role,
                                      reason=cmd.reason,
                                      disks_removed=cmd.role == "dest" and cmd.remove_disks)

    async def _outcome_of(self, cmd, cls, **fields) -> Reply:
        async with self._lock:
            if cmd.command_id in self.commands:      # a duplicate got here first
                return self._reply_from_log(cmd.command_id)
            envs = await self._append([cls(command_id=cmd.command_id,
                                           instance_uuid=cmd.instance_uuid,
                                           instance_version=cmd.instance_version + 1,
                                           migration_id=cmd.migration_id, **fields)])
        return _reply(cmd.command_id, envs)

    async def _quietly(self, coro) -> bool:
        try:
            await self._call(coro)
            return True
        except DriverError as exc:
            self._last_error = str(exc)
            return False

    _last_error = ""


def _next(cls, intent, **fields):
    """The outcome of `intent`: same command, migration and instance, next version."""
    kw = dict(command_id=intent.command_id, instance_uuid=intent.instance_uuid,
              instance_version=intent.instance_version + 1)
    if hasattr(intent, "migration_id"):
        kw["migration_id"] = intent.migration_id
    return cls(**kw, **fields)


def _reply(command_id: str, envs: list[Envelope]) -> Reply:
    last = envs[-1].event if envs else None
    ok = not isinstance(last, (ev.ClaimRejected, ev.Failed, ev.SpawnFailed))
    reason = getattr(last, "reason", "") if not ok else ""
    return Reply(command_id=command_id, ok=ok, events=envs, reason=reason)


_EFFECTS = {
    ev.SpawnStarted: "_spawn", ev.MigrationStarted: "_migrate",
    ev.FinishStarted: "_finish", ev.ConfirmStarted: "_confirm",
    ev.RevertStarted: "_revert_dest", ev.RevertFinishStarted: "_finish_revert",
}
_DIRECT = {c.RestoreSource: "_restore", c.ReleaseClaim: "_release"}
