"""Shared Hypothesis strategies: schema values, every host event, envelopes, and valid
protocol histories.

Events are built generically from msgspec's type info, so a field added to the schema is
drawn without touching this module. Valid histories come from the real system: the
deterministic simulator runs the real host shells and controller with a drawn seed and
its state directory is read back through `vmresize.events.store`.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import msgspec
from hypothesis import reject
from hypothesis import strategies as st

from vmresize.config import ClusterConfig, parse
from vmresize.events import schema as ev
from vmresize.protocol.table import DEST_STEPS, SOURCE_STEPS
from vmresize.events.schema import (ControllerEnvelope, DiskInfo, Envelope, Flavor,
                                    MigrationSpec, Resources)
from vmresize.projections.fold import merge_logs

# A small cluster for simulated histories: the default flavors, generous hosts.
CLUSTER_YAML = """
options: {allow_resize_to_same_host: false, resize_confirm_window_s: 0, max_attempts: 3,
          step_timeout_s: 60}
allocation_ratios: {vcpus: 16.0, memory_mb: 1.5, disk_gb: 1.0}
reserved: {vcpus: 0, memory_mb: 512, disk_gb: 0}
flavors:
  m1.tiny:   {vcpus: 1, memory_mb: 512,  root_gb: 1}
  m1.small:  {vcpus: 1, memory_mb: 2048, root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096, root_gb: 40}
  m1.large:  {vcpus: 4, memory_mb: 8192, root_gb: 80}
hosts:
  - {name: compute-1, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: compute-2, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: compute-3, vcpus: 16, memory_mb: 32768, disk_gb: 800}
