"""The compute API's pure parts: cluster.yaml's api section, microversions, tokens and
Nova's default policy, the server view's status while a resize waits to be claimed,
and concurrent server lookups sharing a round trip."""
from __future__ import annotations

import asyncio

import pytest

from vmresize.api import auth, microversions, views
from vmresize.api.errors import ApiError, unexpected_properties
from vmresize.config import ConfigError, parse, with_api_listen
from vmresize.events.schema import Flavor
from vmresize.projections.state import Instance, Migration

BASE = """
flavors: {m1.small: {vcpus: 1, memory_mb: 2048, root_gb: 20}}
hosts: [{name: compute-1, vcpus: 8, memory_mb: 16384, disk_gb: 400}]
"""


def test_api_section_defaults_to_loopback_without_auth():
    cfg = parse(BASE)
    assert (cfg.api.listen, cfg.api.auth, cfg.api.runtime) == ("127.0.0.1:8774", "none",
                                                               "actor")
    assert [i.name for i in cfg.images] == ["cirros"]


@pytest.mark.parametrize("api, words", [
    ('{listen: "0.0.0.0:8774"}', "api.listen: '0.0.0.0:8774' is not a loopback"),
    ('{listen: "8774"}', "api.listen: expected HOST:PORT"),
    ('{listen: "127.0.0.1:99999"}', "api.listen: expected a port 1-65535"),
    ('{auth: keystone}', "api.users: at least one user"),
    ('{auth: ldap}', "api.auth: invalid enum value 'ldap'"),
    ('{users: [{name: a, password_hash: plain}]}', "api.users[0].password_hash"),
    ('{users: [{name: a, password_hash: "scrypt$x", roles: [god]}]}',
     "api.users[0].roles[0]"),
    ('{colour: red}', "api: object contains unknown field colour"),
])
def test_bad_api_section_names_the_field(api, words):
    with pytest.raises(ConfigError) as err:
        parse(BASE + f"api: {api}\n")
    assert words in str(err.value)


@pytest.mark.parametrize("extra, words", [
    ("hosts: [{name: c, vcpus: 1, memory_mb: 4096, disk_gb: 1},"
     " {name: c, vcpus: 1, memory_mb: 4096, disk_gb: 1}]",
     "hosts[1].name: 'c' is also hosts[0].name; names must be unique"),
    ('api: {users: [{name: u, password_hash: "scrypt$x"},'
     ' {name: u, password_hash: "scrypt$y"}]}',
     "api.users[1].name: 'u' is also api.users[0].name; names must be unique"),
    ("images: [{name: i}, {name: j}, {name: i}]",
     "images[2].name: 'i' is also images[0].name; names must be unique"),
])
def test_a_name_given_twice_is_refused_naming_both_places(extra, words):
    base = BASE if extra.startswith(("api", "images")) else BASE.split("hosts:")[0]
    with pytest.raises(ConfigError) as err:
        parse(base + extra + "\n")
    assert words in str(err.value)


def test_api_listen_override_is_checked_like_the_file():
    cfg = parse(BASE)
    assert with_api_listen(cfg, "").api.listen == ""
    with pytest.raises(ConfigError, match="--api-listen: '10.0.0.1:80' is not a loopback"):
        with_api_listen(cfg, "10.0.0.1:80")


def test_microversion_headers():
    assert microversions.requested({}) == (2, 1)
    assert microversions.requested({"openstack-api-version": "compute 2.56"}) == (2, 56)
    assert microversions.requested({"x-openstack-nova-api-version": "latest"}) == (2, 96)
    with pytest.raises(microversions.VersionError) as err:
        microversions.requested({"openstack-api-version": "compute 3.0"})
    assert err.value.code == 406


def test_tokens_carry_the_caller_and_refuse_forgery_and_expiry():
    now = [1000.0]
    users = [parse(BASE + "api: {auth: keystone, users: [{name: alice, password_hash: '"
                   + auth.hash_password("s3cret") + "', roles: [member], "
                   "project: demo}]}\n").api.users[0]]
    tokens = auth.Tokens(auth.new_key(), users, 60, lambda: now[0])
    caller = tokens.issue("alice", "s3cret", "demo")
    assert (caller.user_name, caller.project_name, caller.roles) == (
        "alice", "demo", ("member", "reader"))
    token = tokens.encode(caller)
    assert tokens.check(token) == caller
    with pytest.raises(ApiError) as err:
        tokens.issue("alice", "wrong", "demo")
    assert err.value.code == 401
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in (forged, "", None, "x.y"):
        with pytest.raises(ApiError):
            tokens.check(bad)
    other = auth.Tokens(auth.new_key(), users, 60, lambda: now[0])
    with pytest.raises(ApiError):
        other.check(token)
    now[0] += 61
    with pytest.raises(ApiError):
        tokens.check(token)


