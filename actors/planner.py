"""The controller's pure planner: `plan(ctx, request) -> the next action`.

Given the controller's view (the hosts' events folded), one open request and what the
hosts answered to its commands so far, `plan` says what to do next: send one command to
one host, log a destination choice, wait for another request, or end the request. No
Ray, no event loop, no clock: the controller (actors/controller.py) only sends, waits and
records, and calls `plan` again. Command ids are derived from the request or migration
and the step, so after a lost reply, a host crash or the controller's own restart the
same command goes out again and the host answers it from its log.
"""
from __future__ import annotations

from typing import Callable

import msgspec

from vmresize.events.schema import Flavor, MigrationSpec, Resources
from vmresize.projections.fold import Projection
from vmresize.projections.state import Instance, Migration
from vmresize.protocol import commands as c
from vmresize.protocol.states import MigrationStatus as MS, Role, Step, VmState
from vmresize.protocol.table import OPERATIONS


class Answer(msgspec.Struct, frozen=True):
    """What a host answered to one command of a request (kept in memory only)."""
    ok: bool
    reason: str = ""
    events: int = 0


class Request(msgspec.Struct):
    """An open request as the controller's log says."""
    request_id: str
    kind: str                  # boot | resize | confirm | revert | action
    instance_uuid: str = ""
    migration_id: str = ""
    name: str = ""
    flavor: str = ""
    host: str = ""
    stopped: bool = False
    migration_type: str = "resize"
    created_at: float = 0.0
    attempts: list[str] = []   # destinations chosen so far (resize) or hosts tried (boot)
    action: str = ""           # stop | start | reboot | delete
    hard: bool = False
    ended: bool = False
    ok: bool = False
    outcome: str = ""
    answers: dict[str, Answer] = {}


# --------------------------------------------------------------------------- actions

class Send(msgspec.Struct, frozen=True):
    """Deliver `cmd` to `host`. `mode`: once (until the host answers), cleanup (retry a
    failing driver a bounded number of times, then abandon `step`), until_ok (retry a
    failing driver, never abandon). `attempt`: a boot's try of a new host."""
    host: str
    cmd: c.Command
    mode: str = "once"
    step: str = ""
    attempt: bool = False


class Choose(msgspec.Struct, frozen=True):
    """Log that `dest` is the next destination to try for the request's migration."""
    dest: str


class WaitFor(msgspec.Struct, frozen=True):
    request_id: str


class End(msgspec.Struct, frozen=True):
    ok: bool
    outcome: str = ""


Action = Send | Choose | WaitFor | End


class Ctx(msgspec.Struct, frozen=True):
    """What the planner may look at. `candidates(need, source, exclude, forced)` is the
    scheduler (filters and weigher over the view's ledgers and the hosts that answer)."""
    view: Projection
    flavors: dict
    max_attempts: int
    cleanup_attempts: int
    allow_same_host: bool
    disks: dict                  # migration id -> DiskMigrated.disks
    open_resizes: dict           # instance uuid -> open resize Request
    open_finishes: dict          # migration id -> open confirm / revert Request
    open_actions: dict           # instance uuid -> open stop / start / reboot Request
    open_deletes: dict           # instance uuid -> open delete Request
    open_boots: dict             # instance uuid -> open boot Request
    candidates: Callable
    image: str = ""


def plan(ctx: Ctx, r: Request) -> Action:
    if r.kind == "action":
        return (plan_delete if r.action == "delete" else plan_action)(ctx, r)
    return _PLANS[r.kind](ctx, r)


def _version(ctx: Ctx, uuid: str) -> int:
    inst = ctx.view.instances.get(uuid)
    return inst.version if inst else 0


def _answered(r: Request, cmd_id: str) -> Answer | None:
    return r.answers.get(cmd_id)


def _refused(r: Request, cmd_id: str) -> bool:
    """The host refused the command before anything happened (no events)."""
    a = r.answers.get(cmd_id)
    return a is not None and not a.ok and a.events == 0


# --------------------------------------------------------------------------- boot

def plan_boot(ctx: Ctx, r: Request) -> Action:
    inst = ctx.view.instances.get(r.instance_uuid)
    flavor = ctx.flavors[r.flavor]
    if inst is not None and inst.vm_state != VmState.BUILDING:
        if inst.vm_state == VmState.ERROR:
            return End(False, f"spawn of {r.name} failed on {inst.host}")
        return End(True)
    if inst is not None:           # spawn logged, outcome pending: ask again
        return Send(inst.host, _spawn(r, inst.host, flavor, ctx.image))
    if len(r.attempts) < ctx.max_attempts:
        hosts = ctx.candidates(flavor.resources(), "", set(r.attempts), r.host)
        if hosts:
            return Send(hosts[0], _spawn(r, hosts[0], flavor, ctx.image), attempt=True)
    where = f"host {r.host}" if r.host else "any host"
    return End(False, f"no valid host: {r.name} ({r.flavor}) fits on no {where}")


