"""The controller: accepts intents, schedules, and drives each migration step by step.

Orchestration, not choreography: the controller asks the destination to claim, the
source to move the disks, the destination to finish, then the source to confirm or the
destination and the source to revert. It logs every request (deduplicated by request
id) and every destination it chose in its own log, and learns the cluster's state from
the events the hosts return, folded by the same projections the auditor uses.

Each request is driven by `_run`, which asks the pure planner (actors/planner.py) for the
next action (one command to one host, a destination to log, another request to wait for,
or the end) and carries it out: the controller only sends, waits and records. The
controller never gives up on a host that is down: it retries with a bounded backoff
until it answers.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Protocol

import msgspec

from vmresize.actors.planner import (Answer, Choose, Ctx, End, Request, Send, WaitFor,
                                     candidates, plan)
from vmresize.config import Options
from vmresize.events import schema as ev
from vmresize.events.codec import decode_controller, encode
from vmresize.events.log import load_snapshot, save_snapshot
from vmresize.events.schema import ControllerEnvelope, Flavor, Resources
from vmresize.projections.fold import Projection, apply, merge_logs
from vmresize.projections.state import Instance, Ledger, Migration
from vmresize.protocol import commands as c
from vmresize.protocol.commands import Reply
from vmresize.protocol.states import MigrationStatus as MS
from vmresize.protocol.table import refuse_operation, same_host_refusal


PAGE_EVENTS = 5000  # events per events_since call: bounded replies, whatever a log's length
MAX_STEPS = 64      # a migration takes at most ~10 steps; more means a protocol bug


class OperationError(Exception):
    """A request refused or failed: unknown name, wrong state, NoValidHost, a step that
    failed and was rolled back. The message says which and why."""


class HostUnavailable(Exception):
    """The transport could not deliver a command or its reply (down, timed out)."""


class Transport(Protocol):
    async def call(self, host: str, cmd: c.Command, timeout_s: float) -> Reply: ...

    async def events_since(self, host: str, offset: int, timeout_s: float,
                           limit: int | None = None) -> list:
        """At most `limit` of the host's envelopes from `offset` on (a page)."""


def _trim(window: deque, size: int, named: Callable[[str], bool],
          drop: Callable[[str], None]) -> None:
    """Drop the oldest of `window` past `size`, except those an open request still
    names: they move to its newest end, and go once their request has ended."""
    for _ in range(len(window)):
        if len(window) <= size:
            return
        old = window.popleft()
        if named(old):
            window.append(old)
        else:
            drop(old)


class ControllerSnapshot(msgspec.Struct):
    view: Projection
    low: dict[str, int]
    applied: dict[str, list[int]]
    disks: dict[str, list[ev.DiskInfo]]
    names: dict[str, str]


_SNAPSHOT_DECODER = msgspec.msgpack.Decoder(ControllerSnapshot)


class HostInfo(msgspec.Struct, frozen=True):
    """A host as the controller's views show it."""
    name: str
    driver: str
    up: bool
    vcpus: int
    memory_mb: int
    disk_gb: int
    vcpus_used: int
    memory_mb_used: int
    disk_gb_used: int
    limit: Resources = ev.ZERO


class FlavorInfo(msgspec.Struct, frozen=True):
    """A flavor with its id, as the compute API shows it; `deleted` ones are kept so
    that instances booted with them still name them."""
    id: str
    flavor: Flavor
    is_public: bool = True
    description: str = ""
    deleted: bool = False


class ServerView(msgspec.Struct, frozen=True):
    """An instance as the compute API shows it: with its open migration (a resize no
    host has claimed yet shows there first), who booted it, from which image, and
    when it was created and last changed."""
    instance: Instance
    migration: Migration | None = None
    project: str = ""
    user: str = ""
    image_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


class HostEntry(msgspec.Struct, frozen=True):
    name: str
    driver: str
    capacity: Resources
    limit: Resources


