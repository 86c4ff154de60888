"""The protocol table (protocol/table.py) against the code that reads it.

- every (state, command) pair: either legal, with events that fold to the states the
  table names, or refused with a reason naming the state;
- every event has a row, every intent a driver effect in the shell;
- the legal migration transitions the auditor uses;
- DESIGN's intent-before-effect: a driver wrapped so that every call checks that the
  host's log already holds that call's open intent, over whole scenarios and failures.
"""
from __future__ import annotations

import itertools

import msgspec
import pytest

from test_controller import Rig, four_hosts, virtual
from vmresize.actors.host import HostPolicy, decide, probe_name
from vmresize.actors.shell import HostShell
from vmresize.drivers.fake import Fault
from vmresize.events import schema as ev
from vmresize.events.schema import Flavor, MigrationSpec, Resources
from vmresize.projections.fold import Projection, apply
from vmresize.projections.state import Instance, Ledger, Migration
from vmresize.protocol import commands as c
from vmresize.protocol import table
from vmresize.protocol.commands import Rejected
from vmresize.protocol.states import (RUNNING, SHUTDOWN, MigrationStatus as MS, TaskState,
                                      VmState)

HOST = "h"
OTHER = "o"
U, M = "u-1", "m-1"
SMALL = Flavor("m1.small", 1, 2048, 20)
MEDIUM = Flavor("m1.medium", 2, 4096, 40)
POLICY = HostPolicy(name=HOST, limit=Resources(64, 65536, 4000))
VERSION = 5


def spec(source=OTHER, dest=HOST) -> MigrationSpec:
    return MigrationSpec(name="vm", source=source, dest=dest, old_flavor=SMALL,
                         new_flavor=MEDIUM, old_resources=SMALL.resources(),
                         new_resources=MEDIUM.resources(), migration_type="resize",
                         vm_state="active")


def command(cls) -> c.Command:
    """One command of each type, for instance U (and migration M) at VERSION."""
    base = dict(command_id=f"cmd-{cls.__name__}", instance_uuid=U,
                instance_version=VERSION)
    mig = dict(migration_id=M)
    extra = {
        c.Spawn: dict(name="vm", flavor=SMALL),
        c.PrepResize: dict(mig, spec=spec(), allow_same_host=True),
        c.ResizeInstance: dict(mig, spec=spec(source=HOST, dest=OTHER), probe=probe_name(M)),
        c.FinishResize: mig, c.ConfirmResize: mig, c.RevertResize: mig,
        c.FinishRevertResize: mig, c.RestoreSource: mig,
        c.ReleaseClaim: dict(mig, role="dest", remove_disks=True, reason="test"),
        c.AbandonStep: dict(mig, step="confirm", reason="test"),
        c.RebootInstance: dict(hard=False),
    }.get(cls, {})
    return cls(**base, **extra)


VM_STATES = [None, *VmState]                 # None: the host does not know the instance
TASK_STATES = [None, TaskState.RESIZE_PREP, TaskState.POWERING_OFF]
MIG_STATUSES = [None, *MS]                   # None: the host does not know the migration
POWER = [RUNNING, SHUTDOWN]


def state_of(vm_state, task_state, mig_status, power) -> Projection:
    p = Projection()
    p.ledgers[HOST] = Ledger(host=HOST, allocations={}, limit=POLICY.limit)
    if vm_state is not None:
        p.instances[U] = Instance(
            uuid=U, name="vm", host=HOST, flavor=SMALL, vm_state=vm_state,
            task_state=task_state, power_state=power, version=VERSION,
            resources=SMALL.resources(), migration_id=M if mig_status else "",
            deleted=vm_state == VmState.DELETED)
    if mig_status is not None:
        p.migrations[M] = Migration(
            id=M, instance_uuid=U, source_compute=HOST, dest_compute=HOST,
            status=mig_status, migration_type="resize", old_flavor=SMALL,
            new_flavor=MEDIUM, created_at=0.0, updated_at=0.0,
            old_resources=SMALL.resources(), new_resources=MEDIUM.resources(),
            claim_ready=True)
    return p


