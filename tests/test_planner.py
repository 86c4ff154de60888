"""The controller's pure planner, with no Ray and no event loop: given a view and a
request, the next action."""
from __future__ import annotations

import msgspec

from vmresize.actors.planner import (Answer, Choose, Ctx, End, Request, Send, WaitFor,
                                     plan)
from vmresize.events.schema import Flavor
from vmresize.projections.fold import Projection
from vmresize.projections.state import Instance, Migration
from vmresize.protocol import commands as c
from vmresize.protocol.states import RUNNING, SHUTDOWN

SMALL = Flavor("m1.small", 1, 2048, 20)
MEDIUM = Flavor("m1.medium", 2, 4096, 40)
FLAVORS = {"m1.small": SMALL, "m1.medium": MEDIUM}
U, M = "u-1", "m-1"
replace = msgspec.structs.replace


def view(vm_state="active", task_state=None, power=RUNNING, mig_status=None, **mig):
    p = Projection()
    p.instances[U] = Instance(uuid=U, name="vm1", host="h1", flavor=SMALL,
                              vm_state=vm_state, task_state=task_state, power_state=power,
                              version=7, resources=SMALL.resources(),
                              migration_id=M if mig_status else "")
    if mig_status:
        p.migrations[M] = Migration(id=M, instance_uuid=U, source_compute="h1",
                                    dest_compute="h2", status=mig_status,
                                    migration_type="resize", old_flavor=SMALL,
                                    new_flavor=MEDIUM, created_at=0.0, updated_at=0.0,
                                    **mig)
    return p


def ctx(p: Projection, hosts=("h2", "h3"), **open_) -> Ctx:
    return Ctx(view=p, flavors=FLAVORS, max_attempts=2, cleanup_attempts=3,
               allow_same_host=False, disks={},
               open_resizes=open_.get("resizes", {}), open_finishes={},
               open_actions={}, open_deletes=open_.get("deletes", {}),
               open_boots={},
               candidates=lambda need, source, exclude, forced: [
                   h for h in hosts if h not in exclude and h != source])


def resize_request(**kw) -> Request:
    return Request("r-1", "resize", U, M, name="vm1", flavor="m1.medium", **kw)


def test_a_new_resize_chooses_a_destination_then_asks_it_to_claim():
    r = resize_request()
    assert plan(ctx(view()), r) == Choose("h2")
    r.attempts.append("h2")
    action = plan(ctx(view()), r)
    assert isinstance(action, Send) and action.host == "h2"
    assert isinstance(action.cmd, c.PrepResize) and action.cmd.command_id == f"{M}:prep:1"
    assert action.cmd.instance_version == 7 and action.cmd.spec.source == "h1"


def test_a_refused_claim_reschedules_then_ends_with_no_valid_host():
    r = resize_request(attempts=["h2"])
    r.answers[f"{M}:prep:1"] = Answer(False, "h2 cannot hold it")
    assert plan(ctx(view()), r) == Choose("h3")
    r.attempts.append("h3")
    r.answers[f"{M}:prep:2"] = Answer(False, "h3 cannot hold it")
    end = plan(ctx(view()), r)
    assert isinstance(end, End) and not end.ok and "no valid host" in end.outcome
    assert "2 attempt(s): h2, h3" in end.outcome


def test_each_status_of_a_resize_sends_its_next_step():
    r = resize_request(attempts=["h2"])
    open_claim = plan(ctx(view(mig_status="pre-migrating", claim_ready=False)), r)
    assert isinstance(open_claim.cmd, c.PrepResize) and open_claim.host == "h2"
    resize = plan(ctx(view(mig_status="pre-migrating")), r)
    assert isinstance(resize.cmd, c.ResizeInstance) and resize.host == "h1"
    again = plan(ctx(view(mig_status="migrating")), r)
    assert again.cmd.command_id == resize.cmd.command_id       # same id: joined
    finish = plan(ctx(view(mig_status="post-migrating", disk_migrated=True)), r)
    assert isinstance(finish.cmd, c.FinishResize) and finish.host == "h2"
    assert plan(ctx(view("resized", mig_status="finished")), r) == End(True)


def test_a_refused_step_before_anything_happened_releases_the_claim():
    r = resize_request(attempts=["h2"])
    r.answers[f"{M}:resize"] = Answer(False, "stale version", events=0)
    release = plan(ctx(view(mig_status="pre-migrating")), r)
    assert isinstance(release.cmd, c.ReleaseClaim) and release.cmd.role == "dest"
    assert release.mode == "until_ok"


def test_compensation_after_a_failure_releases_the_destination_restores_the_source_then_ends():
    r = resize_request(attempts=["h2"])
    failed = dict(mig_status="error", reason="boom", source_started=True)
    first = plan(ctx(view(**failed)), r)
    assert isinstance(first.cmd, c.ReleaseClaim) and first.cmd.role == "dest"
    assert first.host == "h2"
    moved = plan(ctx(view(**failed, dest_settled=True, resize_dir=True)), r)
    assert isinstance(moved.cmd, c.RestoreSource) and moved.mode == "cleanup"
    end = plan(ctx(view(**failed, dest_settled=True, source_settled=True)), r)
    assert end == End(False, "resize of vm1 failed: boom")


def test_a_delete_cancels_a_resize_under_way():
    deleting = {"deletes": {U: Request("d-1", "action", U, action="delete")}}
    r = resize_request(attempts=["h2"])
    assert isinstance(plan(ctx(view(), **deleting), resize_request()), End)
    claimed = plan(ctx(view(mig_status="pre-migrating"), **deleting), r)
    assert isinstance(claimed.cmd, c.ReleaseClaim) and not claimed.cmd.remove_disks
    moved = plan(ctx(view(mig_status="post-migrating", disk_migrated=True, dest_copy=True),
                     **deleting), r)
    assert isinstance(moved.cmd, c.ReleaseClaim) and moved.cmd.remove_disks


def test_delete_waits_confirms_then_destroys():
    delete = Request("d-1", "action", U, name="vm1", action="delete")
    busy = resize_request()
    assert plan(ctx(view(mig_status="migrating"), resizes={U: busy}), delete) == \
        WaitFor("r-1")
    confirm = plan(ctx(view("resized", mig_status="finished")), delete)
    assert isinstance(confirm.cmd, c.ConfirmResize) and confirm.host == "h1"
    destroy = plan(ctx(view()), delete)
    assert isinstance(destroy.cmd, c.DeleteInstance) and destroy.host == "h1"
    assert destroy.cmd.command_id == "d-1:delete:0"
    delete.answers["d-1:delete:0"] = Answer(False, "destroy failed")
    assert plan(ctx(view("error")), delete).cmd.command_id == "d-1:delete:1"
    gone = view()
    gone.instances[U] = replace(gone.instances[U], deleted=True)
    assert plan(ctx(gone), delete) == End(True)


def test_stop_and_start_are_one_command_or_nothing():
    stop = Request("s-1", "action", U, name="vm1", action="stop")
    send = plan(ctx(view()), stop)
    assert isinstance(send.cmd, c.StopInstance) and send.cmd.command_id == "s-1:stop"
    assert plan(ctx(view("stopped", power=SHUTDOWN)), stop) == End(True)
    stop.answers["s-1:stop"] = Answer(False, "power_off failed")
    assert plan(ctx(view()), stop) == End(False, "power_off failed")
    reboot = Request("b-1", "action", U, name="vm1", action="reboot", hard=True)
    assert plan(ctx(view()), reboot).cmd.hard is True
