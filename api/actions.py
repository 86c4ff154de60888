"""Instance actions (`servers/{id}/os-instance-actions`), built from the logs.

Every request the controller logged for an instance (`BootRequested`,
`ResizeRequested`, `ConfirmRequested`, ..., each with the request id the compute API
gave it) is one action: it starts when it was logged and finishes when its
`RequestEnded` was; its events are the host events of that instance logged in between
(the steps: prep_resize, resize_instance, finish_resize, ...). The logs are opened
read-only, as `vmresize events` opens them.
"""
from __future__ import annotations

import msgspec

from vmresize.events import schema as ev
from vmresize.events.store import open_host_logs, read_controller_log


class Step(msgspec.Struct, frozen=True):
    event: str
    host: str
    start_time: float
    finish_time: float | None
    result: str | None
    details: str = ""


class Action(msgspec.Struct, frozen=True):
    action: str
    request_id: str
    instance_uuid: str
    start_time: float
    finish_time: float | None = None
    ok: bool | None = None          # None while the request is open
    message: str = ""
    steps: tuple[Step, ...] = ()


# Host events that start a step, with Nova's event name for that step.
STEP_NAMES = {
    "SpawnStarted": "compute__do_build_and_run_instance",
    "Claimed": "compute_prep_resize", "ClaimRejected": "compute_prep_resize",
    "MigrationStarted": "compute_resize_instance",
    "FinishStarted": "compute_finish_resize",
    "ConfirmStarted": "compute_confirm_resize",
    "RevertStarted": "compute_revert_resize",
    "RevertFinishStarted": "compute_finish_revert_resize",
    "PowerOffStarted": "compute_stop_instance", "PowerOnStarted": "compute_start_instance",
    "RebootStarted": "compute_reboot_instance", "DeleteStarted": "compute_terminate_instance",
    "RestoreStarted": "compute_finish_revert_resize",
}
FAILURES = ("Failed", "ClaimRejected", "SpawnFailed", "ActionFailed")


def _action_name(e) -> str:
    t = type(e).__name__
    if t == "BootRequested":
        return "create"
    if t == "ResizeRequested":
        return "migrate" if e.migration_type == "migration" else "resize"
    if t == "ConfirmRequested":
        return "confirmResize"
    if t == "RevertRequested":
        return "revertResize"
    if isinstance(getattr(e, "action", None), str):      # stop, start, reboot, delete
        return e.action
    base = t[:-len("Requested")] if t.endswith("Requested") else t
    return base[:1].lower() + base[1:]


def requests_of(state_dir, instance_uuid: str) -> list[Action]:
    """The requests logged for this instance, oldest first, without their steps."""
    migrations: dict[str, str] = {}           # migration id -> instance uuid
    actions: dict[str, Action] = {}
    for env in read_controller_log(state_dir):
        e = env.event
        if type(e) in (ev.RequestEnded, ev.DestinationChosen, ev.FlavorCreated,
                       ev.FlavorDeleted, ev.OwnerRecorded):
            if type(e) is ev.RequestEnded and e.request_id in actions:
                a = actions[e.request_id]
                actions[e.request_id] = msgspec.structs.replace(
                    a, finish_time=env.wall_time, ok=e.ok, message=e.outcome)
            continue
        uuid = getattr(e, "instance_uuid", "") or migrations.get(
            getattr(e, "migration_id", ""), "")
        if getattr(e, "migration_id", "") and getattr(e, "instance_uuid", ""):
            migrations[e.migration_id] = e.instance_uuid
        if uuid == instance_uuid and e.request_id not in actions:
            actions[e.request_id] = Action(_action_name(e), e.request_id, uuid,
                                           env.wall_time)
    return sorted(actions.values(), key=lambda a: a.start_time)


def _host_events(state_dir, instance_uuid: str) -> list:
    out = []
    for reader in open_host_logs(state_dir).values():
        try:
            out.extend(env for env in reader.envelopes()
                       if getattr(env.event, "instance_uuid", None) == instance_uuid)
        finally:
            reader.close()
    out.sort(key=lambda env: (env.wall_time, env.host, env.offset))
    return out


def _steps(envs) -> tuple[Step, ...]:
    """Group a request's host events into steps: a step starts at an event named in
    STEP_NAMES and takes the events after it, on the same host, up to the next."""
    steps: list[Step] = []
    for env in envs:
        t = type(env.event).__name__
        name = STEP_NAMES.get(t)
        failed = t in FAILURES
        if name is not None and (t != "ClaimRejected" or not steps
                                 or steps[-1].event != name):
            steps.append(Step(name, env.host, env.wall_time, env.wall_time,
                              "Error" if failed else "Success",
                              getattr(env.event, "reason", "")))
        elif steps:
            last = steps[-1]
            steps[-1] = msgspec.structs.replace(
                last, finish_time=env.wall_time,
                result="Error" if failed else last.result,
                details=getattr(env.event, "reason", "") or last.details)
    return tuple(steps)


def instance_actions(state_dir, instance_uuid: str) -> list[Action]:
    """Every action on the instance with its steps, oldest first."""
    actions = requests_of(state_dir, instance_uuid)
    if not actions:
        return []
    events = _host_events(state_dir, instance_uuid)
    out = []
    for i, a in enumerate(actions):
        end = a.finish_time if a.finish_time is not None else float("inf")
        nxt = actions[i + 1].start_time if i + 1 < len(actions) else float("inf")
        window = [env for env in events if a.start_time <= env.wall_time <= min(end, nxt)]
        out.append(msgspec.structs.replace(a, steps=_steps(window)))
    return out


def request_records(state_dir, request_id: str) -> tuple[list, str, float, float]:
    """(the controller's records of the request, its instance, when it started, when
    it ended or +inf): what `vmresize events --request ID` shows."""
    records: list = []
    migrations: dict[str, str] = {}
    uuid = ""
    for env in read_controller_log(state_dir):
        e = env.event
        if getattr(e, "migration_id", "") and getattr(e, "instance_uuid", ""):
            migrations[e.migration_id] = e.instance_uuid
        if e.request_id == request_id:
            records.append(env)
            uuid = uuid or getattr(e, "instance_uuid", "") or migrations.get(
                getattr(e, "migration_id", ""), "")
    if not records:
        return [], "", 0.0, 0.0
    ended = [env.wall_time for env in records if type(env.event) is ev.RequestEnded]
    return records, uuid, records[0].wall_time, ended[-1] if ended else float("inf")
