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

from vmresize.actors.host import Effect, HostPolicy, decide, outcome, probe_name
from vmresize.drivers.base import DriverError, DriverTimeout, InstanceSpec
from vmresize.events import schema as ev
from vmresize.events.codec import decode_host, encode
from vmresize.events.disk import OS_DISK
from vmresize.events.log import DiskFull, load_snapshot, save_snapshot
from vmresize.events.schema import Envelope
from vmresize.projections.fold import Projection, apply
from vmresize.protocol import commands as c
from vmresize.protocol.commands import Rejected, Reply
from vmresize.protocol.states import ENDED, MigrationStatus, VmState
from vmresize.protocol.table import INTENTS, STEP_OF_INTENT

RETAIN_COMMANDS = 1024      # command ids whose answers a host keeps
RETAIN_ENDED = 16           # ended migrations and deleted instances a host keeps


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
                 spawn_task: Callable = None, disk=OS_DISK):
        self.name = policy.name
        self.disk = disk                            # where the snapshots live
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
        self.busy: dict[str, str] = {}              # instance uuid -> its open command
        self._ended_migrations: dict[str, None] = {}   # oldest first
        self._ended_instances: dict[str, None] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._since_snapshot = 0
        self.recovered = 0

    # ------------------------------------------------------------------ start-up

    def replay(self) -> int:
        """Fold the log into state; returns how many records were read."""
        start = 0
        if self.snapshot_dir:
            snap = load_snapshot(self.snapshot_dir, disk=self.disk)
            if snap is not None:
                start, data = snap
                s = _SNAPSHOT_DECODER.decode(data)
                self.state, self.commands, self.open_intents = (
                    s.projection, s.commands, s.open_intents)
                self.busy = {self._intent_of(cid).event.instance_uuid: cid
                             for cid in self.open_intents}
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
        mid = getattr(env.event, "migration_id", "")
        was_final = mid and self._final_here(mid)
        inst = self.state.instances.get(getattr(env.event, "instance_uuid", ""))
        before = inst.migration_id if inst is not None else ""
        apply(self.state, env)
        if mid and not was_final and self._final_here(mid):
            self._ended_migrations[mid] = None
        after = self.state.instances.get(getattr(env.event, "instance_uuid", ""))
        if before and (after is None or after.migration_id not in ("", before)):
            # The instance moved on to another migration: this host's half of the
            # earlier one (a destination never sees the source's Confirmed) is over.
            self._ended_migrations[before] = None
        if type(env.event) is ev.Deleted:
            self._ended_instances[env.event.instance_uuid] = None
        self._forget()
        cid = env.event.command_id
        if cid:
            self.commands.setdefault(cid, []).append(env.offset)
            uuid = getattr(env.event, "instance_uuid", "")
            if type(env.event) in INTENTS and _opens(env.event):
                self.open_intents[cid] = env.offset
                self.busy[uuid] = cid
            elif self.open_intents.pop(cid, None) is not None and self.busy.get(uuid) == cid:
                del self.busy[uuid]
            closes = getattr(env.event, "closes", "")
            if closes and self.open_intents.pop(closes, None) is not None \
                    and self.busy.get(uuid) == closes:
                del self.busy[uuid]

    def _final_here(self, mid: str) -> bool:
        mig = self.state.migrations.get(mid)
        return mig is not None and (mig.final or mig.status in ENDED
                                    and mig.status != MigrationStatus.ERROR)

    def _forget(self) -> None:
        """Bounded memory: keep the last RETAIN_COMMANDS command ids (a repeated one is
        answered from the log; an older one is refused by the version check, never run
        twice) and the last RETAIN_ENDED ended migrations and deleted instances."""
        while len(self.commands) > RETAIN_COMMANDS:
            cid = next(iter(self.commands))
            if cid in self.open_intents:
                break
            del self.commands[cid]
        for ended, table_ in ((self._ended_migrations, self.state.migrations),
                              (self._ended_instances, self.state.instances)):
            while len(ended) > RETAIN_ENDED:
                key = next(iter(ended))
                del ended[key]
                table_.pop(key, None)

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
        try:
            save_snapshot(self.snapshot_dir, offset, msgspec.msgpack.encode(snap),
                          disk=self.disk)
        except OSError:
            return      # a snapshot only saves replay time: the log has it all; next time
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
        """read -> decide -> append the intent -> driver -> append the outcome."""
        cid = cmd.command_id
        if cid in self.open_intents:
            return await self._effect(self._intent_of(cid))
        async with self._lock:
            holder = self.busy.get(cmd.instance_uuid)
            if holder is not None and getattr(cmd, "abandons", None) != holder:
                # One step of an instance at a time, or versions fork.
                return Reply(command_id=cid, ok=False, retryable=True,
                             reason=f"instance {cmd.instance_uuid} has a step under way "
                                    f"on {self.name} ({holder})")
            result = decide(self.state, self.policy, cmd)
            if isinstance(result, Rejected):
                return Reply(command_id=cid, ok=False, reason=result.reason)
            try:
                envs = await self._append(result) if result else []
            except DiskFull as exc:     # nothing was kept, so nothing is held: try later
                return Reply(command_id=cid, ok=False, retryable=True,
                             reason=f"{self.name} refuses new work: {exc}")
        if envs and type(envs[-1].event) in INTENTS and _opens(envs[-1].event):
            return await self._effect(envs[-1], envs[:-1])
        return _reply(cid, envs)

    def _intent_of(self, command_id: str) -> Envelope:
        offset = self.open_intents[command_id]
        return next(self.log.replay(offset, offset + 1))

    async def _call(self, coro):
        try:
            return await asyncio.wait_for(coro, self.step_timeout_s)
        except asyncio.TimeoutError:
            raise DriverTimeout(f"{self.name}: step took longer than "
                                f"{self.step_timeout_s} s") from None

    # ------------------------------------------------------------------ effects

    async def _effect(self, intent: Envelope, before: list | None = None) -> Reply:
        """Run the driver call(s) of an open intent, then append its outcome."""
        e = intent.event
        rule = STEP_OF_INTENT[type(e)]
        step = rule.step
        result = await getattr(self, "_do_" + step)(e)
        events = outcome(self.state, e, result)
        if events is None:      # a cleanup step failed: the intent stays open
            return Reply(command_id=e.command_id, ok=False, retryable=True,
                         reason=f"{step} on {self.name}: {result.error}",
                         events=(before or []) + [intent])
        try:
            envs = await self._append(events)
        except DiskFull as exc:     # the intent stays open: the same command runs it again
            return Reply(command_id=e.command_id, ok=False, retryable=True,
                         reason=f"{step} on {self.name}: outcome not logged: {exc}")
        return _reply(e.command_id, (before or []) + [intent] + envs, rule.failure)

    async def _attempt(self, coro, **fields) -> Effect:
        """One driver call as an Effect: its error, if any, as a value."""
        try:
            await self._call(coro)
        except DriverError as exc:
            return Effect(error=str(exc), **fields)
        return Effect(**fields)

    def _mig(self, e):
        return self.state.migrations[e.migration_id]

    def _spec(self, uuid: str, flavor) -> InstanceSpec:
        inst = self.state.instances.get(uuid)
        return InstanceSpec(uuid=uuid, name=inst.name if inst else uuid, flavor=flavor)

    def _power_on_after(self, e) -> bool:
        return self._mig(e).vm_state == VmState.ACTIVE

    async def _do_spawn(self, e: ev.SpawnStarted) -> Effect:
        spec = InstanceSpec(uuid=e.instance_uuid, name=e.name, flavor=e.flavor, image=e.image)
        try:
            disks = await self._call(self.driver.spawn(spec, power_on=not e.stopped))
        except DriverError as exc:
            await self._quietly(self.driver.destroy(e.instance_uuid))
            return Effect(error=str(exc))
        return Effect(disks=tuple(disks))

    async def _do_prep(self, e: ev.Claimed) -> Effect:
        result = await self._attempt(self.driver.create_probe(e.probe))
        if result.error:     # the claim fails: undo what may have been created
            await self._quietly(self.driver.remove_probe(e.probe))
        return result

    async def _do_resize_instance(self, e: ev.MigrationStarted) -> Effect:
        spec = e.spec
        old = InstanceSpec(uuid=e.instance_uuid, name=spec.name, flavor=spec.old_flavor)
        shared = probed = spec.source == spec.dest
        try:
            shared = shared or (bool(e.probe) and
                                await self._call(self.driver.probe_exists(e.probe)))
            probed = True
            sink = None if shared or self.sink_factory is None else self.sink_factory(spec.dest)
            disks = await self._call(self.driver.migrate_disk_and_power_off(
                old, spec.new_flavor, shared, sink))
        except DriverError as exc:
            rolled_back = await self._quietly(self.driver.finish_revert_migration(
                old, power_on=spec.vm_state == VmState.ACTIVE))
            return Effect(error=str(exc), rolled_back=rolled_back, shared=shared,
                          probed=probed)
        return Effect(shared=shared, probed=True, disks=tuple(disks))

    async def _do_finish(self, e: ev.FinishStarted) -> Effect:
        new = self._spec(e.instance_uuid, self._mig(e).new_flavor)
        await self._quietly(self.driver.remove_probe(probe_name(e.migration_id)))
        try:
            await self._call(self.driver.finish_migration(new, e.disks, e.shared_storage,
                                                          self._power_on_after(e)))
        except DriverError as exc:
            rolled_back = await self._quietly(
                self.driver.revert_migration_dest(e.instance_uuid, e.shared_storage))
            return Effect(error=str(exc), rolled_back=rolled_back)
        return Effect()

    async def _do_confirm(self, e: ev.ConfirmStarted) -> Effect:
        return await self._attempt(self.driver.confirm_migration(e.instance_uuid,
                                                                 e.shared_storage))

    async def _do_revert(self, e: ev.RevertStarted) -> Effect:
        return await self._attempt(self.driver.revert_migration_dest(e.instance_uuid,
                                                                     e.shared_storage))

    async def _do_finish_revert(self, e) -> Effect:
        old = self._spec(e.instance_uuid, self._mig(e).old_flavor)
        return await self._attempt(self.driver.finish_revert_migration(
            old, self._power_on_after(e)))

    _do_restore = _do_finish_revert

    async def _do_release(self, e: ev.ReleaseStarted) -> Effect:
        await self._quietly(self.driver.remove_probe(probe_name(e.migration_id)))
        if e.remove_disks and self._mig(e).source_compute != self.name:
            # Drop what the source sent before it failed; never on shared storage,
            # where the instance's own directory is the same one.
            return await self._attempt(self.driver.destroy(e.instance_uuid))
        return Effect()

    async def _do_stop(self, e: ev.PowerOffStarted) -> Effect:
        # A clean shutdown gets half the step's time, then the driver forces it off.
        return await self._attempt(self.driver.power_off(e.instance_uuid,
                                                         timeout_s=self.step_timeout_s / 2))

    async def _do_start(self, e: ev.PowerOnStarted) -> Effect:
        return await self._attempt(self.driver.power_on(e.instance_uuid))

    async def _do_reboot(self, e: ev.RebootStarted) -> Effect:
        return await self._attempt(self.driver.reboot(e.instance_uuid, e.hard,
                                                      timeout_s=self.step_timeout_s / 2))

    async def _do_delete(self, e: ev.DeleteStarted) -> Effect:
        return await self._attempt(self.driver.destroy(e.instance_uuid))

    async def _quietly(self, coro) -> bool:
        """A driver call whose failure the step survives (an undo, a probe removal)."""
        try:
            await self._call(coro)
            return True
        except DriverError:
            return False


_REFUSALS = (ev.ClaimRejected, ev.Failed, ev.SpawnFailed, ev.ActionFailed)


def _reply(command_id: str, envs: list[Envelope], failure: type | None = None) -> Reply:
    """`ok` unless the last event is a refusal or the failure event of its step."""
    last = envs[-1].event if envs else None
    ok = not isinstance(last, _REFUSALS) and (failure is None or type(last) is not failure)
    reason = getattr(last, "reason", "") if not ok else ""
    return Reply(command_id=command_id, ok=ok, events=envs, reason=reason)


def _opens(event) -> bool:
    """An intent event opens a step; a claim logged before claims had an intent (no
    `probe_pending`) did its work before it was logged and opens nothing."""
    return not isinstance(event, ev.Claimed) or event.probe_pending