"""


def cluster() -> ClusterConfig:
    return parse(CLUSTER_YAML, "tests/strategies.py")


# --------------------------------------------------------------------------- values

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1,
                max_size=16)
host_names = st.sampled_from(["compute-1", "compute-2", "compute-3", "sim-1", "h"])
uuids = st.uuids().map(str)
small_ints = st.integers(min_value=0, max_value=2**31)
wall_times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
power_states = st.sampled_from([ev.RUNNING, ev.SHUTDOWN, 0])

resources = st.builds(Resources, vcpus=st.integers(0, 512),
                      memory_mb=st.integers(0, 2**20), disk_gb=st.integers(0, 2**16))

flavors = st.builds(Flavor, name=names, vcpus=st.integers(1, 64),
                    memory_mb=st.integers(1, 2**18), root_gb=st.integers(1, 2000),
                    ephemeral_gb=st.integers(0, 500), swap_mb=st.integers(0, 2**14))

disk_infos = st.builds(DiskInfo, name=st.sampled_from(["disk", "disk.local", "disk.swap"]),
                       virtual_gb=st.integers(0, 2000), path=st.text(max_size=30),
                       format=st.sampled_from(["qcow2", "raw"]),
                       backing_file=st.text(max_size=30))

migration_specs = st.builds(
    MigrationSpec, name=names, source=host_names, dest=host_names, old_flavor=flavors,
    new_flavor=flavors, old_resources=resources, new_resources=resources,
    migration_type=st.sampled_from(["resize", "migration"]),
    vm_state=st.sampled_from(["active", "stopped"]), created_at=wall_times)


# --------------------------------------------------------------------------- events, generically

_BY_STRUCT = {Flavor: flavors, Resources: resources, DiskInfo: disk_infos,
              MigrationSpec: migration_specs}

# Fields whose meaning narrows the values worth drawing (any str would still round-trip).
_BY_NAME = {
    "instance_uuid": uuids, "migration_id": uuids, "command_id": st.text(max_size=40),
    "step": st.sampled_from(sorted(DEST_STEPS | SOURCE_STEPS)),
    "role": st.sampled_from(["source", "dest"]), "power_state": power_states,
    "instance_version": st.integers(1, 10**6), "dest": host_names,
}


def _for_type(t: msgspec.inspect.Type) -> st.SearchStrategy:
    i = msgspec.inspect
    if isinstance(t, i.StrType):
        return st.text(max_size=40)
    if isinstance(t, i.BoolType):
        return st.booleans()
    if isinstance(t, i.IntType):
        return small_ints
    if isinstance(t, i.FloatType):
        return wall_times
    if isinstance(t, i.StructType):
        return _BY_STRUCT[t.cls]
    if isinstance(t, (i.VarTupleType, i.ListType)):
        return st.lists(_for_type(t.item_type), max_size=3).map(
            tuple if isinstance(t, i.VarTupleType) else list)
    raise NotImplementedError(f"no strategy for {t!r}: add one to tests/strategies.py")


def event_of(cls) -> st.SearchStrategy:
    """Any instance of one event class, every field drawn (defaults included)."""
    info = msgspec.inspect.type_info(cls)
    fields = {f.name: _BY_NAME[f.name] if f.name in _BY_NAME else _for_type(f.type)
              for f in info.fields}
    return st.builds(cls, **fields)


host_events = st.one_of([event_of(cls) for cls in ev.HOST_EVENT_TYPES])
controller_events = st.one_of([event_of(cls) for cls in ev.ControllerEvent.__args__])


def envelopes(events: st.SearchStrategy = host_events) -> st.SearchStrategy:
    return st.builds(Envelope, host=host_names, offset=st.integers(0, 2**40),
                     wall_time=wall_times, event=events)


controller_envelopes = st.builds(ControllerEnvelope, host=st.just("controller"),
                                 offset=st.integers(0, 2**40), wall_time=wall_times,
                                 event=controller_events)


# --------------------------------------------------------------------------- valid histories

def run_simulation(state_dir, seed: int, hosts: int = 3, instances: int = 4,
                   operations: int = 10, **sim_options):
    """Run the simulator into `state_dir` and return its result."""
    from vmresize.sim.simulator import SimConfig, Simulator
    # No cleanup driver stuck for good: an abandoned cleanup leaves behind what the
    # auditor must report, and these histories are meant to be clean.
    sim_options.setdefault("stuck_p", 0.0)
    cfg = SimConfig(seed=seed, hosts=hosts, instances=instances, operations=operations,
                    **sim_options)
    return Simulator(cluster(), cfg, Path(state_dir) / "state").run()


def read_host_logs(state_dir) -> dict[str, list[Envelope]]:
    from vmresize.events.store import open_host_logs
    readers = open_host_logs(state_dir)
    try:
        return {host: list(r.envelopes()) for host, r in readers.items()}
    finally:
        for r in readers.values():
            r.close()


@functools.lru_cache(maxsize=256)
def simulated_logs(seed: int, hosts: int = 3, instances: int = 4,
                   operations: int = 10) -> dict[str, tuple[Envelope, ...]] | None:
    """Each host's log after a simulated run; cached so Hypothesis replays see the same
    history. None when the run itself raised (a simulator bug tested in test_sim.py)."""
    from vmresize.drivers.fake import HostCrashed
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_simulation(tmp, seed, hosts, instances, operations)
        except HostCrashed:
            return None
        logs = read_host_logs(Path(tmp) / "state")
    return {host: tuple(envs) for host, envs in logs.items()}


@st.composite
def protocol_histories(draw, max_seed: int = 10_000) -> dict[str, tuple[Envelope, ...]]:
    """{host: envelopes in offset order} of a simulated cluster (crashes, drops,
    duplicates, driver faults included): every history the real code can write."""
    seed = draw(st.integers(0, max_seed))
    hosts = draw(st.integers(1, 3))
    logs = simulated_logs(seed, hosts, draw(st.integers(1, 4)), draw(st.integers(0, 10)))
    if logs is None:
        reject()
    return logs


@st.composite
def merged_histories(draw) -> list[Envelope]:
    """A valid history as one list, instance events in version order (as `fold` wants)."""
    return list(merge_logs(draw(protocol_histories())))


# --------------------------------------------------------------------------- hand-built histories

BIG = Resources(128, 1 << 20, 10_000)


class History:
    """Builds host logs by hand, row by row of DESIGN §2, with gapless offsets per host
    and gapless versions per instance (unless a test breaks them on purpose).

        h = History(); h.boot("a", "u", TINY)
        h.resize("m", "u", "a", "b", TINY, SMALL); h.claim("m"); h.start("m") ...
    """

    def __init__(self, limit: Resources = BIG, hosts=("a", "b")):
        self.logs: dict[str, list[Envelope]] = {}
        self.versions: dict[str, int] = {}
        self.specs: dict[str, tuple[str, MigrationSpec]] = {}
        self.wall_time = 1_767_225_600.0
        for host in hosts:
            self.add(host, ev.HostConfigured(driver="FakeDriver", capacity=limit,
                                             limit=limit))

    # -- plumbing

    def add(self, host: str, event) -> Envelope:
        log = self.logs.setdefault(host, [])
        self.wall_time += 1.0
        env = Envelope(host, len(log), self.wall_time, event)
        log.append(env)
        return env

    def next_version(self, uuid: str) -> int:
        self.versions[uuid] = self.versions.get(uuid, 0) + 1
        return self.versions[uuid]

    def inst(self, host: str, cls, uuid: str, **fields) -> Envelope:
        return self.add(host, cls(instance_uuid=uuid, instance_version=self.next_version(uuid),
                                  **fields))

    def mig(self, host: str, cls, mid: str, **fields) -> Envelope:
        uuid = self.specs[mid][0]
        return self.inst(host, cls, uuid, migration_id=mid, **fields)

    def merged(self) -> list[Envelope]:
        return list(merge_logs(self.logs))

    def spec(self, mid: str) -> MigrationSpec:
        return self.specs[mid][1]

    # -- protocol rows

    def boot(self, host: str, uuid: str, flavor: Flavor, stopped: bool = False,
             name: str = "") -> list[Envelope]:
        return [self.inst(host, ev.SpawnStarted, uuid, name=name or f"vm-{uuid}",
                          flavor=flavor, resources=flavor.resources(), stopped=stopped),
                self.inst(host, ev.Spawned, uuid,
                          power_state=ev.SHUTDOWN if stopped else ev.RUNNING)]

    def resize(self, mid: str, uuid: str, source: str, dest: str, old: Flavor, new: Flavor,
               vm_state: str = "active", name: str = "") -> MigrationSpec:
        spec = MigrationSpec(name=name or f"vm-{uuid}", source=source, dest=dest,
                             old_flavor=old, new_flavor=new, old_resources=old.resources(),
                             new_resources=new.resources(),
                             migration_type="resize" if old != new else "migration",
                             vm_state=vm_state)
        self.specs[mid] = (uuid, spec)
        return spec

    def claim(self, mid: str) -> Envelope:
        return self.mig(self.spec(mid).dest, ev.Claimed, mid, spec=self.spec(mid),
                        probe=f".vmresize-probe-{mid}")

    def reject(self, mid: str) -> Envelope:
        uuid, spec = self.specs[mid]
        return self.add(spec.dest, ev.ClaimRejected(migration_id=mid, instance_uuid=uuid,
                                                    dest=spec.dest, reason="full"))

    def start(self, mid: str) -> Envelope:
        return self.mig(self.spec(mid).source, ev.MigrationStarted, mid, spec=self.spec(mid))

    def disks(self, mid: str, shared: bool = False) -> Envelope:
        return self.mig(self.spec(mid).source, ev.DiskMigrated, mid, shared_storage=shared)

    def _power(self, mid: str) -> int:
        return ev.RUNNING if self.spec(mid).vm_state == "active" else ev.SHUTDOWN

    def finish(self, mid: str) -> list[Envelope]:
        dest = self.spec(mid).dest
        return [self.mig(dest, ev.FinishStarted, mid),
                self.mig(dest, ev.Finished, mid, power_state=self._power(mid))]

    def confirm(self, mid: str) -> list[Envelope]:
        source = self.spec(mid).source
        return [self.mig(source, ev.ConfirmStarted, mid), self.mig(source, ev.Confirmed, mid)]

    def revert_dest(self, mid: str) -> list[Envelope]:
        dest = self.spec(mid).dest
        return [self.mig(dest, ev.RevertStarted, mid), self.mig(dest, ev.DestReverted, mid)]

    def finish_revert(self, mid: str) -> list[Envelope]:
        source = self.spec(mid).source
        return [self.mig(source, ev.RevertFinishStarted, mid),
                self.mig(source, ev.Reverted, mid, power_state=self._power(mid))]

    def fail(self, mid: str, step: str, rolled_back: bool = True,
             host: str | None = None, **fields) -> Envelope:
        spec = self.spec(mid)
        host = host or (spec.dest if step in DEST_STEPS else spec.source)
        fields.setdefault("power_state", self._power(mid))
        return self.mig(host, ev.Failed, mid, step=step, reason=f"{step} failed",
                        rolled_back=rolled_back, **fields)

    def release(self, mid: str, role: str = "dest", host: str | None = None) -> Envelope:
        spec = self.spec(mid)
        host = host or (spec.dest if role == "dest" else spec.source)
        return self.mig(host, ev.ClaimReleased, mid, reason="compensation", role=role)

    def restore(self, mid: str) -> Envelope:
        return self.mig(self.spec(mid).source, ev.SourceRestored, mid,
                        power_state=self._power(mid))

    def full_resize(self, mid: str, shared: bool = False) -> None:
        self.claim(mid)
        self.start(mid)
        self.disks(mid, shared)
        self.finish(mid)


TINY = Flavor(name="m1.tiny", vcpus=1, memory_mb=512, root_gb=1)
SMALL = Flavor(name="m1.small", vcpus=1, memory_mb=2048, root_gb=20)
MEDIUM = Flavor(name="m1.medium", vcpus=2, memory_mb=4096, root_gb=40)


@st.composite
def hand_histories(draw) -> History:
    """A few instances, each booted and taken through a drawn path of the protocol
    table (confirm, revert, each failure and its compensation)."""
    h = History(hosts=("a", "b", "c"))
    count = draw(st.integers(1, 4))
    for i in range(count):
        uuid, mid = f"u{i}", f"m{i}"
        source, dest = draw(st.permutations(["a", "b", "c"]))[:2]
        old, new = draw(st.sampled_from([(TINY, SMALL), (SMALL, MEDIUM), (SMALL, SMALL)]))
        stopped = draw(st.booleans())
        h.boot(source, uuid, old, stopped=stopped)
        h.resize(mid, uuid, source, dest, old, new, "stopped" if stopped else "active")
        path = draw(st.sampled_from(["confirm", "revert", "reject", "fail-prep-source",
                                     "fail-migrate", "fail-finish"]))
        _walk(h, mid, path, shared=draw(st.booleans()))
    return h


def _walk(h: History, mid: str, path: str, shared: bool) -> None:
    if path == "reject":
        h.reject(mid)
        return
    h.claim(mid)
    if path == "fail-prep-source":      # disk shrink refused on the source: nothing held
        h.fail(mid, "resize_instance")
        h.release(mid, "dest")
        return
    h.start(mid)
    if path == "fail-migrate":
        h.fail(mid, "migrate", shared_storage=shared)
        h.release(mid, "dest")
        return
    h.disks(mid, shared)
    if path == "fail-finish":
        h.mig(h.spec(mid).dest, ev.FinishStarted, mid, shared_storage=shared)
        h.fail(mid, "finish")
        h.restore(mid)
        return
    h.finish(mid)
    if path == "confirm":
        h.confirm(mid)
    else:
        h.revert_dest(mid)
        h.finish_revert(mid)


# --------------------------------------------------------------------------- histories to break

# Simulated histories big enough to hold every common protocol path (confirm, revert,
# refused claims, failed steps and their compensations) and small enough to simulate in
# a tenth of a second. Drawn from a fixed pool of seeds so that each is simulated once
# per process and Hypothesis shrinks towards seed 0.
POOL_SEEDS = 24
POOL_SIZES = dict(hosts=4, instances=8, operations=40)


def pool_history(seed: int) -> dict[str, tuple[Envelope, ...]] | None:
    """The simulated history of pool seed `seed` (None if that run raised)."""
    return simulated_logs(seed, **POOL_SIZES)


@functools.lru_cache(maxsize=1)
def pool_seeds() -> tuple[int, ...]:
    """The pool's seeds whose simulation ran to its end."""
    return tuple(seed for seed in range(POOL_SEEDS) if pool_history(seed) is not None)


