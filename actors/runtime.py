"""Ray deployment: one named, detached, async actor per host and one for the controller.

The actors wrap the same `HostShell` and `Controller` the simulator runs. A host actor
is restarted by Ray when its process dies (`max_restarts=-1`); its `__init__` only
records its arguments, and the first call after a (re)start replays the log and
recovers what was in flight. Ray retries are at-least-once and unordered; every command
is idempotent by `command_id`, so that is safe. Nothing here blocks the event loop:
drivers are async, and `ray.get` is never called inside an actor.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
import uuid

import msgspec
import ray

from vmresize.protocol import commands as c
from vmresize.config import ClusterConfig, HostSpec
from vmresize.actors.controller import (Controller, HostEntry, HostUnavailable,
                                        OperationError)
from vmresize.actors.host import HostPolicy
from vmresize.actors.shell import HostEventLog, HostShell
from vmresize.drivers.fake import FakeDriver, FaultPlan, Latency
from vmresize.events.log import SegmentLog
from vmresize.events.schema import Resources
from vmresize.events.store import controller_dir, host_dir

HOST_PREFIX = "vmresize-host-"
CONTROLLER_NAME = "vmresize-controller"


def namespace_for(cfg: ClusterConfig) -> str:
    if cfg.ray_namespace:
        return cfg.ray_namespace
    digest = hashlib.sha256(cfg.state_dir.encode()).hexdigest()[:12]
    return f"vmresize-{digest}"


class Outcome(msgspec.Struct, frozen=True):
    """What a controller call returns over Ray: a value, or the refusal's message; and
    the controller's newest server change (`epoch`, `seq`) when it answered, so that a
    reader of `server_changes` knows how far to follow to see what the call did."""
    ok: bool
    value: object = None
    error: str = ""
    epoch: str = ""
    seq: int = 0


def make_driver(cfg: ClusterConfig, spec: HostSpec, state_path: str | None,
                faults: FaultPlan | None = None, latency_s: float = 0.0):
    overhead = Resources(spec.overhead_vcpus, spec.overhead_memory_mb, 0)
    if spec.driver == "libvirt":
        from vmresize.drivers.libvirt_driver import LibvirtDriver
        return LibvirtDriver(spec.name, spec.uri or "qemu:///session", spec.instances_path,
                             spec.capacity, use_cow_images=cfg.options.use_cow_images,
                             image=spec.image or None, overhead=overhead,
                             timeout_s=cfg.options.step_timeout_s)
    return FakeDriver(spec.name, spec.capacity, overhead=overhead, faults=faults,
                      latency=Latency(latency_s, latency_s / 2), state_path=state_path,
                      on_crash=lambda: os._exit(1))


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class HostActor:
    def __init__(self, cfg: ClusterConfig, name: str, faults: FaultPlan | None = None,
                 snapshot_every: int = 10_000, latency_s: float = 0.0):
        self.cfg = cfg
        self.latency_s = latency_s
        self.spec = cfg.host(name)
        self.faults = faults
        self.snapshot_every = snapshot_every
        self.shell: HostShell | None = None
        self._starting: asyncio.Future | None = None
        self.receiver = None
        self.started_at = time.time()

    async def _shell(self) -> HostShell:
        if self.shell is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self.shell

    async def _start(self) -> None:
        base = host_dir(self.cfg.state_dir, self.spec.name)
        base.mkdir(parents=True, exist_ok=True)
        raw = SegmentLog(base / "log", fsync=True)
        driver = make_driver(self.cfg, self.spec, str(base / "fake-driver-meta.json"),
                             self.faults, self.latency_s)
        policy = HostPolicy(name=self.spec.name, limit=self.cfg.limit(self.spec),
                            overhead=driver.overhead(None))
        shell = HostShell(policy, HostEventLog(raw, self.spec.name, time.time), driver,
                          capacity=self.spec.capacity,
                          step_timeout_s=self.cfg.options.step_timeout_s,
                          snapshot_dir=str(base / "snapshots"),
                          snapshot_every=self.snapshot_every,
                          sink_factory=self._sink_to)
        await shell.start()
        self.shell = shell

    def _sink_to(self, dest: str):
        from vmresize.actors.disks import RaySink
        return RaySink(self.cfg, dest)

    async def ready(self) -> dict:
        shell = await self._shell()
        return {"host": self.spec.name, "offset": shell.state.offsets.get(self.spec.name, 0),
                "recovered": shell.recovered, "pid": os.getpid()}

    async def handle(self, cmd: c.Command) -> c.Reply:
        shell = await self._shell()
        return await shell.handle(cmd)

    async def events_since(self, offset: int, limit: int | None = None) -> list:
        shell = await self._shell()
        return list(itertools.islice(shell.log.replay(offset), limit))

    async def snapshot(self) -> None:
        (await self._shell()).save_snapshot()

    @ray.method(max_task_retries=0)
    def crash(self) -> None:
        """Kill this actor's process, as a host crash would; Ray restarts it."""
        os._exit(1)

    # Disk transport: the destination side of a stream from another host.
    async def disk_call(self, method: str, *args):
        if self.receiver is None:
            from vmresize.drivers.transport import FileReceiver
            self.receiver = FileReceiver(self.spec.instances_path)
        return await getattr(self.receiver, method)(*args)