def _spawn(r: Request, host: str, flavor: Flavor, image: str) -> c.Spawn:
    return c.Spawn(command_id=f"{r.instance_uuid}:spawn:{host}",
                   instance_uuid=r.instance_uuid, instance_version=0, name=r.name,
                   flavor=flavor, stopped=r.stopped, image=image)


# --------------------------------------------------------------------------- resize

def plan_resize(ctx: Ctx, r: Request) -> Action:
    mig = ctx.view.migrations.get(r.migration_id)
    cancel = r.instance_uuid in ctx.open_deletes
    if mig is None:
        if cancel:
            return End(False, f"{r.migration_type} of {r.name or r.instance_uuid} "
                              f"cancelled: the instance is being deleted")
        return _plan_claim(ctx, r)
    status = mig.status
    if status == MS.PRE_MIGRATING:
        if not mig.claim_ready:     # the claim's intent is open: let the destination end it
            inst = ctx.view.instances[r.instance_uuid]
            return Send(mig.dest_compute, _prep(ctx, r, inst, ctx.flavors[r.flavor],
                                                mig.dest_compute))
        resize = _resize_instance(ctx, mig)
        if cancel or _refused(r, resize.command_id):
            return _release_dest(ctx, mig, _why(r, resize.command_id, cancel))
        return Send(mig.source_compute, resize)
    if status in (MS.MIGRATING, MS.POST_MIGRATING):
        if not mig.disk_migrated:
            return Send(mig.source_compute, _resize_instance(ctx, mig))
        finish = _finish(ctx, mig)
        if cancel or _refused(r, finish.command_id):
            return _release_dest(ctx, mig, _why(r, finish.command_id, cancel))
        return Send(mig.dest_compute, finish)
    if status == MS.ERROR:
        return compensation(ctx, r, mig) or End(
            False, f"{mig.migration_type} of {_name(ctx, mig)} failed: {mig.reason}")
    return End(True)        # finished (VERIFY_RESIZE), or confirmed / reverted meanwhile


def _why(r: Request, cmd_id: str, cancel: bool) -> str:
    if cancel:
        return "cancelled: the instance is being deleted"
    return r.answers[cmd_id].reason


def _plan_claim(ctx: Ctx, r: Request) -> Action:
    """Ask the chosen destination to claim; choose the next one after a refusal."""
    inst = ctx.view.instances[r.instance_uuid]
    new = ctx.flavors[r.flavor]
    if r.attempts:
        prep = _prep(ctx, r, inst, new, r.attempts[-1])
        if _answered(r, prep.command_id) is None:
            return Send(r.attempts[-1], prep)
    if len(r.attempts) < ctx.max_attempts:
        hosts = ctx.candidates(new.resources(), inst.host, set(r.attempts), r.host)
        if hosts:
            return Choose(hosts[0])
    tried = ", ".join(r.attempts) or "none fits"
    return End(False, f"no valid host for {inst.name} ({r.flavor}) after "
                      f"{len(r.attempts)} attempt(s): {tried}")


def _prep(ctx: Ctx, r: Request, inst: Instance, new: Flavor, dest: str) -> c.PrepResize:
    vm_state = inst.vm_state if inst.vm_state in (VmState.ACTIVE, VmState.STOPPED) \
        else VmState.ACTIVE
    spec = MigrationSpec(name=inst.name, source=inst.host, dest=dest,
                         old_flavor=inst.flavor, new_flavor=new,
                         old_resources=inst.resources, new_resources=new.resources(),
                         migration_type=r.migration_type, vm_state=vm_state,
                         created_at=r.created_at)
    return c.PrepResize(command_id=f"{r.migration_id}:prep:{len(r.attempts)}",
                        instance_uuid=inst.uuid, instance_version=inst.version,
                        migration_id=r.migration_id, spec=spec,
                        allow_same_host=ctx.allow_same_host)


def spec_of(ctx: Ctx, mig: Migration) -> MigrationSpec:
    return MigrationSpec(name=_name(ctx, mig), source=mig.source_compute,
                         dest=mig.dest_compute, old_flavor=mig.old_flavor,
                         new_flavor=mig.new_flavor, old_resources=mig.old_resources,
                         new_resources=mig.new_resources,
                         migration_type=mig.migration_type, vm_state=mig.vm_state,
                         created_at=mig.created_at)