def test_default_policy():
    admin = auth.Caller("u0", "root", "p0", "admin", ("admin", "member", "reader"))
    member = auth.Caller("u1", "alice", "p1", "demo", ("member", "reader"))
    reader = auth.Caller("u2", "bob", "p1", "demo", ("reader",))
    for rule in ("migrate", "os-migrations", "hypervisors", "services", "flavor-manage"):
        auth.authorize(admin, rule)
        with pytest.raises(ApiError) as err:
            auth.authorize(member, rule)
        assert err.value.code == 403
    auth.authorize(member, "servers:resize", "p1")
    auth.authorize(reader, "servers:show:read", "p1")
    with pytest.raises(ApiError) as err:
        auth.authorize(reader, "servers:resize", "p1")
    assert err.value.code == 403
    with pytest.raises(ApiError) as err:
        auth.authorize(member, "servers:show:read", "p-other")
    assert err.value.code == 404


def test_a_resize_not_yet_claimed_shows_resize():
    small = Flavor(name="m1.small", vcpus=1, memory_mb=2048, root_gb=20)
    inst = Instance(uuid="u", name="vm", host="h1", flavor=small, vm_state="active",
                    task_state=None, power_state=1, version=2)
    mig = Migration(id="m", instance_uuid="u", source_compute="h1", dest_compute="",
                    status="pre-migrating", migration_type="resize", old_flavor=small,
                    new_flavor=small, created_at=0, updated_at=0)
    task = views.task_state(inst, mig)
    assert (task, views.status(inst, task)) == ("resize_prep", "RESIZE")
    assert views.status(inst, views.task_state(inst, None)) == "ACTIVE"


class _SlowViews:
    """A cluster whose `servers_of` answers from `state` as it was when called, and
    returns only once `release` is set: a round trip held in flight."""

    def __init__(self, state: dict):
        self.state = state
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()

    async def call(self, fn, *args):
        return await fn(*args)

    async def servers_of(self, uuids: list[str]):
        self.calls.append(list(uuids))
        seen = [self.state.get(u) for u in uuids]
        await self.release.wait()
        return seen


def test_concurrent_server_lookups_share_a_round_trip_and_never_join_an_earlier_one():
    from vmresize.api.app import ServerLookups

    async def scenario():
        cluster = _SlowViews({"a": "ACTIVE"})
        api = type("Api", (), {"cluster": cluster, "call": staticmethod(cluster.call)})
        lookups = ServerLookups(api)
        first = asyncio.ensure_future(lookups.get("a"))
        for _ in range(10):                    # until the first round trip is in flight
            if cluster.calls:
                break
            await asyncio.sleep(0)
        assert cluster.calls == [["a"]]
        cluster.state["a"] = "RESIZE"          # acknowledged while it is
        later = [asyncio.ensure_future(lookups.get(u)) for u in ("a", "b", "a")]
        await asyncio.sleep(0)
        cluster.release.set()
        return await first, await asyncio.gather(*later), cluster.calls

    first, later, calls = asyncio.run(scenario())
    assert first == "ACTIVE"
    assert later == ["RESIZE", None, "RESIZE"]
    assert calls == [["a"], ["a", "b"]]


class _HeldFetch:
    """A fetch that reads `state` when it is sent and answers once `release` is set."""

    def __init__(self, state: dict):
        self.state = state
        self.sent: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self):
        seen = self.state["flavors"]
        self.sent.append(seen)
        await self.release.wait()
        return seen