PAIRS = [(cls, vm, task, mig, power)
         for cls in table.STEPS
         for vm, task, mig, power in itertools.product(VM_STATES, TASK_STATES,
                                                       MIG_STATUSES, POWER)
         if not (vm is None and (task is not None or power == SHUTDOWN))]


@pytest.mark.parametrize("cls", list(table.STEPS), ids=lambda k: k.__name__)
def test_every_state_and_command_pair_is_legal_as_the_table_says_or_refused(cls):
    rule = table.STEPS[cls]
    checked = legal = 0
    for _, vm, task, mig, power in (p for p in PAIRS if p[0] is cls):
        state = state_of(vm, task, mig, power)
        cmd = command(cls)
        live = vm is not None and vm != VmState.DELETED
        why = table.step_refusal(rule, HOST, vm if live else None, task if live else None,
                                 live, mig, power)
        result = decide(state, POLICY, cmd)
        checked += 1
        if why:
            _assert_refused(result, why, vm, task, mig)
            continue
        legal += 1
        assert not isinstance(result, Rejected), (cls.__name__, vm, task, mig, result)
        if result == []:
            assert power in rule.noop, (cls.__name__, vm, power)
            continue
        _assert_folds_as_the_table_says(state, result, vm, task, mig)
    assert checked and legal, f"{cls.__name__}: no legal state among {checked}"


def _assert_refused(result, why: str, vm, task, mig) -> None:
    reason = result.reason if isinstance(result, Rejected) else result[0].reason
    if not isinstance(result, Rejected):
        assert isinstance(result[0], ev.ClaimRejected), result   # a refused claim
    assert reason == why
    named = [str(s) for s in (vm, task, mig) if s is not None]
    assert any(s in reason for s in named) or "not on" in reason or "unknown" in reason \
        or "not running" in reason, reason


def _assert_folds_as_the_table_says(state, events, vm, task, mig) -> None:
    p = state.copy()
    for offset, event in enumerate(events):
        apply(p, ev.Envelope(HOST, offset, 1.0, event))
        rule = table.EVENTS[type(event)]
        inst = p.instances.get(U)
        if rule.task_state is not table.KEEP and inst is not None and \
                type(event) is not ev.RebootStarted:
            assert inst.task_state == rule.task_state, (type(event).__name__, inst)
        migration = p.migrations.get(M)
        if rule.migration is not table.KEEP and migration is not None:
            assert migration.status == rule.migration, (type(event).__name__, migration)
        if isinstance(event, ev.InstanceEvent):
            assert event.instance_version == VERSION + offset + 1


def test_every_host_event_has_a_row_and_every_intent_an_effect():
    assert set(table.EVENTS) == set(ev.HOST_EVENT_TYPES)
    for rule in table.STEPS.values():
        if rule.intent is not None:
            assert rule.intent in table.INTENTS
            assert callable(getattr(HostShell, "_do_" + rule.step, None)), rule.step
            assert table.STEP_OF_INTENT[rule.intent] is rule
            assert rule.outcome is not None
    assert set(table.STEPS) == set(c.AnyCommand.__args__)


def test_the_legal_migration_transitions():
    t = {k: {str(s) for s in v} for k, v in table.TRANSITIONS.items()}
    assert t == {
        None: {"pre-migrating", "migrating"},
        "pre-migrating": {"migrating", "post-migrating", "error"},
        "migrating": {"post-migrating", "error"},
        "post-migrating": {"finished", "confirming", "reverting", "error"},
        "finished": {"confirming", "reverting", "error"},
        "confirming": {"confirmed", "error"},
        "reverting": {"reverted", "error"},
        "confirmed": set(), "reverted": set(), "error": set()}