class RayTransport:
    """The controller's transport: calls host actors by name. A handle outlives the
    restarts of its actor; it is looked up once, off the event loop."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.handles: dict[str, object] = {}

    async def _handle(self, host: str):
        h = self.handles.get(host)
        if h is None:
            try:
                h = await asyncio.to_thread(ray.get_actor, HOST_PREFIX + host,
                                            self.namespace)
            except ValueError:
                raise HostUnavailable(f"{host}: no such host actor") from None
            self.handles[host] = h
        return h

    async def call(self, host: str, cmd: c.Command, timeout_s: float) -> c.Reply:
        return await self._remote(host, "handle", timeout_s, cmd)

    async def events_since(self, host: str, offset: int, timeout_s: float,
                           limit: int | None = None) -> list:
        return await self._remote(host, "events_since", timeout_s, offset, limit)

    async def _remote(self, host: str, method: str, timeout_s: float, *args):
        try:
            ref = getattr(await self._handle(host), method).remote(*args)
            return await asyncio.wait_for(ref, timeout_s)
        except asyncio.TimeoutError:
            raise HostUnavailable(f"{host}: no reply in {timeout_s} s") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise HostUnavailable(f"{host}: {type(exc).__name__}") from None


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class ControllerActor:
    def __init__(self, cfg: ClusterConfig, namespace: str):
        self.cfg = cfg
        self.namespace = namespace
        self.ctl: Controller | None = None
        self._starting: asyncio.Future | None = None
        # This process's run of the controller: change numbers restart with it.
        self.epoch = str(uuid.uuid4())
        self._change_waiters: list[asyncio.Future] = []

    async def _controller(self) -> Controller:
        if self.ctl is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self.ctl

    async def _start(self) -> None:
        cfg = self.cfg
        base = controller_dir(cfg.state_dir)
        base.mkdir(parents=True, exist_ok=True)
        o = cfg.options
        ctl = Controller(
            log=SegmentLog(base / "log", fsync=True), transport=RayTransport(self.namespace),
            hosts=[HostEntry(h.name, h.driver, h.capacity, cfg.limit(h)) for h in cfg.hosts],
            flavors=cfg.all_flavors(),
            options=o,
            clock=time.time, sleep=asyncio.sleep, new_id=lambda: str(uuid.uuid4()),
            snapshot_dir=str(base / "snapshots"), snapshot_every=10_000)
        await ctl.start()
        ctl.on_change = self._wake
        self.ctl = ctl

    def _wake(self) -> None:
        waiters, self._change_waiters = self._change_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _server_changes(self, ctl: Controller, epoch: str, since: int,
                              wait_s: float) -> tuple[str, int, list]:
        """`Controller.server_changes` after `since` of `epoch` (all of them for another
        epoch: a restarted controller numbers anew), waiting up to `wait_s` for one."""
        if epoch != self.epoch:
            since = 0
        if since > 0 and ctl.change_seq <= since:
            waiter = asyncio.get_running_loop().create_future()
            self._change_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, wait_s)
            except asyncio.TimeoutError:
                if waiter in self._change_waiters:    # no change: no waiter left behind
                    self._change_waiters.remove(waiter)
        seq, views = ctl.server_changes(since)
        return self.epoch, seq, views

    async def ready(self) -> dict:
        ctl = await self._controller()
        return {"instances": len(ctl.instances()), "pid": os.getpid()}

    @ray.method(max_task_retries=0)
    def crash(self) -> None:
        """Kill the controller's process; Ray restarts it and it resumes from its log."""
        os._exit(1)

    async def call(self, method: str, *args, **kw) -> Outcome:
        ctl = await self._controller()
        try:
            value = await getattr(ctl, method)(*args, **kw)
            return Outcome(True, value, epoch=self.epoch, seq=ctl.change_seq)
        except OperationError as exc:
            return Outcome(False, error=str(exc), epoch=self.epoch, seq=ctl.change_seq)

    async def query(self, what: str, *args) -> Outcome:
        ctl = await self._controller()
        try:
            if what == "instance":
                return Outcome(True, ctl.instance_by_name(args[0]))
            if what == "migration":
                return Outcome(True, ctl.migration(args[0]))
            if what == "instances":
                return Outcome(True, ctl.instances())
            if what == "migrations":
                return Outcome(True, ctl.migrations())
            if what == "hosts":
                await self._ping_all(ctl)
                return Outcome(True, ctl.host_infos())
            if what == "round_trips":
                return Outcome(True, ctl.round_trips)
            if what == "server":
                return Outcome(True, ctl.server(args[0]))
            if what == "servers":
                return Outcome(True, ctl.servers(*args))
            if what == "servers_of":
                return Outcome(True, ctl.servers_of(*args))
            if what == "server_changes":
                return Outcome(True, await self._server_changes(ctl, *args))
            if what == "flavors":
                return Outcome(True, ctl.flavor_list())
        except OperationError as exc:
            return Outcome(False, error=str(exc))
        raise ValueError(f"unknown query {what!r}")

    async def _ping_all(self, ctl: Controller) -> None:
        async def ping(name):
            try:
                await ctl.transport._remote(name, "ready", 5.0)
                ctl.down_until.pop(name, None)
            except HostUnavailable:
                ctl._mark_down(name)
        await asyncio.gather(*(ping(h) for h in ctl.hosts))