class PoolHistory:
    """One simulated history of the pool: `seed` and `logs` ({host: envelopes}, fresh
    lists a test may edit). Shown by its seed alone: the logs are long."""

    def __init__(self, seed: int):
        self.seed = seed
        self.logs = {host: list(envs) for host, envs in pool_history(seed).items()}

    def __iter__(self):
        return iter((self.seed, self.logs))

    def __repr__(self) -> str:
        return (f"PoolHistory(seed={self.seed})  # s.simulated_logs({self.seed}, "
                f"**{POOL_SIZES})")


def pool_histories(having=None) -> st.SearchStrategy[PoolHistory]:
    """A history of the pool; `having(logs) -> bool` keeps only the histories that hold
    what a test needs (decided once per seed, so a rare shape costs no rejections)."""
    def build():      # on first draw: collecting the tests simulates nothing
        seeds = pool_seeds()
        if having is not None:
            seeds = tuple(s for s in seeds if having(pool_history(s)))
        return st.sampled_from(seeds).map(PoolHistory) if seeds else st.nothing()
    return st.deferred(build)


def write_state_dir(logs: dict[str, list[Envelope]], state_dir) -> Path:
    """Write host logs in the real log format under `state_dir`, as hosts would have:
    each envelope's offset must be its place in its log."""
    from vmresize.events.codec import encode
    from vmresize.events.log import SegmentLog
    from vmresize.events.store import host_dir
    for host, envs in logs.items():
        log_dir = host_dir(state_dir, host) / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with SegmentLog(log_dir, fsync=False) as log:
            log.append([encode(env) for env in envs])
    return Path(state_dir)
