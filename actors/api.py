"""The Python API: `Cluster.start(...)`, then boot, resize, confirm, revert, views.

    from vmresize.actors import Cluster
    cluster = Cluster.start("cluster.yaml", state_dir="/tmp/state")
    cluster.boot("web-1", "m1.small")
    handle = cluster.resize("web-1", "m1.medium")
    handle.wait(60)
    cluster.confirm("web-1")
    cluster.stop()

Views are the frozen structs the projections build (`Instance`, `Migration`) and
`HostInfo`. Refusals raise `OperationError` with the controller's message.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import ray

from vmresize.config import ClusterConfig, load
from vmresize.actors.controller import FlavorInfo, HostInfo, OperationError, ServerView
from vmresize.events.schema import Flavor, OwnerRecorded
from vmresize.actors.runtime import (CONTROLLER_NAME, HOST_PREFIX, namespace_for,
                                     start_actors, stop_actors)
from vmresize.offline.audit import audit
from vmresize.projections.audit import AuditReport
from vmresize.projections.state import Instance, Migration

META_FILE = "ray-meta.json"


class NoCluster(Exception):
    """No cluster is up for this state directory."""


def read_meta(state_dir: str) -> dict | None:
    try:
        return json.loads((Path(state_dir) / META_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_meta(state_dir: str, meta: dict) -> None:
    path = Path(state_dir) / META_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def _init_ray(address: str | None, namespace: str) -> bool:
    """Connect to (or start, when `address` is None) Ray; True if we started it."""
    if ray.is_initialized():
        return False
    kw = dict(namespace=namespace, logging_level="ERROR", log_to_driver=False,
              configure_logging=False)
    if address:
        ray.init(address=address, **kw)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new Ray of our own, never one that `ray start` left on this machine.
    ray.init(address="local", include_dashboard=False, **kw)
    return True


class MigrationHandle:
    """A resize or cold migration in flight. `wait` returns it finished (VERIFY_RESIZE)
    or raises OperationError saying why it failed."""

    def __init__(self, cluster: "Cluster", migration: Migration):
        self.cluster = cluster
        self.id = migration.id
        self.first = migration

    def status(self) -> Migration:
        return self.cluster._query("migration", self.id)

    def wait(self, timeout_s: float | None = None) -> Migration:
        ref = self.cluster.controller.call.remote("wait_migration", self.id)
        return self.cluster._unwrap(ray.get(ref, timeout=timeout_s))


def _kill_and_wait(handle, timeout_s: float) -> float:
    """Kill an actor's process through its `crash` method and wait until a new process
    answers `ready`; returns the seconds that took."""
    before = ray.get(handle.ready.remote())["pid"]
    start = time.monotonic()
    try:
        ray.get(handle.crash.remote(), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        pass
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        try:
            info = ray.get(handle.ready.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            continue
        if info["pid"] != before:
            return time.monotonic() - start
    raise TimeoutError(f"actor did not come back within {timeout_s} s")


class _ClassOrInstance:
    """`Cluster.start(config)` starts a cluster; `cluster.start(name)` starts an instance
    (DESIGN §7 names both `start`): the class and its instances each get their own."""

    def __init__(self, on_class, on_instance):
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj, owner):
        if obj is None:
            return self.on_class.__get__(owner, owner)
        return self.on_instance.__get__(obj, owner)


class Cluster:
    def __init__(self, cfg: ClusterConfig, namespace: str, controller, owns_ray: bool,
                 owns_actors: bool):
        self.cfg = cfg
        self.namespace = namespace
        self.controller = controller
        self.owns_ray = owns_ray
        self.owns_actors = owns_actors
        self.last_change = ("", 0)     # newest (epoch, seq) a call's answer carried

    def _start_cluster(cls, config_path, state_dir=None, ray_address=None, *, detached=False,
              faults=None, snapshot_every: int = 10_000,
              latency_s: float = 0.0) -> "Cluster":
        """Start the host actors and the controller (on a local Ray started here unless
        `ray_address` is given) and return once every host has replayed its log."""
        cfg = config_path if isinstance(config_path, ClusterConfig) else load(
            config_path, state_dir)
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        namespace = namespace_for(cfg)
        owns_ray = _init_ray(ray_address, namespace)
        hosts, controller = start_actors(cfg, namespace, detached=detached, faults=faults,
                                         snapshot_every=snapshot_every, latency_s=latency_s)
        cluster = cls(cfg, namespace, controller, owns_ray, owns_actors=True)
        cluster.host_handles = hosts    # actors that are not detached live while referenced
        return cluster

    def _start_instance(self, name: str, *, request_id: str | None = None) -> Instance:
        """Power the instance on (a running one: nothing to do)."""
        return self._call("act", name, "start", request_id=request_id)

    start = _ClassOrInstance(classmethod(_start_cluster), _start_instance)

    @classmethod
    def connect(cls, cfg: ClusterConfig, ray_address: str | None = None) -> "Cluster":
        """Join a cluster that `vmresize up` left running."""
        meta = read_meta(cfg.state_dir)
        address = ray_address or (meta or {}).get("address")
        if not address:
            raise NoCluster(f"no cluster is up for state directory {cfg.state_dir}; "
                            f"start one with `vmresize up`")
        namespace = (meta or {}).get("namespace") or namespace_for(cfg)
        try:
            _init_ray(address, namespace)
            controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise NoCluster(f"no cluster answers at {address} for {cfg.state_dir} "
                            f"({type(exc).__name__}); start one with `vmresize up`") from None
        return cls(cfg, namespace, controller, owns_ray=False, owns_actors=False)

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _unwrap(outcome):
        if not outcome.ok:
            raise OperationError(outcome.error)
        return outcome.value

    def _call(self, method: str, *args, **kw):
        # A request id chosen here makes Ray's retries (at-least-once) harmless.
        if kw.get("request_id") is None:
            kw["request_id"] = str(uuid.uuid4())
        outcome = ray.get(self.controller.call.remote(method, *args, **kw))
        epoch, seq = self.last_change
        if outcome.epoch != epoch or outcome.seq > seq:
            self.last_change = (outcome.epoch, outcome.seq)
        return self._unwrap(outcome)

    def _query(self, what: str, *args):
        return self._unwrap(ray.get(self.controller.query.remote(what, *args)))

    # ------------------------------------------------------------------ intents

    # `request_id`: the caller's id for the request (the compute API passes its HTTP
    # request id); it is logged with the request and dedupes a repeated call.

    def boot(self, name: str, flavor: str, host: str | None = None,
             stopped: bool = False, *, request_id: str | None = None,
             project_id: str = "", user_id: str = "", image_id: str = "") -> Instance:
        """Boot; `project_id`, `user_id`, `image_id` (the compute API's caller and
        image) are logged with the request when given."""
        owner = None
        if project_id or user_id or image_id:
            owner = OwnerRecorded(request_id="", instance_uuid="", project_id=project_id,
                                  user_id=user_id, image_id=image_id)
        return self._call("boot", name, flavor, host, stopped, request_id=request_id,
                          owner=owner)

    def resize(self, name: str, flavor: str, host: str | None = None, *,
               request_id: str | None = None) -> MigrationHandle:
        return MigrationHandle(self, self._call("resize", name, flavor, host, wait=False,
                                                request_id=request_id))

    def migrate(self, name: str, host: str | None = None, *,
                request_id: str | None = None) -> MigrationHandle:
        return MigrationHandle(self, self._call("resize", name, None, host, wait=False,
                                                request_id=request_id))

    def confirm(self, name: str, *, request_id: str | None = None) -> Migration:
        return self._call("confirm", name, request_id=request_id)

    def revert(self, name: str, *, request_id: str | None = None) -> Migration:
        return self._call("revert", name, request_id=request_id)

    def create_flavor(self, flavor: Flavor, flavor_id: str | None = None, *,
                      is_public: bool = True, description: str = "",
                      request_id: str | None = None) -> FlavorInfo:
        """Add a flavor (logged by the controller, so it outlives `down` / `up`)."""
        return self._call("create_flavor", flavor, flavor_id, is_public, description,
                          request_id=request_id)

    def delete_flavor(self, flavor_id: str, *, request_id: str | None = None) -> None:
        return self._call("delete_flavor", flavor_id, request_id=request_id)

    def reboot(self, name: str, hard: bool = False, *,
               request_id: str | None = None) -> Instance:
        return self._call("act", name, "reboot", hard, request_id=request_id)

    def delete(self, name: str, *, request_id: str | None = None) -> Instance:
        """Delete; a resize in VERIFY_RESIZE is confirmed first, one under way is rolled
        back first, so nothing stays held anywhere."""
        return self._call("act", name, "delete", request_id=request_id)

    # ------------------------------------------------------------------ views

    def instance(self, name: str) -> Instance:
        return self._query("instance", name)

    def instances(self) -> list[Instance]:
        return self._query("instances")

    def migrations(self) -> list[Migration]:
        return self._query("migrations")

    def hosts(self) -> list[HostInfo]:
        return self._query("hosts")

    def server(self, uuid: str) -> ServerView:
        """An instance by uuid (deleted ones too) with its open migration, owner,
        image and times."""
        return self._query("server", uuid)

    def servers_of(self, uuids: list[str]) -> list[ServerView | None]:
        """`server` of each uuid in one round trip; None for an unknown uuid."""
        return self._query("servers_of", list(uuids))

    def server_changes(self, epoch: str, since: int,
                       wait_s: float) -> tuple[str, int, list[ServerView]]:
        """(epoch, newest change, the server views changed after change `since` of
        `epoch`), waiting up to `wait_s` for a change; every server when `epoch` is not
        the controller's (it restarted) or `since` is 0."""
        return self._query("server_changes", epoch, since, wait_s)

    def change_mark(self) -> tuple[str, int]:
        """The newest (epoch, change) an answer to this process's calls carried: what
        a reader of `server_changes` must reach to see every change they made."""
        return self.last_change

    def servers(self, deleted: bool = False) -> list[ServerView]:
        """Every instance (or every deleted one) as `server` shows it."""
        return self._query("servers", deleted)

    def flavors(self) -> list[FlavorInfo]:
        """cluster.yaml's flavors and those created since, with their ids."""
        return self._query("flavors")

    def round_trips(self) -> int:
        return self._query("round_trips")

    # ------------------------------------------------------------------ operations

    def crash_host(self, name: str, timeout_s: float = 60) -> float:
        """Kill the host actor's process; Ray restarts it from its log. Returns the
        seconds until it answered again (log replayed, recovery started)."""
        handle = ray.get_actor(HOST_PREFIX + name, namespace=self.namespace)
        return _kill_and_wait(handle, timeout_s)

    def crash_controller(self, timeout_s: float = 60) -> float:
        """Kill the controller actor's process; Ray restarts it, it replays its log, asks
        the hosts and resumes what was in flight. Returns seconds until it answered."""
        return _kill_and_wait(self.controller, timeout_s)

    def audit(self, as_of: str | None = None) -> AuditReport:
        """Audit the logs offline; every host of the cluster must have one."""
        return audit(self.cfg.state_dir, as_of, [h.name for h in self.cfg.hosts])

    def stop(self, name: str | None = None, *,
             request_id: str | None = None) -> Instance | None:
        """`stop(name)` powers an instance off (clean shutdown, then hard); `stop()`
        stops the actors this object started and the Ray it started."""
        if name is not None:
            return self._call("act", name, "stop", request_id=request_id)
        if self.owns_actors:
            stop_actors(self.cfg, self.namespace)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