def start_actors(cfg: ClusterConfig, namespace: str, *, detached: bool = True,
                 faults: dict[str, FaultPlan] | None = None, snapshot_every: int = 10_000,
                 latency_s: float = 0.0):
    """Create (or find) every host actor and the controller; wait until all answer."""
    lifetime = "detached" if detached else None
    hosts = {}
    for spec in cfg.hosts:
        opts = dict(name=HOST_PREFIX + spec.name, namespace=namespace, lifetime=lifetime,
                    get_if_exists=True)
        if spec.resources:
            opts["resources"] = dict(spec.resources)
        hosts[spec.name] = HostActor.options(**opts).remote(
            cfg, spec.name, (faults or {}).get(spec.name), snapshot_every, latency_s)
    ray.get([h.ready.remote() for h in hosts.values()])
    controller = ControllerActor.options(name=CONTROLLER_NAME, namespace=namespace,
                                         lifetime=lifetime, get_if_exists=True).remote(
        cfg, namespace)
    ray.get(controller.ready.remote())
    return hosts, controller


def stop_actors(cfg: ClusterConfig, namespace: str) -> int:
    """Kill the controller and every host actor of this cluster; returns how many."""
    killed = 0
    names = [CONTROLLER_NAME] + [HOST_PREFIX + h.name for h in cfg.hosts]
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        killed += 1
    return killed