class Controller:
    plan = staticmethod(plan)       # the pure planner (a test may give a broken one)
    def __init__(self, *, log, transport: Transport, hosts: list[HostEntry],
                 flavors: dict[str, Flavor], options: Options,
                 clock: Callable[[], float], sleep: Callable[[float], Awaitable],
                 new_id: Callable[[], str], spawn_task: Callable | None = None,
                 image: str = "", snapshot_dir: str | None = None,
                 snapshot_every: int = 0):
        self.log = log
        self.transport = transport
        self.hosts = {h.name: h for h in hosts}
        self.flavors = dict(flavors)
        # cluster.yaml's flavors are numbered in file order (Nova's m1.* ids 1-5);
        # flavors created later carry their id in their event.
        self.flavor_infos = {name: FlavorInfo(str(i + 1), f)
                             for i, (name, f) in enumerate(flavors.items())}
        self.opt = options
        self.clock = clock
        self.sleep = sleep
        self.new_id = new_id
        self.image = image
        self._spawn_task = spawn_task or asyncio.ensure_future
        self.view = Projection()
        self._applied: dict[str, set[int]] = {}    # host offsets >= _low folded so far
        self._low: dict[str, int] = {}              # host offsets below: all folded
        self._learned = 0
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.disks: dict[str, tuple] = {}          # migration id -> DiskMigrated.disks
        self.requests: dict[str, Request] = {}
        self.by_migration: dict[str, Request] = {}
        self.open_resizes: dict[str, Request] = {}     # instance uuid -> open resize
        self.open_finishes: dict[str, Request] = {}    # migration id -> open confirm/revert
        self.open_actions: dict[str, Request] = {}     # instance uuid -> open stop/start/reboot
        self.open_deletes: dict[str, Request] = {}     # instance uuid -> open delete
        self.open_boots: dict[str, Request] = {}       # instance uuid -> open boot
        self.names: dict[str, str] = {}                 # instance name -> uuid
        self.owners: dict[str, ev.OwnerRecorded] = {}   # instance uuid -> owner, image
        self.created: dict[str, float] = {}             # instance uuid -> boot requested
        self.touched: dict[str, float] = {}             # instance uuid -> last change
        self.booting: set[str] = set()                  # names of boots not yet ended
        self._free_cache: dict[str, tuple] = {}
        self.tasks: dict[str, asyncio.Future] = {}
        self._ended: deque[str] = deque()           # ended request ids, oldest first
        self._final: deque[str] = deque()           # ended migration ids, oldest first
        self._deleted: deque[str] = deque()         # deleted instance uuids, oldest first
        self.down_until: dict[str, float] = {}     # host -> when to try it again
        self.round_trips = 0
        self._confirm_timers: dict[str, asyncio.Future] = {}
        # Change numbers of the server views: `changed` holds each instance's last,
        # oldest first; `on_change` (if set) is told of every new one.
        self.change_seq = 0
        self.changed: dict[str, int] = {}
        self.on_change: Callable[[], None] | None = None

    def _changed(self, uuid: str) -> None:
        """The server view of `uuid` changed (an instance's event, its request's)."""
        if not uuid:
            return
        self.change_seq += 1
        self.changed.pop(uuid, None)
        self.changed[uuid] = self.change_seq
        if self.on_change is not None:
            self.on_change()

    def _uuid_of_migration(self, mid: str) -> str:
        mig = self.view.migrations.get(mid)
        if mig is not None:
            return mig.instance_uuid
        r = self.by_migration.get(mid)
        return r.instance_uuid if r is not None else ""

    # ------------------------------------------------------------------ log & view

    def _record(self, env: ControllerEnvelope) -> None:
        e = env.event
        t = type(e)
        if t is ev.BootRequested:
            self.created[e.instance_uuid] = env.wall_time
            self.booting.add(e.name)
            r = self.requests[e.request_id] = Request(
                e.request_id, "boot", e.instance_uuid, name=e.name, flavor=e.flavor,
                host=e.host, stopped=e.stopped, created_at=env.wall_time)
            self.open_boots[e.instance_uuid] = r
        elif t is ev.ActionRequested:
            inst = self.view.instances.get(e.instance_uuid)
            r = self.requests[e.request_id] = Request(
                e.request_id, "action", e.instance_uuid, name=inst.name if inst else "",
                action=e.action, hard=e.hard, created_at=env.wall_time)
            (self.open_deletes if e.action == "delete" else self.open_actions)[
                e.instance_uuid] = r
        elif t is ev.ResizeRequested:
            r = Request(e.request_id, "resize", e.instance_uuid, e.migration_id,
                         flavor=e.new_flavor, host=e.host, migration_type=e.migration_type,
                         created_at=e.created_at or env.wall_time)
            self.requests[e.request_id] = r
            self.by_migration[e.migration_id] = r
            self.open_resizes[e.instance_uuid] = r
        elif t in (ev.ConfirmRequested, ev.RevertRequested):
            kind = "confirm" if t is ev.ConfirmRequested else "revert"
            r = self.requests[e.request_id] = Request(e.request_id, kind,
                                                       migration_id=e.migration_id)
            self.open_finishes[e.migration_id] = r
        elif t is ev.DestinationChosen:
            self.requests[e.request_id].attempts.append(e.dest)
        elif t is ev.RequestEnded:
            r = self.requests[e.request_id]
            r.ended, r.ok, r.outcome = True, e.ok, e.outcome
            if self.open_resizes.get(r.instance_uuid) is r:
                del self.open_resizes[r.instance_uuid]
            if self.open_finishes.get(r.migration_id) is r:
                del self.open_finishes[r.migration_id]
            for index in (self.open_actions, self.open_deletes, self.open_boots):
                if index.get(r.instance_uuid) is r:
                    del index[r.instance_uuid]
            if r.kind == "boot":
                self.booting.discard(r.name)
            r.answers = {}
            self.tasks.pop(r.request_id, None)
            self._forget_requests(r.request_id)
        elif t is ev.OwnerRecorded:
            self.owners[e.instance_uuid] = e
        elif t is ev.FlavorCreated:
            self.flavors[e.flavor.name] = e.flavor
            self.flavor_infos[e.flavor.name] = FlavorInfo(e.flavor_id, e.flavor,
                                                          e.is_public, e.description)
        elif t is ev.FlavorDeleted:
            self.flavors.pop(e.name, None)
            info = self.flavor_infos.get(e.name)
            if info is not None:
                self.flavor_infos[e.name] = msgspec.structs.replace(info, deleted=True)
        if t is ev.DestinationChosen or t is ev.RequestEnded:
            r = self.requests.get(e.request_id)
            self._changed((r.instance_uuid if r is not None else "")
                          or self._uuid_of_migration(e.migration_id))
        elif t not in (ev.FlavorCreated, ev.FlavorDeleted):
            self._changed(getattr(e, "instance_uuid", "")
                          or self._uuid_of_migration(getattr(e, "migration_id", "")))

    def _forget_requests(self, ended_id: str) -> None:
        """Keep the last `retain_requests` ended requests (their answers make a repeated
        request id idempotent); older ones are forgotten."""
        self._ended.append(ended_id)
        while len(self._ended) > self.opt.retain_requests:
            old = self.requests.pop(self._ended.popleft(), None)
            if old is not None and self.by_migration.get(old.migration_id) is old:
                del self.by_migration[old.migration_id]

    async def _log(self, *events) -> None:
        envs = []

        def stamp(offset, event):
            env = ControllerEnvelope("controller", offset, self.clock(), event)
            envs.append(env)
            return encode(env)

        await self.log.append_async(list(events), stamp)
        for env in envs:
            self._record(env)

    def learn(self, envelopes) -> None:
        """Fold host events into the view, each once, whatever order replies come in."""
        for env in envelopes:
            seen = self._applied.setdefault(env.host, set())
            if env.offset in seen or env.offset < self._low.get(env.host, 0):
                continue
            seen.add(env.offset)
            low = self._low.get(env.host, 0)
            while low in seen:          # offsets below `low` are all folded
                seen.discard(low)
                low += 1
            self._low[env.host] = low
            mid = getattr(env.event, "migration_id", "")
            was_final = mid and self._is_final(mid)
            apply(self.view, env)
            if mid and not was_final and self._is_final(mid):
                self._forget_migrations(mid)
            self._learned += 1
            uuid = getattr(env.event, "instance_uuid", None)
            if uuid:
                self.touched[uuid] = env.wall_time
            self._changed(uuid or self._uuid_of_migration(mid))
            if type(env.event) is ev.SpawnStarted:
                self.names[env.event.name] = env.event.instance_uuid
            if type(env.event) is ev.DiskMigrated:
                self.disks[env.event.migration_id] = env.event.disks
            elif type(env.event) is ev.Deleted:
                self._forget_deleted(env.event.instance_uuid)

    def _is_final(self, mid: str) -> bool:
        mig = self.view.migrations.get(mid)
        return mig is not None and mig.final

    def _forget_migrations(self, final_id: str) -> None:
        """Keep the last `retain_migrations` ended migrations in the view (the logs keep
        them all: `vmresize events` and the auditor read them there), and any that an
        open request still names, until it ends."""
        self._final.append(final_id)
        _trim(self._final, self.opt.retain_migrations, self._migration_named,
              self._drop_migration)

    def _forget_deleted(self, uuid: str) -> None:
        """Keep the last `retain_deleted` deleted instances in the view (the compute API
        lists them, as Nova lists deleted servers until they are archived; the logs
        keep them all), and any that an open request still names."""
        self._deleted.append(uuid)
        _trim(self._deleted, self.opt.retain_deleted, self._instance_named,
              self._drop_instance)

    def _migration_named(self, mid: str) -> bool:
        resize = self.by_migration.get(mid)
        return mid in self.open_finishes or (resize is not None and not resize.ended)

    def _instance_named(self, uuid: str) -> bool:
        return any(uuid in index for index in (self.open_resizes, self.open_actions,
                                               self.open_deletes, self.open_boots))

    def _drop_migration(self, mid: str) -> None:
        self.view.migrations.pop(mid, None)
        self.disks.pop(mid, None)

    def _drop_instance(self, uuid: str) -> None:
        inst = self.view.instances.get(uuid)
        if inst is None or not inst.deleted:
            return              # gone already, or back
        del self.view.instances[uuid]
        for per_instance in (self.owners, self.created, self.touched, self.changed):
            per_instance.pop(uuid, None)
        if self.names.get(inst.name) == uuid:
            del self.names[inst.name]

    async def start(self) -> None:
        """Replay our log, load the newest snapshot of our view, pull every host's
        events after it, resume every open request."""
        for offset, payload in self.log.read(0):
            self._record(decode_controller(payload))
        self._load_snapshot()
        pulled = {host: await self._pull(host, self._low.get(host, 0))
                  for host in sorted(self.hosts)}
        versions = {u: i.version for u, i in self.view.instances.items()}
        self.learn(merge_logs(pulled, versions))     # instance events in version order
        # our log's replay named every instance ever booted: keep those still in view
        for per_instance in (self.owners, self.created, self.touched):
            for uuid in [u for u in per_instance if u not in self.view.instances
                         and u not in self.open_boots]:
                del per_instance[uuid]
        for r in list(self.requests.values()):
            if not r.ended:
                self._drive(r)
        for mig in self.view.migrations.values():
            if mig.status == MS.FINISHED:
                self._arm_auto_confirm(mig)

    async def _pull(self, host: str, offset: int = 0) -> list:
        """The host's events from `offset` on, a page of PAGE_EVENTS at a time."""
        envs: list = []
        while True:
            page = await self._pull_page(host, offset + len(envs))
            envs += page
            if len(page) < PAGE_EVENTS:
                return envs

    async def _pull_page(self, host: str, offset: int) -> list:
        delay = self.opt.retry_backoff_s
        while True:
            try:
                envs = await self.transport.events_since(host, offset,
                                                         self.opt.step_timeout_s,
                                                         PAGE_EVENTS)
                self.down_until.pop(host, None)
                return envs
            except HostUnavailable:
                self._mark_down(host)
                await self.sleep(delay)
                delay = min(delay * 2, self.opt.retry_backoff_max_s)

    # ------------------------------------------------------------------ sending

    async def _send(self, host: str, cmd: c.Command) -> Reply:
        """Deliver `cmd` until its host answers. Same command id every time."""
        delay = self.opt.retry_backoff_s
        while True:
            try:
                self.round_trips += 1
                reply = await self.transport.call(host, cmd, self.opt.step_timeout_s * 2)
            except HostUnavailable:
                self._mark_down(host)
                await self.sleep(delay)
                delay = min(delay * 2, self.opt.retry_backoff_max_s)
                continue
            self.down_until.pop(host, None)
            self.learn(reply.events)
            self.maybe_snapshot()
            if not reply.ok and reply.retryable and not reply.events:
                await self.sleep(delay)      # another step of the instance is under way
                delay = min(delay * 2, self.opt.retry_backoff_max_s)
                continue
            return reply

    async def _send_cleanup(self, host: str, cmd, step: str) -> Reply:
        """A step that can only be retried: retry a failing driver a bounded number of
        times, then record it as failed (not rolled back) so the audit shows it."""
        for _ in range(self.opt.cleanup_attempts):
            reply = await self._send(host, cmd)
            if reply.ok or not reply.retryable:
                return reply
            await self.sleep(self.opt.retry_backoff_s)
        abandon = c.AbandonStep(command_id=cmd.command_id + ":abandon",
                                instance_uuid=cmd.instance_uuid,
                                instance_version=self._version(cmd.instance_uuid),
                                migration_id=cmd.migration_id, step=step,
                                reason=reply.reason, abandons=cmd.command_id)
        return await self._send(host, abandon)

    # ------------------------------------------------------------------ snapshots

    def maybe_snapshot(self) -> None:
        if self.snapshot_every and self._learned >= self.snapshot_every:
            self.save_snapshot()

    def save_snapshot(self) -> None:
        """Store the view with, per host, the offsets it covers: a restart then pulls
        only what came after (the controller's own log is small and replayed whole)."""
        if not self.snapshot_dir:
            return
        for host, seen in self._applied.items():       # compact: a prefix becomes _low
            low = self._low.get(host, 0)
            while low in seen:
                seen.discard(low)
                low += 1
            self._low[host] = low
        snap = ControllerSnapshot(self.view, dict(self._low),
                                  {h: sorted(s) for h, s in self._applied.items()},
                                  {m: list(d) for m, d in self.disks.items()}, dict(self.names))
        save_snapshot(self.snapshot_dir, self.log.next_offset, msgspec.msgpack.encode(snap))
        self._learned = 0

    def _load_snapshot(self) -> None:
        loaded = load_snapshot(self.snapshot_dir) if self.snapshot_dir else None
        if loaded is None:
            return
        snap = _SNAPSHOT_DECODER.decode(loaded[1])
        self.view, self._low = snap.view, dict(snap.low)
        self._applied = {h: set(o) for h, o in snap.applied.items()}
        self.disks = {m: tuple(d) for m, d in snap.disks.items()}
        self.names = dict(snap.names)
        self._deleted = deque(u for u, i in self.view.instances.items() if i.deleted)

    def _mark_down(self, host: str) -> None:
        self.down_until[host] = self.clock() + self.opt.retry_backoff_max_s * 2

    def is_up(self, host: str) -> bool:
        """Up unless it failed to answer within the last few seconds."""
        return self.clock() >= self.down_until.get(host, 0.0)

    def _version(self, uuid: str) -> int:
        inst = self.view.instances.get(uuid)
        return inst.version if inst else 0

    # ------------------------------------------------------------------ queries

    def instance_by_name(self, name: str) -> Instance:
        inst = self.view.instances.get(self.names.get(name, ""))
        if inst is not None and inst.deleted:
            # A name booted again after a delete; host events may arrive in any order.
            inst = next((i for i in self.view.instances.values()
                         if i.name == name and not i.deleted), None)
            if inst is not None:
                self.names[name] = inst.uuid
        if inst is None or inst.deleted:
            raise OperationError(f"no instance named {name!r}")
        return inst

    def migration(self, mid: str) -> Migration:
        mig = self.view.migrations.get(mid)
        if mig is not None:
            return mig
        r = self.by_migration.get(mid)
        if r is None:
            raise OperationError(f"no migration {mid!r}")
        return self._pending_migration(r)

    def _pending_migration(self, r: Request) -> Migration:
        """A migration that no host has claimed yet (scheduling, or NoValidHost)."""
        inst = self.view.instances.get(r.instance_uuid)
        old = inst.flavor if inst else self.flavors.get(r.flavor)
        status = MS.ERROR if r.ended else MS.PRE_MIGRATING
        return Migration(id=r.migration_id, instance_uuid=r.instance_uuid,
                         dest_settled=r.ended, source_settled=r.ended,
                         source_compute=inst.host if inst else "",
                         dest_compute=r.attempts[-1] if r.attempts else "",
                         status=status, migration_type=r.migration_type, old_flavor=old,
                         new_flavor=self.flavors[r.flavor], created_at=r.created_at,
                         updated_at=r.created_at, reason=r.outcome)

    def migrations(self) -> list[Migration]:
        out = dict(self.view.migrations)
        for mid, r in self.by_migration.items():
            if mid not in out:
                out[mid] = self._pending_migration(r)
        return sorted(out.values(), key=lambda m: (m.created_at, m.id))

    def instances(self) -> list[Instance]:
        return sorted((i for i in self.view.instances.values() if not i.deleted),
                      key=lambda i: i.name)

    def _server_view(self, inst: Instance) -> ServerView:
        owner = self.owners.get(inst.uuid)
        created = self.created.get(inst.uuid, 0.0)
        return ServerView(inst, self.open_migration_of(inst.uuid),
                          owner.project_id if owner else "", owner.user_id if owner else "",
                          owner.image_id if owner else "", created,
                          max(created, self.touched.get(inst.uuid, 0.0)))

    def server(self, uuid: str) -> ServerView:
        """An instance by uuid (deleted ones too) as the compute API shows it."""
        inst = self.view.instances.get(uuid)
        if inst is None:
            raise OperationError(f"no instance with uuid {uuid!r}")
        return self._server_view(inst)

    def servers_of(self, uuids: list[str]) -> list[ServerView | None]:
        """`server` of each uuid in one call (None for an unknown one): the compute
        API's concurrent lookups, batched."""
        return [self._server_view(i) if (i := self.view.instances.get(u)) is not None
                else None for u in uuids]

    def server_changes(self, since: int) -> tuple[int, list[ServerView]]:
        """The newest change number and the server views (deleted ones too) changed
        after change `since`: every server for 0, none when nothing changed."""
        if since <= 0:
            return self.change_seq, [self._server_view(i)
                                     for i in self.view.instances.values()]
        out = []
        for uuid in reversed(self.changed):
            if self.changed[uuid] <= since:
                break
            inst = self.view.instances.get(uuid)
            if inst is not None:
                out.append(self._server_view(inst))
        return self.change_seq, out

    def servers(self, deleted: bool = False) -> list[ServerView]:
        return [self._server_view(i)
                for i in sorted(self.view.instances.values(), key=lambda i: i.name)
                if i.deleted == deleted]

    def flavor_list(self) -> list[FlavorInfo]:
        """Every flavor with its id, deleted ones included (marked)."""
        return list(self.flavor_infos.values())

    async def create_flavor(self, flavor: Flavor, flavor_id: str | None = None,
                            is_public: bool = True, description: str = "",
                            request_id: str | None = None) -> FlavorInfo:
        request_id = request_id or self.new_id()
        if flavor.name in self.flavors:
            raise OperationError(f"a flavor named {flavor.name!r} already exists")
        ids = {i.id for i in self.flavor_infos.values() if not i.deleted}
        if flavor_id is None:
            numbers = [int(i.id) for i in self.flavor_infos.values() if i.id.isdigit()]
            flavor_id = str(max(numbers, default=0) + 1)
        elif flavor_id in ids:
            raise OperationError(f"a flavor with id {flavor_id!r} already exists")
        await self._log(ev.FlavorCreated(request_id=request_id, flavor=flavor,
                                         flavor_id=flavor_id, is_public=is_public,
                                         description=description))
        return self.flavor_infos[flavor.name]

    async def delete_flavor(self, flavor_id: str, request_id: str | None = None) -> None:
        for name, info in self.flavor_infos.items():
            if info.id == flavor_id and not info.deleted:
                await self._log(ev.FlavorDeleted(request_id=request_id or self.new_id(),
                                                 name=name, flavor_id=flavor_id))
                return
        raise OperationError(f"no flavor with id {flavor_id!r}")

    def host_infos(self) -> list[HostInfo]:
        out = []
        for name, h in sorted(self.hosts.items()):
            used = self.view.ledgers.get(name, Ledger(host=name)).used
            out.append(HostInfo(name, h.driver, self.is_up(name), h.capacity.vcpus,
                                h.capacity.memory_mb, h.capacity.disk_gb, used.vcpus,
                                used.memory_mb, used.disk_gb, h.limit))
        return out

    def open_migration_of(self, uuid: str) -> Migration | None:
        r = self.open_resizes.get(uuid)
        if r is not None:
            return self.migration(r.migration_id)
        inst = self.view.instances.get(uuid)
        if inst and inst.migration_id:
            mig = self.view.migrations.get(inst.migration_id)
            if mig is not None and not mig.final:
                return mig
        return None

    # ------------------------------------------------------------------ scheduling

    def _free(self, host: str) -> Resources:
        ledger = self.view.ledgers.get(host)
        cached = self._free_cache.get(host)
        if cached is not None and cached[0] is ledger:    # ledgers are immutable
            return cached[1]
        free = self.hosts[host].limit - (ledger.used if ledger else ev.ZERO)
        self._free_cache[host] = (ledger, free)
        return free

    def candidates(self, need: Resources, source: str, exclude: set[str],
                   forced: str = "") -> list[str]:
        now = self.clock()
        down = {h for h, until in self.down_until.items() if now < until}
        return candidates(self.view, self.hosts, down, need, source, exclude, forced,
                          self.opt.allow_resize_to_same_host, self._free)

    # ------------------------------------------------------------------ intents

    def _flavor(self, name: str) -> Flavor:
        try:
            return self.flavors[name]
        except KeyError:
            raise OperationError(f"unknown flavor {name!r} (known: "
                                 f"{', '.join(sorted(self.flavors))})") from None

    def _check_host(self, host: str | None) -> None:
        if host and host not in self.hosts:
            raise OperationError(f"unknown host {host!r} (known: "
                                 f"{', '.join(sorted(self.hosts))})")

    async def boot(self, name: str, flavor: str, host: str | None = None,
                   stopped: bool = False, request_id: str | None = None,
                   owner: ev.OwnerRecorded | None = None) -> Instance:
        """`owner` (the compute API's caller and image) is logged with the request."""
        request_id = request_id or self.new_id()
        if request_id not in self.requests:
            self._flavor(flavor)
            self._check_host(host)
            try:
                live = self.instance_by_name(name)
            except OperationError:
                live = None
            if live is not None or name in self.booting:
                raise OperationError(f"an instance named {name!r} already exists")
            uuid = self.new_id()
            boot = ev.BootRequested(request_id=request_id, instance_uuid=uuid, name=name,
                                    flavor=flavor, host=host or "", stopped=stopped)
            if owner is None:
                await self._log(boot)
            else:
                await self._log(boot, msgspec.structs.replace(
                    owner, request_id=request_id, instance_uuid=uuid))
        r = self.requests[request_id]
        await self._wait(self._drive(r))
        if not r.ok:
            raise OperationError(r.outcome)
        return self.view.instances[r.instance_uuid]

    async def resize(self, name: str, flavor: str | None, host: str | None = None,
                     wait: bool = True, request_id: str | None = None) -> Migration:
        """Resize to `flavor`, or cold-migrate when `flavor` is None or the same."""
        request_id = request_id or self.new_id()
        if request_id not in self.requests:
            await self._new_resize(request_id, name, flavor, host)
        r = self.requests[request_id]
        task = self._drive(r)
        if not wait:
            return self.migration(r.migration_id)
        await self._wait(task)
        mig = self.migration(r.migration_id)
        if not r.ok:
            raise OperationError(r.outcome)
        return mig

    async def _new_resize(self, request_id, name, flavor, host) -> None:
        inst = self.instance_by_name(name)
        new = self._flavor(flavor) if flavor else inst.flavor
        self._check_host(host)
        kind = "migration" if new == inst.flavor else "resize"
        busy = self.open_migration_of(inst.uuid)
        if busy is not None:
            raise OperationError(f"instance {name!r} is already in migration {busy.id} "
                                 f"({busy.status})")
        self._refuse_if_busy(kind if kind == "resize" else "migrate", inst)
        if host:
            same = same_host_refusal(inst.host, host, self.opt.allow_resize_to_same_host)
            if same:
                raise OperationError(f"--host {host}: {same}")
        await self._log(ev.ResizeRequested(request_id=request_id,
                                           migration_id=self.new_id(),
                                           instance_uuid=inst.uuid, new_flavor=new.name,
                                           migration_type=kind, host=host or "",
                                           created_at=self.clock()))

    async def confirm(self, name: str, request_id: str | None = None) -> Migration:
        return await self._finish_request(name, "confirm", request_id)

    async def revert(self, name: str, request_id: str | None = None) -> Migration:
        return await self._finish_request(name, "revert", request_id)

    async def _finish_request(self, name, kind, request_id) -> Migration:
        request_id = request_id or self.new_id()
        if request_id not in self.requests:
            inst = self.instance_by_name(name)
            mig = self.view.migrations.get(inst.migration_id)
            busy = self.open_finishes.get(mig.id) if mig is not None else None
            if busy is not None:
                raise OperationError(f"cannot {kind} {name!r}: a {busy.kind} of "
                                     f"migration {mig.id} is under way")
            if mig is None or mig.status != MS.FINISHED:
                state = f"{inst.vm_state}" + (f", migration {mig.status}" if mig else "")
                raise OperationError(f"cannot {kind} {name!r}: it is not waiting in "
                                     f"VERIFY_RESIZE ({state})")
            cls = ev.ConfirmRequested if kind == "confirm" else ev.RevertRequested
            await self._log(cls(request_id=request_id, migration_id=mig.id))
        r = self.requests[request_id]
        await self._wait(self._drive(r))
        if not r.ok:
            raise OperationError(r.outcome)
        return self.migration(r.migration_id)

    def _refuse_if_busy(self, op: str, inst: Instance) -> None:
        """The protocol table's legality of a user operation, and one at a time."""
        why = refuse_operation(op, inst.name, inst.vm_state, inst.task_state, inst.deleted)
        if why:
            raise OperationError(why)
        if op == "delete":
            return
        busy = self.open_actions.get(inst.uuid) or self.open_deletes.get(inst.uuid)
        if busy is not None:
            raise OperationError(f"cannot {op} {inst.name!r}: a {busy.action} of it is "
                                 f"under way")

    async def act(self, name: str, action: str, hard: bool = False,
                  request_id: str | None = None) -> Instance:
        """stop | start | reboot (`hard`) | delete of the instance named `name`; returns
        it. Delete confirms a resize waiting in VERIFY_RESIZE first and rolls back one
        under way first (both ends release), so nothing is left held."""
        request_id = request_id or self.new_id()
        if request_id not in self.requests:
            inst = self.instance_by_name(name)
            joined = self.open_deletes.get(inst.uuid) if action == "delete" else None
            if joined is not None:
                request_id = joined.request_id      # one delete at a time: join it
            else:
                if action != "delete" and self.open_migration_of(inst.uuid) is not None:
                    raise OperationError(f"cannot {action} {name!r}: it is in a "
                                         f"migration ({inst.vm_state}/{inst.task_state})")
                self._refuse_if_busy(action, inst)
                await self._log(ev.ActionRequested(request_id=request_id,
                                                   instance_uuid=inst.uuid,
                                                   action=action, hard=hard))
        r = self.requests[request_id]
        await self._wait(self._drive(r))
        if not r.ok:
            raise OperationError(r.outcome)
        return self.view.instances[r.instance_uuid]

    async def wait_migration(self, mid: str) -> Migration:
        """Wait until the resize request of `mid` ended; raise if it failed."""
        r = self.by_migration.get(mid)
        if r is None:
            raise OperationError(f"no migration {mid!r}")
        await self._wait(self._drive(r))
        if not r.ok:
            raise OperationError(r.outcome)
        return self.migration(mid)

    async def _wait(self, task) -> None:
        await asyncio.shield(task)

    # ------------------------------------------------------------------ driving

    def _drive(self, r: Request):
        task = self.tasks.get(r.request_id)
        if task is None or (task.done() and not r.ended):
            task = self._spawn_task(self._run(r))
            self.tasks[r.request_id] = task
        return task

    def _ctx(self) -> Ctx:
        now = self.clock()
        down = {h for h, until in self.down_until.items() if now < until}
        return Ctx(view=self.view, flavors=self.flavors, max_attempts=self.opt.max_attempts,
                   cleanup_attempts=self.opt.cleanup_attempts,
                   allow_same_host=self.opt.allow_resize_to_same_host, disks=self.disks,
                   open_resizes=self.open_resizes, open_finishes=self.open_finishes,
                   open_actions=self.open_actions, open_deletes=self.open_deletes,
                   open_boots=self.open_boots, image=self.image,
                   candidates=lambda need, source, exclude, forced: candidates(
                       self.view, self.hosts, down, need, source, exclude, forced,
                       self.opt.allow_resize_to_same_host, self._free))

    async def _run(self, r: Request) -> None:
        """Ask the planner for the next action and carry it out, until the request ends."""
        for _ in range(MAX_STEPS):
            if r.ended:
                return
            action = self.plan(self._ctx(), r)
            if isinstance(action, End):
                await self._end(r, action.ok, action.outcome)
            elif isinstance(action, Choose):
                await self._log(ev.DestinationChosen(
                    request_id=r.request_id, migration_id=r.migration_id,
                    dest=action.dest, attempt=len(r.attempts) + 1))
            elif isinstance(action, WaitFor):
                await self._wait(self._drive(self.requests[action.request_id]))
            else:
                if action.attempt:
                    r.attempts.append(action.host)
                reply = await self._deliver(action)
                r.answers[action.cmd.command_id] = Answer(reply.ok, reply.reason,
                                                          len(reply.events))
        if not r.ended:
            raise AssertionError(f"request {r.request_id} ({r.kind}) did not settle in "
                                 f"{MAX_STEPS} steps")

    async def _deliver(self, action: Send) -> Reply:
        if action.mode == "cleanup":
            return await self._send_cleanup(action.host, action.cmd, action.step)
        if action.mode == "until_ok":
            return await self._send_until_ok(action.host, action.cmd)
        return await self._send(action.host, action.cmd)

    async def _send_until_ok(self, host, cmd) -> Reply:
        for _ in range(self.opt.cleanup_attempts * 4):
            reply = await self._send(host, cmd)
            if reply.ok or not reply.retryable:
                return reply
            await self.sleep(self.opt.retry_backoff_s)
        return reply

    async def _end(self, r: Request, ok: bool, outcome: str = "") -> None:
        if r.ended:
            return
        await self._log(ev.RequestEnded(request_id=r.request_id, ok=ok, outcome=outcome,
                                        migration_id=r.migration_id))
        mig = self.view.migrations.get(r.migration_id) if r.kind == "resize" else None
        if mig is not None and mig.status == MS.FINISHED:
            self._arm_auto_confirm(mig)

    def _name(self, mig: Migration) -> str:
        inst = self.view.instances.get(mig.instance_uuid)
        return inst.name if inst else mig.instance_uuid

    def _arm_auto_confirm(self, mig: Migration) -> None:
        window = self.opt.resize_confirm_window_s
        if window <= 0 or mig.id in self._confirm_timers:
            return
        self._confirm_timers[mig.id] = self._spawn_task(self._auto_confirm(mig, window))

    async def _auto_confirm(self, mig: Migration, window: float) -> None:
        await self.sleep(max(0.0, mig.updated_at + window - self.clock()))
        current = self.view.migrations.get(mig.id)
        if current is None or current.status != MS.FINISHED:
            return
        if mig.id in self.open_finishes:
            return
        try:
            await self.confirm(self._name(current), request_id=f"{mig.id}:auto-confirm")
        except OperationError:
            pass     # the migration moved on meanwhile (a revert won the race)