def _resize_instance(ctx: Ctx, mig: Migration) -> c.ResizeInstance:
    from vmresize.actors.host import probe_name
    return c.ResizeInstance(command_id=f"{mig.id}:resize", instance_uuid=mig.instance_uuid,
                            instance_version=_version(ctx, mig.instance_uuid),
                            migration_id=mig.id, spec=spec_of(ctx, mig),
                            probe=probe_name(mig.id))


def _finish(ctx: Ctx, mig: Migration) -> c.FinishResize:
    return c.FinishResize(command_id=f"{mig.id}:finish", instance_uuid=mig.instance_uuid,
                          instance_version=_version(ctx, mig.instance_uuid),
                          migration_id=mig.id, disks=tuple(ctx.disks.get(mig.id, ())),
                          shared_storage=mig.shared_storage)


def _release_dest(ctx: Ctx, mig: Migration, reason: str) -> Send:
    cmd = c.ReleaseClaim(command_id=f"{mig.id}:release-{Role.DEST}",
                         instance_uuid=mig.instance_uuid,
                         instance_version=_version(ctx, mig.instance_uuid),
                         migration_id=mig.id, role=Role.DEST, reason=reason,
                         remove_disks=mig.dest_copy)
    return Send(mig.dest_compute, cmd, "until_ok")


def compensation(ctx: Ctx, r: Request, mig: Migration) -> Send | None:
    """After a failure or a cancel: the next step that makes an end let go of what the
    migration holds; None when both ends have (the migration is final).

    The source never needs telling to let go of a step it started and moved no disks
    for: the step's own outcome does that (`Failed(step=migrate)`). Nor can such a
    step be seen unsettled here: `resize_instance` is sent until the source answers;
    the source answers a step that logged an intent only with that step's outcome
    (after a restart too, for it resumes its open intents by itself); and the
    destination is told to release only before the source was sent its step (or
    once it refused it) or after the disks moved. The simulator checks the middle
    link on every reply, and the auditor's obligations would name a source left
    holding."""
    if (not mig.dest_settled or (mig.dest_copy and mig.failed_step == Step.FINISH)) \
            and not _failed_for_good(r, f"{mig.id}:release-{Role.DEST}"):
        return _release_dest(ctx, mig, mig.reason)
    if mig.source_started and not mig.source_settled and mig.resize_dir:
        # The disks left: the source takes the instance back.
        cmd = c.RestoreSource(command_id=f"{mig.id}:restore",
                              instance_uuid=mig.instance_uuid,
                              instance_version=_version(ctx, mig.instance_uuid),
                              migration_id=mig.id)
        if not _failed_for_good(r, cmd.command_id):
            return Send(mig.source_compute, cmd, "cleanup", Step.RESTORE)
    return None


def _failed_for_good(r: Request, cmd_id: str) -> bool:
    """Sent and answered already: a compensation goes out once per request (its mode
    retries a failing driver), so a host that answers without letting go cannot keep
    the controller sending."""
    return cmd_id in r.answers


# --------------------------------------------------------------------------- confirm, revert

def plan_confirm(ctx: Ctx, r: Request) -> Action:
    mig = ctx.view.migrations[r.migration_id]
    send = _confirm(ctx, r, mig)
    if send is not None:
        return send
    return End(mig.status == MS.CONFIRMED,
               "" if mig.status == MS.CONFIRMED else
               f"confirm of {_name(ctx, mig)} ended {mig.status}: {mig.reason}")


def _confirm(ctx: Ctx, r: Request, mig: Migration) -> Send | None:
    cmd_id = f"{mig.id}:confirm"
    if mig.status not in (MS.FINISHED, MS.CONFIRMING) or cmd_id in r.answers:
        return None
    cmd = c.ConfirmResize(command_id=cmd_id, instance_uuid=mig.instance_uuid,
                          instance_version=_version(ctx, mig.instance_uuid),
                          migration_id=mig.id, shared_storage=mig.shared_storage)
    return Send(mig.source_compute, cmd, "cleanup", Step.CONFIRM)