def test_operations_name_the_state_they_refuse():
    assert table.refuse_operation("reboot", "vm", "stopped", None) == (
        "cannot reboot 'vm' while it is stopped (needs active)")
    assert "task_state resize_prep" in table.refuse_operation("stop", "vm", "active",
                                                                "resize_prep")
    assert table.refuse_operation("delete", "vm", "active", "resize_prep") == ""
    assert "deleted" in table.refuse_operation("start", "vm", "deleted", None, True)


# --------------------------------------------------------------------------- intent first

class IntentFirst:
    """A driver wrapper: before each call, the host's log must hold an open intent (an
    intent event with no outcome yet) of the instance the call is about."""

    def __init__(self, driver, rig: Rig, host: str):
        self._driver, self._rig, self._host = driver, rig, host
        self.calls: list[str] = []
        self.breaches: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._driver, name)
        if name in ("capacity", "overhead") or not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kw):
            self._check(name, args)
            return attr(*args, **kw)
        return call

    def _check(self, method: str, args) -> None:
        uuid = self._uuid_of(args[0])
        self.calls.append(method)
        envs = [e for e in self._rig.shells[self._host].log.replay()
                if getattr(e.event, "instance_uuid", "") == uuid]
        open_ = [e for e in envs if type(e.event) in table.INTENTS
                 and not any(o.event.command_id == e.event.command_id
                             and o.offset > e.offset for o in envs)
                 and (not isinstance(e.event, ev.Claimed) or e.event.probe_pending)]
        if not open_:
            self.breaches.append(f"{self._host}.{method}({uuid}) with no open intent")

    def _uuid_of(self, arg) -> str:
        if hasattr(arg, "uuid"):
            return arg.uuid
        if isinstance(arg, str) and arg.startswith(".vmresize-probe-"):
            mid = arg.removeprefix(".vmresize-probe-")
            for envs in self._rig.logs().values():
                for e in envs:
                    if getattr(e.event, "migration_id", "") == mid:
                        return e.event.instance_uuid
        return arg


def _wrap(rig: Rig) -> dict[str, IntentFirst]:
    wrapped = {}
    for name, driver in list(rig.drivers.items()):
        wrapped[name] = rig.drivers[name] = IntentFirst(driver, rig, name)
    return wrapped


@pytest.mark.parametrize("faults", [
    {}, {"h2": [Fault("finish_migration", "fail")]},
    {"h1": [Fault("migrate_disk_and_power_off", "fail")]},
    {"h2": [Fault("create_probe", "fail")]}, {"h1": [Fault("confirm_migration", "fail")]},
    {"h1": [Fault("power_off", "fail")]}, {"h1": [Fault("destroy", "fail")]},
], ids=["ok", "finish-fails", "migrate-fails", "probe-fails", "confirm-fails",
        "stop-fails", "delete-fails"])
@virtual
async def test_every_driver_call_comes_after_its_intent_is_logged(faults):
    rig = Rig(faults=faults, **four_hosts())
    wrapped = _wrap(rig)
    ctl = await rig.start()
    await ctl.boot("vm1", "m1.small", host="h1")
    for step in (lambda: ctl.act("vm1", "stop"), lambda: ctl.act("vm1", "start"),
                 lambda: ctl.act("vm1", "reboot"),
                 lambda: ctl.resize("vm1", "m1.medium", host="h2"),
                 lambda: ctl.revert("vm1"),
                 lambda: ctl.resize("vm1", "m1.medium", host="h2"),
                 lambda: ctl.confirm("vm1"), lambda: ctl.act("vm1", "delete"),
                 lambda: ctl.act("vm1", "delete")):
        try:
            await step()
        except Exception as exc:      # a step refused or failed by the fault: go on
            assert type(exc).__name__ == "OperationError", exc
    calls = [m for w in wrapped.values() for m in w.calls]
    assert {"spawn", "power_off", "create_probe", "destroy"} <= set(calls)
    breaches = [b for w in wrapped.values() for b in w.breaches]
    assert breaches == []
