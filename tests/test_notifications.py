"""Nova's notification names are derived from the events of a resize."""
from __future__ import annotations

from vmresize.config import load
from vmresize.sim.simulator import SimConfig, Simulator
from vmresize.events.store import open_host_logs
from vmresize.projections.fold import merge_logs
from vmresize.projections.notifications import notifications


def test_a_confirmed_resize_notifies_in_novas_order(tmp_path):
    sim = Simulator(load("cluster.yaml"), SimConfig(seed=3, hosts=3, instances=4,
                                                    operations=12, faults=()), tmp_path)
    sim.run()
    readers = open_host_logs(tmp_path)
    by_migration: dict[str, list[str]] = {}
    for env in merge_logs({h: r.envelopes() for h, r in readers.items()}):
        mid = getattr(env.event, "migration_id", "")
        if mid:
            by_migration.setdefault(mid, []).extend(notifications(env))
    confirmed = [names for names in by_migration.values()
                 if "compute.instance.resize.confirm.end" in names]
    assert confirmed, "the run confirmed no resize"
    assert confirmed[0] == [f"compute.instance.{n}" for n in (
        "resize.prep.start", "resize.prep.end", "resize.start", "resize.end",
        "finish_resize.start", "finish_resize.end", "resize.confirm.start",
        "resize.confirm.end")]