def plan_revert(ctx: Ctx, r: Request) -> Action:
    mig = ctx.view.migrations[r.migration_id]
    uuid, version = mig.instance_uuid, _version(ctx, mig.instance_uuid)
    revert = f"{mig.id}:revert"
    if (mig.status == MS.FINISHED or (mig.status == MS.REVERTING and not mig.dest_reverted)) \
            and revert not in r.answers:
        return Send(mig.dest_compute, c.RevertResize(
            command_id=revert, instance_uuid=uuid, instance_version=version,
            migration_id=mig.id, shared_storage=mig.shared_storage), "cleanup", Step.REVERT)
    finish_revert = f"{mig.id}:finish-revert"
    if mig.status == MS.REVERTING and mig.dest_reverted and finish_revert not in r.answers:
        return Send(mig.source_compute, c.FinishRevertResize(
            command_id=finish_revert, instance_uuid=uuid, instance_version=version,
            migration_id=mig.id), "cleanup", Step.FINISH_REVERT)
    if mig.status == MS.ERROR:
        comp = compensation(ctx, r, mig)
        if comp is not None:
            return comp
    return End(mig.status == MS.REVERTED,
               "" if mig.status == MS.REVERTED else
               f"revert of {_name(ctx, mig)} ended {mig.status}: {mig.reason}")


# --------------------------------------------------------------------------- lifecycle

_ACTION_COMMANDS = {"stop": c.StopInstance, "start": c.StartInstance,
                    "reboot": c.RebootInstance}


def plan_action(ctx: Ctx, r: Request) -> Action:
    """stop, start, reboot: one command on the instance's host."""
    inst = ctx.view.instances.get(r.instance_uuid)
    if inst is None or inst.deleted:
        return End(False, f"cannot {r.action} {r.name!r}: it is deleted")
    cmd_id = f"{r.request_id}:{r.action}"
    answer = r.answers.get(cmd_id)
    if answer is not None:
        return End(answer.ok, answer.reason)
    if inst.vm_state in OPERATIONS[r.action].noop and not inst.task_state:
        return End(True)
    fields = dict(hard=r.hard) if r.action == "reboot" else {}
    cmd = _ACTION_COMMANDS[r.action](command_id=cmd_id, instance_uuid=inst.uuid,
                                     instance_version=inst.version, **fields)
    return Send(inst.host, cmd)


def plan_delete(ctx: Ctx, r: Request) -> Action:
    """Delete: wait for what is under way, confirm a resize waiting in VERIFY_RESIZE, then
    destroy on the instance's host, retried a bounded number of times."""
    uuid = r.instance_uuid
    inst = ctx.view.instances.get(uuid)
    if inst is None or inst.deleted:
        return End(True) if inst is not None or uuid not in ctx.open_boots else \
            WaitFor(ctx.open_boots[uuid].request_id)
    for busy in (ctx.open_boots.get(uuid), ctx.open_resizes.get(uuid),
                 ctx.open_actions.get(uuid),
                 ctx.open_finishes.get(inst.migration_id) if inst.migration_id else None):
        if busy is not None and busy is not r and not busy.ended:
            return WaitFor(busy.request_id)
    mig = ctx.view.migrations.get(inst.migration_id) if inst.migration_id else None
    if mig is not None and not mig.final:
        step = _confirm(ctx, r, mig) or (compensation(ctx, r, mig)
                                         if mig.status == MS.ERROR else None)
        if step is not None:
            return step
    tries = [a for cid, a in r.answers.items() if cid.startswith(f"{r.request_id}:delete:")]
    if tries and not tries[-1].ok and len(tries) >= ctx.cleanup_attempts:
        return End(False, f"delete of {r.name!r} failed: {tries[-1].reason}")
    if tries and tries[-1].ok and not inst.deleted:
        return End(False, f"delete of {r.name!r} did not take: {tries[-1].reason}")
    cmd = c.DeleteInstance(command_id=f"{r.request_id}:delete:{len(tries)}",
                           instance_uuid=uuid, instance_version=inst.version)
    return Send(inst.host, cmd)


def _name(ctx: Ctx, mig: Migration) -> str:
    inst = ctx.view.instances.get(mig.instance_uuid)
    return inst.name if inst else mig.instance_uuid


_PLANS = {"boot": plan_boot, "resize": plan_resize, "confirm": plan_confirm,
          "revert": plan_revert}


def candidates(view: Projection, hosts: dict, down: set, need: Resources, source: str,
               exclude: set, forced: str, same_host: bool,
               free_of: Callable[[str], Resources]) -> list[str]:
    """Filters: host up, fits with ratios, same-host policy. Weigher: spread (the host
    with the most free memory first)."""
    out = []
    for name in ([forced] if forced else hosts):
        if name in exclude or name in down:
            continue
        if name == source and not same_host:
            continue
        free = free_of(name)
        if need.fits_in(free):
            out.append((-free.memory_mb, -free.vcpus, name))
    out.sort()
    return [name for _, _, name in out]