async def _steps(n: int = 10) -> None:
    """Let the event loop run the tasks just started up to their first wait."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_expired_value_readers_share_one_fetch_and_fresh_ones_never_join_an_earlier_one():
    from vmresize.api.app import Refreshed

    async def scenario():
        now = [0.0]
        fetch = _HeldFetch({"flavors": "v1"})
        cached = Refreshed(fetch, 1.0, clock=lambda: now[0])
        readers = [asyncio.ensure_future(cached.get()) for _ in range(20)]
        await _steps()
        assert fetch.sent == ["v1"]                # twenty readers, one fetch
        fetch.state["flavors"] = "v2"              # a change acknowledged meanwhile
        fresh = asyncio.ensure_future(cached.get(fresh=True))
        await _steps()
        fetch.release.set()
        shared, fresh = await asyncio.gather(*readers), await fresh
        kept = await cached.get()                  # within the ttl: no fetch
        fetch.state["flavors"] = "v3"
        fetch.release.clear()
        now[0] = 5.0                               # expired: one fetch for the two
        late = [asyncio.ensure_future(cached.get()) for _ in range(2)]
        await _steps()
        fetch.state["flavors"] = "v4"
        cached.invalidate()                        # this process changed it
        after = asyncio.ensure_future(cached.get())
        await _steps()
        fetch.release.set()
        return shared, fresh, kept, await asyncio.gather(*late), await after, fetch.sent

    shared, fresh, kept, late, after, sent = asyncio.run(scenario())
    assert set(shared) == {"v1"} and fresh == "v2" and kept == "v2"
    assert late == ["v3", "v3"] and after == "v4"
    assert sent == ["v1", "v2", "v3", "v4"]


class _View:
    def __init__(self, uuid: str, status: str):
        self.instance = type("Instance", (), {"uuid": uuid,
                                              "deleted": status == "DELETED"})()
        self.status = status


def _api_of(cluster, retain_deleted: int = 1024):
    options = type("Options", (), {"retain_deleted": retain_deleted})()
    return type("Api", (), {"cluster": cluster, "call": staticmethod(cluster.call),
                            "cfg": type("Cfg", (), {"options": options})()})


class _FollowedCluster:
    """`server_changes` answers with what the test queues (a reply or an exception);
    `servers_of` (the direct lookup) answers from `state` at once."""

    def __init__(self):
        self.state: dict[str, str] = {}
        self.replies: asyncio.Queue = asyncio.Queue()
        self.polls: list[tuple[str, int]] = []
        self.direct: list[list[str]] = []
        self.mark = ("e1", 0)

    async def call(self, fn, *args):
        return await fn(*args)

    async def server_changes(self, epoch, since, wait_s):
        self.polls.append((epoch, since))
        reply = await self.replies.get()
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def servers_of(self, uuids):
        self.direct.append(list(uuids))
        return [_View(u, self.state[u]) if u in self.state else None for u in uuids]

    def change_mark(self):
        return self.mark

    def changes(self, epoch: str, seq: int, *uuids: str):
        return (epoch, seq, [_View(u, self.state[u]) for u in uuids])


def test_server_views_follow_the_controller_and_a_writer_reads_its_own_write():
    from vmresize.api.app import ServerLookups, ServerViews

    async def scenario():
        c = _FollowedCluster()
        api = _api_of(c)
        views = ServerViews(api, ServerLookups(api))
        views.RETRY_S = (0.001, 0.001)
        c.state.update(a="ACTIVE", b="ACTIVE")
        seen = [(await views.get("a")).status]          # not following yet: asked
        assert c.direct == [["a"]] and c.polls == [("", 0)]
        c.replies.put_nowait(c.changes("e1", 1, "a", "b"))
        await _steps()
        seen.append((await views.get("a")).status)      # from the view
        assert c.direct == [["a"]] and c.polls[-1] == ("e1", 1)
        c.state["a"], c.mark = "RESIZE", ("e1", 2)      # this process resized a
        views.changed("a")
        c.state["b"] = "SHUTOFF"                         # another client stopped b
        a_read = asyncio.ensure_future(views.get("a"))
        seen.append((await views.get("b")).status)      # not ours: the view's, at once
        await _steps()
        assert not a_read.done()                         # waits for the view to reach 2
        c.replies.put_nowait(c.changes("e1", 2, "a", "b"))
        seen.append((await a_read).status)
        seen.append((await views.get("b")).status)
        assert await views.get("nope") is None and c.direct[-1] == ["nope"]
        c.replies.put_nowait(RuntimeError("controller restarting"))
        await _steps()
        c.state["a"] = "VERIFY_RESIZE"
        seen.append((await views.get("a")).status)      # poll failing: asked
        c.replies.put_nowait(c.changes("e2", 1, "a", "b"))   # restarted: all anew
        for _ in range(1000):                            # the poll's retry, bounded
            if views.live:
                break
            await asyncio.sleep(0.001)
        asked = len(c.direct)
        seen.append((await views.get("a")).status)
        assert len(c.direct) == asked and c.polls[-1] == ("e2", 1)
        views.task.cancel()
        return seen

    assert asyncio.run(scenario()) == ["ACTIVE", "ACTIVE", "ACTIVE", "RESIZE", "SHUTOFF",
                                       "VERIFY_RESIZE", "VERIFY_RESIZE"]


def test_server_views_keep_as_many_deleted_servers_as_the_controller():
    from vmresize.api.app import ServerLookups, ServerViews

    async def scenario():
        c = _FollowedCluster()
        api = _api_of(c, retain_deleted=2)
        views = ServerViews(api, ServerLookups(api))
        c.state.update(a="DELETED", b="DELETED", d="DELETED", live="ACTIVE")
        await views.get("live")                           # starts following
        c.replies.put_nowait(c.changes("e1", 1, "a", "b", "live", "d"))
        await _steps()
        kept = sorted(views.views)
        del c.state["a"]                                  # the controller forgot it too
        gone = await views.get("a")
        views.task.cancel()
        return kept, gone, c.direct[-1]

    kept, gone, asked = asyncio.run(scenario())
    assert kept == ["b", "d", "live"] and gone is None and asked == ["a"]


def test_unexpected_properties_are_named_as_nova_names_them():
    one = unexpected_properties({"host"})
    assert (one.code, one.message) == (
        400, "Additional properties are not allowed ('host' was unexpected)")
    two = unexpected_properties(["zone", "color"])
    assert two.message == ("Additional properties are not allowed "
                           "('color', 'zone' were unexpected)")
