"""What the compute API needs from the controller, in process on the virtual clock:
flavors created and deleted as controller events (so they outlive a restart), and
instances by uuid with the resize that no host has claimed yet.
"""
from __future__ import annotations

import asyncio

import pytest

from test_controller import Rig, virtual
from vmresize.actors.controller import OperationError
from vmresize.events import schema as ev
from vmresize.events.schema import Flavor

M1_HUGE = Flavor(name="m1.huge", vcpus=2, memory_mb=1024, root_gb=40)


@virtual
async def test_created_flavor_is_logged_numbered_and_survives_a_restart():
    rig = Rig()
    ctl = await rig.start()
    assert [(i.id, i.flavor.name) for i in ctl.flavor_list()][:2] == [
        ("1", "m1.tiny"), ("2", "m1.small")]
    info = await ctl.create_flavor(M1_HUGE, request_id="req-1")
    assert (info.id, info.flavor) == (str(len(rig.cfg.flavors) + 1), M1_HUGE)
    created = [e for e in rig.controller_events() if type(e) is ev.FlavorCreated]
    assert [(e.request_id, e.flavor, e.flavor_id) for e in created] == [
        ("req-1", M1_HUGE, info.id)]
    inst = await ctl.boot("vm1", "m1.huge")
    assert inst.flavor == M1_HUGE

    again = rig.new_controller()
    await again.start()
    assert again.flavors["m1.huge"] == M1_HUGE
    assert [i for i in again.flavor_list() if i.flavor.name == "m1.huge"] == [info]


@virtual
async def test_deleted_flavor_is_gone_after_a_restart_but_keeps_its_id_for_instances():
    rig = Rig()
    ctl = await rig.start()
    info = await ctl.create_flavor(M1_HUGE, "huge-id")
    await ctl.boot("vm1", "m1.huge")
    await ctl.delete_flavor("huge-id", request_id="req-del")
    assert "m1.huge" not in ctl.flavors
    with pytest.raises(OperationError, match="unknown flavor"):
        await ctl.boot("vm2", "m1.huge")
    again = rig.new_controller()
    await again.start()
    assert "m1.huge" not in again.flavors
    kept = [i for i in again.flavor_list() if i.flavor.name == "m1.huge"]
    assert [(i.id, i.deleted) for i in kept] == [(info.id, True)]
    assert again.instance_by_name("vm1").flavor == M1_HUGE


@virtual
async def test_flavor_refusals_log_nothing():
    rig = Rig()
    ctl = await rig.start()
    before = rig.controller_events()
    with pytest.raises(OperationError, match="already exists"):
        await ctl.create_flavor(Flavor(name="m1.small", vcpus=1, memory_mb=1, root_gb=1))
    with pytest.raises(OperationError, match="id '1' already exists"):
        await ctl.create_flavor(M1_HUGE, "1")
    with pytest.raises(OperationError, match="no flavor with id"):
        await ctl.delete_flavor("404")
    assert rig.controller_events() == before


@virtual
async def test_a_resize_shows_on_the_server_before_any_host_claimed_it():
    rig = Rig()
    ctl = await rig.start()
    inst = await ctl.boot("vm1", "m1.small")
    mig = await ctl.resize("vm1", "m1.medium", wait=False)
    view = ctl.server(inst.uuid)
    assert view.instance.uuid == inst.uuid and view.migration.id == mig.id
    assert [(s.instance.uuid, s.migration.id) for s in ctl.servers()] == [(inst.uuid, mig.id)]
    await ctl.wait_migration(mig.id)
    await ctl.confirm("vm1")
    assert ctl.server(inst.uuid).migration is None
    with pytest.raises(OperationError, match="no instance with uuid"):
        ctl.server("nope")


@virtual
async def test_owner_and_image_are_logged_with_the_boot_and_survive_a_restart():
    rig = Rig()
    ctl = await rig.start()
    owner = ev.OwnerRecorded(request_id="", instance_uuid="", project_id="p1",
                             user_id="u1", image_id="img-1")
    inst = await ctl.boot("vm1", "m1.small", request_id="req-boot", owner=owner)
    logged = [e for e in rig.controller_events() if type(e) is ev.OwnerRecorded]
    assert [(e.request_id, e.instance_uuid, e.project_id, e.image_id) for e in logged] == [
        ("req-boot", inst.uuid, "p1", "img-1")]
    again = rig.new_controller()
    await again.start()
    view = again.server(inst.uuid)
    assert (view.project, view.user, view.image_id) == ("p1", "u1", "img-1")
    assert 0 < view.created_at <= view.updated_at


@virtual
async def test_servers_of_answers_each_uuid_as_server_does_and_none_for_unknown():
    rig = Rig()
    ctl = await rig.start()
    a = await ctl.boot("vm1", "m1.small")
    b = await ctl.boot("vm2", "m1.tiny")
    mig = await ctl.resize("vm2", "m1.small", wait=False)
    views = ctl.servers_of([b.uuid, "nope", a.uuid, b.uuid])
    assert views == [ctl.server(b.uuid), None, ctl.server(a.uuid), ctl.server(b.uuid)]
    assert views[0].migration.id == mig.id and views[2].migration is None
    await ctl.wait_migration(mig.id)


@virtual
async def test_following_server_changes_gives_every_server_view_as_server_shows_it():
    rig = Rig()
    ctl = await rig.start()
    followed: dict = {}
    seqs = [0]

    def follow() -> list[str]:
        seq, views = ctl.server_changes(seqs[-1])
        assert seq >= seqs[-1]
        seqs.append(seq)
        for view in views:
            followed[view.instance.uuid] = view
        assert followed == {u: ctl.server(u) for u in ctl.view.instances}
        return [v.instance.uuid for v in views]

    a = await ctl.boot("vm1", "m1.small")
    b = await ctl.boot("vm2", "m1.tiny")
    assert sorted(follow()) == sorted([a.uuid, b.uuid])
    assert follow() == [] and seqs[-1] == seqs[-2]       # nothing changed: nothing new
    mig = await ctl.resize("vm1", "m1.medium", wait=False)
    assert follow() == [a.uuid]
    assert followed[a.uuid].migration.id == mig.id       # RESIZE before any host claimed
    waiting = asyncio.ensure_future(ctl.wait_migration(mig.id))
    statuses = []
    while not waiting.done():                            # every step on its way
        await asyncio.sleep(0)
        follow()
        statuses.append(followed[a.uuid].instance.task_state)
    assert len(set(statuses)) > 2, statuses
    assert follow() == [] and followed[a.uuid].migration.status == "finished"
    await ctl.confirm("vm1")
    follow()
    await ctl.act("vm2", "delete")
    assert follow() == [b.uuid] and followed[b.uuid].instance.deleted
    await ctl.create_flavor(Flavor(name="m1.vast", vcpus=4096, memory_mb=1, root_gb=1))
    with pytest.raises(OperationError, match="no valid host"):
        await ctl.resize("vm1", "m1.vast")                # logged, then ended: NoValidHost
    assert follow() == [a.uuid] and followed[a.uuid].migration is None
    again = rig.new_controller()
    await again.start()
    seq, views = again.server_changes(0)                # a restart: every server anew
    assert {v.instance.uuid: v for v in views} == {u: again.server(u)
                                                   for u in again.view.instances}
