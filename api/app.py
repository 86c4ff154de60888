"""The compute API as an ASGI application (Starlette): routes, bodies, errors, ids.

Every response carries `x-openstack-request-id` and `x-compute-request-id`: a fresh
`req-<uuid>` that is also the id of the controller request the call makes, so the
events it caused are found by it (`vmresize events --request ID`). Handlers raise
`ApiError`; the cluster's refusals become Nova's status codes in `errors.refusal`.
The cluster is driven through `Cluster` (blocking calls, run on a thread pool so the
event loop keeps serving).
"""
from __future__ import annotations

import asyncio
import inspect
import re
from collections import Counter
import secrets
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vmresize.api import actions as actionlog
from vmresize.api import auth, microversions, views
from vmresize.api.errors import (ApiError, bad_request, conflict, not_found, refusal,
                                 unexpected_properties)
from vmresize.api.microversions import Version, VersionError
from vmresize.events.schema import Flavor

MAX_BODY_BYTES = 112 * 1024        # Nova's (oslo's) max_request_body_size
CACHE_S = 1.0
JSON = "application/json"


class Ctx:
    """One request: its id, version, caller, URLs, and lookups it may need."""

    def __init__(self, api: "Api", request: Request, request_id: str, version: Version,
                 caller: auth.Caller):
        self.api = api
        self.request = request
        self.request_id = request_id
        self.version = version
        self.caller = caller
        self.root = api.public_url or str(request.base_url).rstrip("/")
        self.base = self.root + "/v2.1"
        self.flavors: list | None = None
        self.hosts_up: dict[str, bool] | None = None
        self.default_project = auth.project_id("default")
        self.default_user = auth.user_id("admin")

    @property
    def admin(self) -> bool:
        return self.caller.admin

    def flavor_info(self, name: str):
        for info in reversed(self.flavors or []):
            if info.flavor.name == name:
                return info
        return None

    def flavor_pk(self, name: str) -> int | None:
        """Nova's integer flavor key (os-migrations' *_instance_type_id)."""
        for i, info in enumerate(self.flavors or []):
            if info.flavor.name == name:
                return i + 1
        return None

    def image_ref(self, view):
        if not view.image_id:
            return ""
        return {"id": view.image_id, "links": [views.links(self.base, "images",
                                                            view.image_id)[1]]}

    def host_up(self, host: str) -> bool:
        return (self.hosts_up or {}).get(host, True)


def _json(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(msgspec.json.encode(doc), status, headers=headers, media_type=JSON)


def _empty(status: int) -> Response:
    return Response(b"", status)


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("true", "1", "yes", "on")


class Refreshed:
    """A value fetched from the cluster and kept for `ttl_s`. Readers of an expired
    value share one fetch (never one per request); a `fresh` reader, and every reader
    after `invalidate`, gets a fetch sent after it arrived, so it sees every change
    acknowledged before it."""

    def __init__(self, fetch, ttl_s: float, clock=time.monotonic):
        self.fetch = fetch
        self.ttl_s = ttl_s
        self.clock = clock
        self.value = None
        self.at = 0.0
        self.generation = 0           # bumped by `invalidate` and by every fetch sent
        self.inflight: tuple[int, asyncio.Future] | None = None

    async def get(self, fresh: bool = False):
        if not fresh and self.value is not None and self.clock() - self.at <= self.ttl_s:
            return self.value
        if fresh or self.inflight is None:
            return await self._send()
        return await asyncio.shield(self.inflight[1])

    def invalidate(self) -> None:
        self.value = None
        self.generation += 1
        self.inflight = None          # a fetch sent before the change is joined by none

    async def _send(self):
        self.generation += 1
        generation = self.generation
        future = asyncio.ensure_future(self.fetch())
        self.inflight = (generation, future)
        try:
            value = await asyncio.shield(future)
        finally:
            if self.inflight is not None and self.inflight[0] == generation:
                self.inflight = None
        if generation == self.generation:     # no newer fetch nor change since
            self.value, self.at = value, self.clock()
        return value


class ServerLookups:
    """Lookups of one server each, made by concurrent requests, sent to the cluster as
    one `servers_of` call: while a call is in flight, the lookups that arrive wait for
    the next one. A lookup never joins a call that was sent before it arrived, so it
    sees every change acknowledged before it (a resize's 202, then RESIZE)."""

    MAX_BATCH = 512

    def __init__(self, api: "Api"):
        self.api = api
        self.waiting: dict[str, list[asyncio.Future]] = {}
        self.draining = False

    async def get(self, uuid: str):
        """The server's view, or None if the cluster has no instance of that uuid."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(uuid, []).append(future)
        if not self.draining:
            self.draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting:
                uuids = list(self.waiting)[:self.MAX_BATCH]
                batch = {u: self.waiting.pop(u) for u in uuids}
                try:
                    views = await self.api.call(self.api.cluster.servers_of, uuids)
                except Exception as exc:      # handed to each waiting request
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(exc)
                    continue
                assert len(views) == len(uuids), (len(views), len(uuids))
                for u, view in zip(uuids, views):
                    for f in batch[u]:
                        if not f.done():
                            f.set_result(view)
        finally:
            self.draining = False


class ServerViews:
    """The servers as the controller's `server_changes` last told, followed by a long
    poll from the first lookup on, so that a lookup needs no round trip of its own.

    Reads stay consistent for the callers: a server changed through this process is
    read from the view only once the view has reached the change number that the
    change's answer carried (waiting up to CATCH_UP_S for the poll to bring it), so a
    caller sees its own writes (a resize's 202, then RESIZE); the view only moves
    forward. Unknown servers, those the view has not caught up with, and every server
    while the poll fails (a controller restarting) are asked of the controller through
    `lookups`. A cluster without `server_changes`, and an API served by several
    processes (Serve replicas: a caller's next request may reach another one), always
    ask (`follow` False)."""

    POLL_S = 5.0           # how long the controller holds a poll when nothing changed
    CATCH_UP_S = 2.0
    RETRY_S = (0.05, 2.0)  # the poll's backoff while the controller does not answer

    def __init__(self, api: "Api", lookups: "ServerLookups", follow: bool = True):
        self.api = api
        self.lookups = lookups
        self.follows = follow and callable(getattr(api.cluster, "server_changes", None))
        self.views: dict = {}
        self.deleted: dict[str, None] = {}     # deleted servers' uuids, oldest first
        self.epoch, self.seq = "", 0
        self.live = False
        self.task: asyncio.Future | None = None
        self.marks: dict[str, tuple[str, int]] = {}    # uuid -> its change through us
        self.waiters: list[tuple[int, asyncio.Future]] = []

    def changed(self, uuid: str) -> None:
        """This process changed `uuid` (its call has answered): reads of it wait for
        the view to reach that change."""
        if self.follows:
            self.marks[uuid] = self.api.cluster.change_mark()

    async def get(self, uuid: str):
        """The server's view, or None if the cluster has no instance of that uuid."""
        if not self.follows:
            return await self.lookups.get(uuid)
        if self.task is None:
            self.task = asyncio.ensure_future(self._follow())
        mark = self.marks.get(uuid)
        if mark is not None:
            if not await self._reach(mark):
                return await self.lookups.get(uuid)
            if self.marks.get(uuid) == mark:
                del self.marks[uuid]
        view = self.views.get(uuid) if self.live else None
        return view if view is not None else await self.lookups.get(uuid)

    async def _reach(self, mark: tuple[str, int]) -> bool:
        epoch, seq = mark
        if self.live and epoch == self.epoch and self.seq < seq:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append((seq, waiter))
            try:
                await asyncio.wait_for(waiter, self.CATCH_UP_S)
            except asyncio.TimeoutError:
                return False
        return self.live and epoch == self.epoch and self.seq >= seq

    async def _follow(self) -> None:
        delay = self.RETRY_S[0]
        while True:
            try:
                epoch, seq, views = await self.api.call(
                    self.api.cluster.server_changes, self.epoch, self.seq, self.POLL_S)
            except Exception:      # the controller restarting: lookups go to it
                self.live = False
                self._wake()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_S[1])
                continue
            delay = self.RETRY_S[0]
            if epoch != self.epoch:
                self.views = {}    # a restarted controller: every server anew
                self.deleted = {}
            for view in views:
                self._keep(view)
            self.epoch, self.seq, self.live = epoch, seq, True
            self._wake()

    def _keep(self, view) -> None:
        """A server's newest view; deleted ones as many as the controller keeps."""
        uuid = view.instance.uuid
        self.views[uuid] = view
        if view.instance.deleted:
            self.deleted.pop(uuid, None)
            self.deleted[uuid] = None
            while len(self.deleted) > self.api.cfg.options.retain_deleted:
                old = next(iter(self.deleted))
                del self.deleted[old]
                self.views.pop(old, None)

    def _wake(self) -> None:
        waiting = []
        for seq, waiter in self.waiters:
            if waiter.done():
                continue
            if self.live and seq > self.seq:
                waiting.append((seq, waiter))
            else:
                waiter.set_result(None)
        self.waiters = waiting


class Api:
    def __init__(self, cfg, cluster, tokens: auth.Tokens | None = None,
                 public_url: str = "", threads: int = 64):
        self.cfg = cfg
        self.cluster = cluster
        self.tokens = tokens
        self.public_url = public_url.rstrip("/")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="vmresize-api")
        self.started_at = time.time()
        self.images = {views.image_id(i): i for i in cfg.images}
        # Flavors and host liveness change rarely and every server view needs them:
        # kept for CACHE_S (flavors are fetched again when a lookup misses, and at
        # once after this process changed them).
        self._flavors = Refreshed(lambda: self.call(self.cluster.flavors), CACHE_S)
        self._hosts_up = Refreshed(self._fetch_hosts_up, CACHE_S)
        self.lookups = ServerLookups(self)
        self.views = ServerViews(self, self.lookups, follow=cfg.api.runtime != "serve"
                                 or cfg.api.replicas == 1)
        # Requests served and the cluster calls they made, by name (`stats`).
        self.requests = 0
        self.cluster_calls: Counter[str] = Counter()

    def stats(self) -> dict:
        """Requests served so far and the cluster calls (each a round trip to the
        controller) made for them, by `Cluster` method."""
        return {"requests": self.requests, "cluster_calls": dict(self.cluster_calls)}

    # ------------------------------------------------------------------ plumbing

    async def call(self, fn, *args, **kw):
        """Run a blocking `Cluster` call off the event loop; refusals become ApiError."""
        from vmresize.actors.controller import OperationError
        loop = asyncio.get_running_loop()
        self.cluster_calls[fn.__name__] += 1
        try:
            return await loop.run_in_executor(self.pool, partial(fn, *args, **kw))
        except OperationError as exc:
            raise refusal(str(exc)) from None

    def endpoint(self, handler, compute: bool = True, authenticated: bool = True):
        async def run(request: Request) -> Response:
            self.requests += 1
            request_id = f"req-{uuidlib.uuid4()}"
            version = microversions.MIN_VERSION
            try:
                if compute:
                    version = microversions.requested(request.headers)
                caller = self.authenticate(request) if authenticated else None
                ctx = Ctx(self, request, request_id, version, caller)
                response = await handler(request, ctx)
            except ApiError as exc:
                response = _json(exc.body(), exc.code)
            except VersionError as exc:
                err = ApiError(exc.code, str(exc))
                response = _json(err.body(), err.code)
            except Exception as exc:       # a fault of ours: Nova's 500 shape, logged
                import logging
                logging.getLogger("vmresize.api").exception("%s %s failed", request.method,
                                                            request.url.path)
                err = ApiError(500, f"Unexpected error ({type(exc).__name__}): {exc}")
                response = _json(err.body(), err.code)
            response.headers["x-openstack-request-id"] = request_id
            response.headers["x-compute-request-id"] = request_id
            if compute:
                response.headers.update(microversions.response_headers(version))
            return response
        return run

    def authenticate(self, request: Request) -> auth.Caller:
        if self.tokens is None:
            return auth.ANONYMOUS_ADMIN
        return self.tokens.check(request.headers.get("x-auth-token"))

    async def body(self, request: Request) -> object:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"Request is too large (over {MAX_BODY_BYTES} bytes).")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"Request is too large (over {MAX_BODY_BYTES} bytes).")
        if not raw.strip():
            return None
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise bad_request("Malformed request body") from None

    async def load_flavors(self, ctx: Ctx, fresh: bool = False) -> list:
        ctx.flavors = await self._flavors.get(fresh)
        return ctx.flavors

    async def hosts_up(self, ctx: Ctx) -> None:
        """Host liveness for `host_status` (2.16+, admin)."""
        if ctx.version < (2, 16) or not ctx.admin:
            return
        ctx.hosts_up = await self._hosts_up.get()

    async def _fetch_hosts_up(self) -> dict[str, bool]:
        return {h.name: h.up for h in await self.call(self.cluster.hosts)}

    async def server(self, ctx: Ctx, server_id: str, rule: str):
        """The server named by the path, or 404; checks the caller may `rule` it."""
        if not _is_uuid(server_id):
            raise not_found(f"Instance {server_id} could not be found.")
        view = await self.views.get(server_id)
        if view is None or view.instance.deleted:
            raise not_found(f"Instance {server_id} could not be found.")
        auth.authorize(ctx.caller, rule, view.project or ctx.default_project)
        return view

    # ------------------------------------------------------------------ versions

    async def root(self, request: Request, ctx: Ctx) -> Response:
        return _json(microversions.versions_document(ctx.root))

    async def v21(self, request: Request, ctx: Ctx) -> Response:
        return _json({"version": microversions.v21_document(ctx.root)})

    # ------------------------------------------------------------------ servers

    async def list_servers(self, request: Request, ctx: Ctx, detail: bool) -> Response:
        q = request.query_params
        auth.authorize(ctx.caller, "servers:index:read")
        deleted = _flag(q.get("deleted")) and ctx.admin
        servers = await self.call(self.cluster.servers, bool(deleted))
        all_projects = ctx.admin and (_flag(q.get("all_tenants")) or
                                      self.tokens is None)
        servers = [s for s in servers if self._listed(s, q, ctx, all_projects)]
        servers.sort(key=lambda s: (-s.created_at, s.instance.uuid))
        servers = _page(servers, q, lambda s: s.instance.uuid, "server")
        if not detail:
            return _json({"servers": [views.server_summary(s, ctx.base) for s in servers]})
        await self.load_flavors(ctx)
        await self.hosts_up(ctx)
        return _json({"servers": [views.server_doc(s, ctx, ctx.version) for s in servers]})

    def _listed(self, s, q, ctx: Ctx, all_projects: bool) -> bool:
        inst = s.instance
        if not all_projects and (s.project or ctx.default_project) != ctx.caller.project_id:
            return False
        name = q.get("name")
        if name is not None and not _name_matches(name, inst.name):
            return False
        status = q.get("status")
        if status is not None and views.status(inst, views.task_state(
                inst, s.migration)) != status.upper():
            return False
        host = q.get("host")
        if host is not None and ctx.admin and inst.host != host:
            return False
        flavor = q.get("flavor")
        if flavor is not None:
            info = ctx.flavor_info(inst.flavor.name) if ctx.flavors else None
            if info is not None and info.id != flavor:
                return False
        image = q.get("image")
        if image is not None and s.image_id != image:
            return False
        return True

    async def show_server(self, request: Request, ctx: Ctx) -> Response:
        view = await self.server(ctx, request.path_params["id"], "servers:show:read")
        await self.load_flavors(ctx)
        await self.hosts_up(ctx)
        return _json({"server": views.server_doc(view, ctx, ctx.version)})

    async def create_server(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "servers:create")
        body = await self.body(request)
        spec = _server_spec(body, ctx)
        flavor = await self._flavor_ref(ctx, spec["flavorRef"], "flavorRef")
        image_id = self._image_ref(spec.get("imageRef"))
        host = _forced_host(spec, ctx, self.cfg)
        inst = await self.call(self.cluster.boot, spec["name"], flavor.flavor.name, host,
                               request_id=ctx.request_id, project_id=ctx.caller.project_id,
                               user_id=ctx.caller.user_id, image_id=image_id)
        self.views.changed(inst.uuid)
        doc = {"id": inst.uuid, "links": views.links(ctx.base, "servers", inst.uuid),
               "OS-DCF:diskConfig": "MANUAL", "security_groups": [{"name": "default"}],
               "adminPass": secrets.token_urlsafe(9)}
        return _json({"server": doc}, 202,
                     {"Location": f"{ctx.base}/servers/{inst.uuid}"})

    async def delete_server(self, request: Request, ctx: Ctx) -> Response:
        view = await self.server(ctx, request.path_params["id"], "servers:delete")
        try:
            await self.lifecycle(ctx, "delete", view.instance.name)
        finally:
            self.views.changed(view.instance.uuid)
        return _empty(204)

    async def _flavor_ref(self, ctx: Ctx, ref, field: str):
        if isinstance(ref, int) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise bad_request(f"Invalid {field} provided.")
        ident = ref.rstrip("/").rsplit("/", 1)[-1]
        for fresh in (False, True):
            for info in await self.load_flavors(ctx, fresh):
                if not info.deleted and ident in (info.id, info.flavor.name):
                    return info
        raise bad_request(f"Flavor {ident} could not be found.")

    def _image_ref(self, ref) -> str:
        if ref in (None, ""):
            return ""
        if not isinstance(ref, str):
            raise bad_request("Invalid imageRef provided.")
        ident = ref.rstrip("/").rsplit("/", 1)[-1]
        if ident in self.images:
            return ident
        for image_id, spec in self.images.items():
            if spec.name == ident:
                return image_id
        if not _is_uuid(ident):
            raise bad_request("Invalid imageRef provided.")
        raise bad_request(f"Image {ident} could not be found.")

    # ------------------------------------------------------------------ actions

    async def server_action(self, request: Request, ctx: Ctx) -> Response:
        server_id = request.path_params["id"]
        body = await self.body(request)
        if not isinstance(body, dict) or len(body) != 1:
            raise bad_request("Malformed request body: expected one action, as "
                              "{\"<action>\": {...}}")
        (action, arg), = body.items()
        handler = ACTIONS.get(action)
        if handler is None:
            if not _is_uuid(server_id):
                raise not_found(f"Instance {server_id} could not be found.")
            raise bad_request(f"There is no such action: {action}")
        rule = "migrate" if action == "migrate" else f"servers:{action}"
        view = await self.server(ctx, server_id, rule)
        try:
            return await handler(self, ctx, view, arg)
        finally:
            self.views.changed(view.instance.uuid)

    async def lifecycle(self, ctx: Ctx, op: str, name: str, **kw):
        """stop / start / reboot / delete through `Cluster.<op>(name, ...)`."""
        fn = getattr(self.cluster, op, None)
        params = inspect.signature(fn).parameters if callable(fn) else {}
        if "name" not in params:
            raise ApiError(501, f"{op} is not available in this cluster")
        if "request_id" in params:
            kw["request_id"] = ctx.request_id
        return await self.call(fn, name, **kw)

    # ------------------------------------------------------------------ flavors

    async def list_flavors(self, request: Request, ctx: Ctx, detail: bool) -> Response:
        q = request.query_params
        flavors = [i for i in await self.load_flavors(ctx, fresh=True) if not i.deleted]
        public = q.get("is_public")
        if not ctx.admin or public is None or public.lower() not in ("none", "all"):
            want = True if public is None or not ctx.admin else _flag(public)
            flavors = [i for i in flavors if i.is_public == want]
        min_disk, min_ram = _int_param(q, "minDisk"), _int_param(q, "minRam")
        flavors = [i for i in flavors if i.flavor.root_gb >= min_disk
                   and i.flavor.memory_mb >= min_ram]
        flavors.sort(key=lambda i: i.id)
        flavors = _page(flavors, q, lambda i: i.id, "flavor")
        return _json({"flavors": [views.flavor_doc(i, ctx.base, ctx.version, detail)
                                  for i in flavors]})

    async def _flavor(self, ctx: Ctx, flavor_id: str):
        """A live flavor by id (asked afresh: a deleted one must read as gone)."""
        for info in await self.load_flavors(ctx, fresh=True):
            if info.id == flavor_id and not info.deleted:
                return info
        raise not_found(f"Flavor {flavor_id} could not be found.")

    async def show_flavor(self, request: Request, ctx: Ctx) -> Response:
        info = await self._flavor(ctx, request.path_params["id"])
        return _json({"flavor": views.flavor_doc(info, ctx.base, ctx.version)})

    async def flavor_extra_specs(self, request: Request, ctx: Ctx) -> Response:
        await self._flavor(ctx, request.path_params["id"])
        return _json({"extra_specs": {}})

    async def create_flavor(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "flavor-manage")
        spec = _flavor_spec(await self.body(request), ctx.version)
        flavor = Flavor(name=spec["name"], vcpus=spec["vcpus"], memory_mb=spec["ram"],
                        root_gb=spec["disk"], ephemeral_gb=spec["ephemeral"],
                        swap_mb=spec["swap"])
        info = await self.call(self.cluster.create_flavor, flavor, spec["id"],
                               is_public=spec["is_public"], description=spec["description"],
                               request_id=ctx.request_id)
        self._flavors.invalidate()
        return _json({"flavor": views.flavor_doc(info, ctx.base, ctx.version)})

    async def delete_flavor(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "flavor-manage")
        flavor_id = request.path_params["id"]
        await self._flavor(ctx, flavor_id)
        await self.call(self.cluster.delete_flavor, flavor_id, request_id=ctx.request_id)
        self._flavors.invalidate()
        return _empty(202)

    # ------------------------------------------------------------------ migrations

    async def list_migrations(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "os-migrations")
        q = request.query_params
        migs = await self.call(self.cluster.migrations)
        await self.load_flavors(ctx)
        numbered = list(enumerate(migs, start=1))
        numbered = [(n, m) for n, m in numbered if _migration_listed(m, q)]
        numbered.sort(key=lambda nm: (-nm[1].created_at, -nm[0]))
        if ctx.version >= (2, 59):
            numbered = _page(numbered, q, lambda nm: nm[1].id, "migration")
        return _json({"migrations": [
            views.migration_doc(m, n, ctx.flavor_pk, ctx.version, ctx.base)
            for n, m in numbered]})

    async def server_migrations(self, request: Request, ctx: Ctx) -> Response:
        view = await self.server(ctx, request.path_params["id"], "server-migrations")
        migs = await self.call(self.cluster.migrations)
        await self.load_flavors(ctx)
        docs = []
        for n, m in enumerate(migs, start=1):
            if m.instance_uuid == view.instance.uuid and not m.final:
                docs.append(views.server_migration_doc(m, n, ctx.version))
        return _json({"migrations": docs})

    # ------------------------------------------------------------------ instance actions

    async def _actions(self, ctx: Ctx, view):
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, actionlog.instance_actions, self.cfg.state_dir, view.instance.uuid)

    async def list_actions(self, request: Request, ctx: Ctx) -> Response:
        view = await self.server(ctx, request.path_params["id"],
                                 "os-instance-actions:list:read")
        acts = await self._actions(ctx, view)
        return _json({"instanceActions": [_action_doc(a, view, ctx, events=False)
                                          for a in reversed(acts)]})

    async def show_action(self, request: Request, ctx: Ctx) -> Response:
        view = await self.server(ctx, request.path_params["id"],
                                 "os-instance-actions:show:read")
        rid = request.path_params["request_id"]
        for a in await self._actions(ctx, view):
            if a.request_id == rid:
                return _json({"instanceAction": _action_doc(a, view, ctx, events=True)})
        raise not_found(f"Action for request_id {rid} on instance "
                        f"{view.instance.uuid} not found")

    # ------------------------------------------------------------------ hosts

    async def list_hypervisors(self, request: Request, ctx: Ctx, detail: bool) -> Response:
        auth.authorize(ctx.caller, "hypervisors")
        hosts, running = await self._hosts()
        docs = [views.hypervisor_doc(h, n, running.get(h.name, 0), ctx.version, detail)
                for n, h in enumerate(hosts, start=1)]
        pattern = request.query_params.get("hypervisor_hostname_pattern")
        if pattern is not None:
            docs = [d for d in docs if pattern in d["hypervisor_hostname"]]
            if not docs:
                raise not_found(f"No hypervisor matching '{pattern}' could be found.")
        return _json({"hypervisors": docs})

    async def show_hypervisor(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "hypervisors")
        ident = request.path_params["id"]
        hosts, running = await self._hosts()
        for n, h in enumerate(hosts, start=1):
            doc = views.hypervisor_doc(h, n, running.get(h.name, 0), ctx.version, True)
            if str(doc["id"]) == ident:
                return _json({"hypervisor": doc})
        raise not_found(f"Hypervisor with ID {ident} could not be found.")

    async def _hosts(self):
        hosts = await self.call(self.cluster.hosts)
        running: dict[str, int] = {}
        for inst in await self.call(self.cluster.instances):
            running[inst.host] = running.get(inst.host, 0) + 1
        return hosts, running

    async def list_services(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "services")
        q = request.query_params
        hosts = await self.call(self.cluster.hosts)
        now = time.time()
        docs = [views.service_doc("nova-scheduler", "controller", True, 1, ctx.version, now),
                views.service_doc("nova-conductor", "controller", True, 2, ctx.version, now)]
        docs += [views.service_doc("nova-compute", h.name, h.up, n + 3, ctx.version, now)
                 for n, h in enumerate(hosts)]
        docs = [d for d in docs if q.get("binary") in (None, d["binary"])
                and q.get("host") in (None, d["host"])]
        return _json({"services": docs})

    async def list_aggregates(self, request: Request, ctx: Ctx) -> Response:
        auth.authorize(ctx.caller, "aggregates")
        return _json({"aggregates": []})

    async def limits(self, request: Request, ctx: Ctx) -> Response:
        hosts = await self.call(self.cluster.hosts)
        mine = [s for s in await self.call(self.cluster.servers)
                if (s.project or ctx.default_project) == ctx.caller.project_id]
        absolute = {
            "maxTotalCores": sum(h.limit.vcpus for h in hosts),
            "maxTotalRAMSize": sum(h.limit.memory_mb for h in hosts),
            "maxTotalInstances": 10_000, "maxServerMeta": 128, "maxImageMeta": 128,
            "maxTotalKeypairs": 100, "maxServerGroups": 10, "maxServerGroupMembers": 10,
            "totalCoresUsed": sum(s.instance.flavor.vcpus for s in mine),
            "totalRAMUsed": sum(s.instance.flavor.memory_mb for s in mine),
            "totalInstancesUsed": len(mine), "totalServerGroupsUsed": 0}
        if ctx.version < (2, 57):
            absolute.update({"maxPersonality": 5, "maxPersonalitySize": 10240})
        if ctx.version < (2, 36):
            absolute.update({"maxSecurityGroupRules": -1, "maxSecurityGroups": -1,
                             "maxTotalFloatingIps": -1, "totalFloatingIpsUsed": 0,
                             "totalSecurityGroupsUsed": 0})
        return _json({"limits": {"rate": [], "absolute": absolute}})

    # ------------------------------------------------------------------ images

    async def list_images(self, request: Request, ctx: Ctx) -> Response:
        q = request.query_params
        images = list(self.images.values())
        name = q.get("name")
        if name is not None:
            images = [i for i in images if i.name == name]
        ident = q.get("id")
        if ident is not None:
            wanted = set(ident[3:].split(",")) if ident.startswith("in:") else {ident}
            images = [i for i in images if views.image_id(i) in wanted]
        return _json({"images": [views.glance_image(i, self.started_at) for i in images],
                      "schema": "/v2/schemas/images", "first": "/v2/images"})

    async def show_image(self, request: Request, ctx: Ctx) -> Response:
        spec = self.images.get(request.path_params["id"])
        if spec is None:
            raise not_found(f"Image {request.path_params['id']} could not be found.")
        return _json(views.glance_image(spec, self.started_at))

    # ------------------------------------------------------------------ identity

    async def issue_token(self, request: Request, ctx: Ctx) -> Response:
        if self.tokens is None:
            raise not_found("The identity service is off (api.auth: none).")
        name, password, project = auth.parse_password_auth(await self.body(request))
        caller = self.tokens.issue(name, password, project)
        body = auth.token_body(caller, views.iso_micro(time.time()) + "Z",
                               views.iso_micro(caller.expires_at) + "Z",
                               auth.catalog(ctx.root))
        return _json(body, 201, {"X-Subject-Token": self.tokens.encode(caller)})

    async def identity_versions(self, request: Request, ctx: Ctx) -> Response:
        return _json(auth.identity_versions(ctx.root), 300)

    async def identity_v3(self, request: Request, ctx: Ctx) -> Response:
        return _json({"version": auth.identity_version(ctx.root)})


# --------------------------------------------------------------------------- actions

def _state_error(view, action: str, ctx: Ctx) -> ApiError:
    inst = view.instance
    task = views.task_state(inst, view.migration)
    what = f"task_state {task}" if task else f"vm_state {inst.vm_state}"
    return conflict(f"Cannot '{action}' instance {inst.uuid} while it is in {what}")


def _need_state(view, action: str, ctx: Ctx, vm_states: tuple[str, ...]) -> None:
    inst = view.instance
    if views.task_state(inst, view.migration) is not None or inst.vm_state not in vm_states:
        raise _state_error(view, action, ctx)


def _no_body(arg, action: str) -> None:
    if arg not in (None, {}):
        raise bad_request(f"Invalid input for field/attribute {action}. Value: {arg}. "
                          f"expected null or {{}}")


async def _resize(api: Api, ctx: Ctx, view, arg) -> Response:
    if not isinstance(arg, dict) or "flavorRef" not in arg:
        raise bad_request("Invalid input for field/attribute resize: 'flavorRef' is a "
                          "required property")
    extra = set(arg) - {"flavorRef", "OS-DCF:diskConfig"}
    if extra:
        raise unexpected_properties(extra)
    info = await api._flavor_ref(ctx, arg["flavorRef"], "flavorRef")
    _need_state(view, "resize", ctx, ("active", "stopped"))
    if info.flavor == view.instance.flavor:
        raise bad_request("When resizing, instances must change flavor!")
    await api.call(api.cluster.resize, view.instance.name, info.flavor.name,
                   request_id=ctx.request_id)
    return _empty(202)


async def _migrate(api: Api, ctx: Ctx, view, arg) -> Response:
    host = None
    if isinstance(arg, dict) and arg:
        if ctx.version < (2, 56) or set(arg) - {"host"}:
            raise unexpected_properties(arg)
        host = arg["host"]
        if host is not None and (not isinstance(host, str) or not host):
            raise bad_request("Invalid input for field/attribute host: expected a "
                              "host name")
        if host is not None and host not in {h.name for h in api.cfg.hosts}:
            raise bad_request(f"Compute host {host} could not be found.")
    elif arg not in (None, {}):
        raise bad_request("Invalid input for field/attribute migrate.")
    _need_state(view, "migrate", ctx, ("active", "stopped"))
    if host == view.instance.host:
        raise bad_request(f"Unable to migrate instance ({view.instance.uuid}) to current "
                          f"host ({host}).")
    await api.call(api.cluster.migrate, view.instance.name, host,
                   request_id=ctx.request_id)
    return _empty(202)


async def _confirm(api: Api, ctx: Ctx, view, arg) -> Response:
    _no_body(arg, "confirmResize")
    _need_state(view, "confirmResize", ctx, ("resized",))
    await api.call(api.cluster.confirm, view.instance.name, request_id=ctx.request_id)
    return _empty(204)


async def _revert(api: Api, ctx: Ctx, view, arg) -> Response:
    _no_body(arg, "revertResize")
    _need_state(view, "revertResize", ctx, ("resized",))
    await api.call(api.cluster.revert, view.instance.name, request_id=ctx.request_id)
    return _empty(202)


async def _stop(api: Api, ctx: Ctx, view, arg) -> Response:
    _no_body(arg, "os-stop")
    _need_state(view, "stop", ctx, ("active",))
    await api.lifecycle(ctx, "stop", view.instance.name)
    return _empty(202)


async def _start(api: Api, ctx: Ctx, view, arg) -> Response:
    _no_body(arg, "os-start")
    _need_state(view, "start", ctx, ("stopped",))
    await api.lifecycle(ctx, "start", view.instance.name)
    return _empty(202)


async def _reboot(api: Api, ctx: Ctx, view, arg) -> Response:
    kind = arg.get("type") if isinstance(arg, dict) else None
    if not isinstance(kind, str) or kind.upper() not in ("SOFT", "HARD"):
        raise bad_request("Invalid input for field/attribute reboot.type: expected "
                          "'SOFT' or 'HARD'")
    _need_state(view, "reboot", ctx, ("active", "stopped") if kind.upper() == "HARD"
                else ("active",))
    await api.lifecycle(ctx, "reboot", view.instance.name, hard=kind.upper() == "HARD")
    return _empty(202)


ACTIONS = {"resize": _resize, "migrate": _migrate, "confirmResize": _confirm,
           "revertResize": _revert, "os-stop": _stop, "os-start": _start,
           "reboot": _reboot}


# --------------------------------------------------------------------------- bodies

SERVER_FIELDS = frozenset({
    "name", "flavorRef", "imageRef", "networks", "min_count", "max_count",
    "availability_zone", "block_device_mapping_v2", "block_device_mapping", "metadata",
    "key_name", "security_groups", "user_data", "config_drive", "OS-DCF:diskConfig",
    "accessIPv4", "accessIPv6", "adminPass", "description", "tags", "host",
    "hypervisor_hostname", "hostname", "return_reservation_id", "personality",
    "trusted_image_certificates"})


def _required_object(body, key: str) -> dict:
    """`body[key]`, an object; Nova's 400 naming `key` when it is missing or not one."""
    if not isinstance(body, dict) or not isinstance(body.get(key), dict):
        raise bad_request(f"Invalid input for field/attribute {key}: '{key}' is a "
                          f"required property")
    return body[key]


def _server_spec(body, ctx: Ctx) -> dict:
    spec = _required_object(body, "server")
    unexpected = sorted(set(spec) - SERVER_FIELDS)
    if unexpected:
        raise unexpected_properties(unexpected)
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255 \
            or name != name.strip():
        raise bad_request("Invalid input for field/attribute name: expected a string "
                          "of 1-255 characters without leading or trailing spaces")
    if "flavorRef" not in spec:
        raise bad_request("Invalid input for field/attribute server: 'flavorRef' is a "
                          "required property")
    for count in ("min_count", "max_count"):
        if count in spec and spec[count] not in (1, "1"):
            raise bad_request(f"Invalid input for field/attribute {count}: only 1 "
                              f"server per request")
    if spec.get("key_name") is not None:
        raise bad_request(f"Invalid key_name provided.")
    metadata = spec.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 255
            and len(v) <= 255 for k, v in metadata.items()):
        raise bad_request("Invalid input for field/attribute metadata: expected string "
                          "keys and values of at most 255 characters")
    for field, pattern in (("accessIPv4", _IPV4), ("accessIPv6", _IPV6)):
        value = spec.get(field)
        if value not in (None, "") and (not isinstance(value, str)
                                        or not pattern.match(value)):
            raise bad_request(f"Invalid input for field/attribute {field}. Value: "
                              f"{value}. is not a '{field[-4:].lower()}' address")
    return spec


_IPV4 = re.compile(r"^(\d{1,3}\.){3}\d{1,3}$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")


def _forced_host(spec: dict, ctx: Ctx, cfg) -> str | None:
    host = None
    zone = spec.get("availability_zone")
    if zone not in (None, ""):
        if not isinstance(zone, str) or zone.split(":")[0] != views.ZONE:
            raise bad_request(f"The requested availability zone is not available")
        host = zone.split(":")[1] if ":" in zone else None
    host = spec.get("host") or host
    if host:
        if not ctx.admin:
            raise ApiError(403, "Policy doesn't allow compute:servers:create:"
                                "forced_host to be performed.")
        if host not in {h.name for h in cfg.hosts}:
            raise bad_request(f"Compute host {host} could not be found.")
    return host or None


def _int_field(spec: dict, field: str, minimum: int, default: int | None = None) -> int:
    value = spec.get(field, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum \
            or value > 2 ** 31 - 1:
        raise bad_request(f"Invalid input for field/attribute {field}. Value: {value!r}. "
                          f"expected an integer >= {minimum}")
    return value


FLAVOR_FIELDS = frozenset({"name", "id", "ram", "vcpus", "disk", "swap", "rxtx_factor",
                           "OS-FLV-EXT-DATA:ephemeral", "os-flavor-access:is_public",
                           "description"})


def _flavor_spec(body, v: Version) -> dict:
    spec = _required_object(body, "flavor")
    unexpected = sorted(set(spec) - FLAVOR_FIELDS)
    if unexpected or ("description" in spec and v < (2, 55)):
        raise unexpected_properties(unexpected or ["description"])
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise bad_request("Invalid input for field/attribute name: expected a string "
                          "of 1-255 characters")
    ident = spec.get("id")
    if ident is not None and (not isinstance(ident, str) or not re.match(
            r"^(?! )[a-zA-Z0-9. _-]{1,255}(?<! )$", ident)):
        raise bad_request(f"Invalid input for field/attribute id. Value: {ident!r}.")
    public = spec.get("os-flavor-access:is_public", True)
    if not isinstance(public, bool):
        raise bad_request("Invalid input for field/attribute "
                          "os-flavor-access:is_public: expected a boolean")
    description = spec.get("description") or ""
    if not isinstance(description, str) or len(description) > 65535:
        raise bad_request("Invalid input for field/attribute description")
    return {"name": name.strip(), "id": ident, "ram": _int_field(spec, "ram", 1),
            "vcpus": _int_field(spec, "vcpus", 1), "disk": _int_field(spec, "disk", 0),
            "ephemeral": _int_field(spec, "OS-FLV-EXT-DATA:ephemeral", 0, 0),
            "swap": _int_field(spec, "swap", 0, 0) if spec.get("swap") != "" else 0,
            "is_public": public, "description": description}


# --------------------------------------------------------------------------- helpers

def _name_matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return pattern in name


def _int_param(q, field: str) -> int:
    value = q.get(field)
    if value is None:
        return 0
    if not value.isdigit():
        raise bad_request(f"Invalid {field} value: {value}")
    return int(value)


def _page(items: list, q, key, kind: str) -> list:
    marker = q.get("marker")
    if marker is not None:
        keys = [key(i) for i in items]
        if marker not in keys:
            raise bad_request(f"marker [{marker}] not found")
        items = items[keys.index(marker) + 1:]
    limit = q.get("limit")
    if limit is not None:
        if not limit.isdigit():
            raise bad_request(f"Invalid input for query parameters limit. Value: {limit}.")
        items = items[:int(limit)]
    return items


def _migration_listed(m, q) -> bool:
    for field in ("instance_uuid", "status", "migration_type", "source_compute"):
        value = q.get(field)
        if value is not None and getattr(m, field) != value:
            return False
    host = q.get("host")
    if host is not None and host not in (m.source_compute, m.dest_compute):
        return False
    return True


def _action_doc(a, view, ctx: Ctx, events: bool) -> dict:
    project = view.project or ctx.default_project
    doc = {"action": a.action, "instance_uuid": a.instance_uuid,
           "request_id": a.request_id, "user_id": view.user or ctx.default_user,
           "project_id": project, "start_time": views.iso_micro(a.start_time),
           "message": "Error" if a.ok is False else None}
    if ctx.version >= (2, 58):
        doc["updated_at"] = views.iso_micro(a.finish_time or a.start_time)
    if not events:
        return doc
    steps = []
    for s in a.steps:
        step = {"event": s.event, "start_time": views.iso_micro(s.start_time),
                "finish_time": views.iso_micro(s.finish_time), "result": s.result}
        if ctx.admin:
            step["traceback"] = s.details or None
        if ctx.version >= (2, 62):
            step["hostId"] = views.host_id(project, s.host)
            if ctx.admin:
                step["host"] = s.host
        if ctx.version >= (2, 84):
            step["details"] = (s.details or None) if ctx.admin else None
        steps.append(step)
    if not steps and a.ok is False:
        steps.append({"event": "conductor_migrate_server", "result": "Error",
                      "start_time": views.iso_micro(a.start_time),
                      "finish_time": views.iso_micro(a.finish_time),
                      **({"traceback": a.message} if ctx.admin else {})})
    doc["events"] = steps
    return doc


# --------------------------------------------------------------------------- routes

def build_app(cfg, cluster, tokens: auth.Tokens | None = None,
              public_url: str = "") -> Starlette:
    api = Api(cfg, cluster, tokens, public_url)
    e = api.endpoint
    v = "/v2.1"

    def detail(fn, flag):
        async def run(request, ctx):
            return await fn(request, ctx, flag)
        return run

    routes = [
        Route("/", e(api.root, authenticated=False)),
        Route(v, e(api.v21, authenticated=False)),
        Route(v + "/", e(api.v21, authenticated=False)),
        Route(v + "/servers", e(detail(api.list_servers, False)), methods=["GET"]),
        Route(v + "/servers", e(api.create_server), methods=["POST"]),
        Route(v + "/servers/detail", e(detail(api.list_servers, True)), methods=["GET"]),
        Route(v + "/servers/{id}", e(api.show_server), methods=["GET"]),
        Route(v + "/servers/{id}", e(api.delete_server), methods=["DELETE"]),
        Route(v + "/servers/{id}/action", e(api.server_action), methods=["POST"]),
        Route(v + "/servers/{id}/migrations", e(api.server_migrations), methods=["GET"]),
        Route(v + "/servers/{id}/os-instance-actions", e(api.list_actions),
              methods=["GET"]),
        Route(v + "/servers/{id}/os-instance-actions/{request_id}", e(api.show_action),
              methods=["GET"]),
        Route(v + "/flavors", e(detail(api.list_flavors, False)), methods=["GET"]),
        Route(v + "/flavors", e(api.create_flavor), methods=["POST"]),
        Route(v + "/flavors/detail", e(detail(api.list_flavors, True)), methods=["GET"]),
        Route(v + "/flavors/{id}", e(api.show_flavor), methods=["GET"]),
        Route(v + "/flavors/{id}", e(api.delete_flavor), methods=["DELETE"]),
        Route(v + "/flavors/{id}/os-extra_specs", e(api.flavor_extra_specs),
              methods=["GET"]),
        Route(v + "/os-migrations", e(api.list_migrations), methods=["GET"]),
        Route(v + "/os-hypervisors", e(detail(api.list_hypervisors, False)),
              methods=["GET"]),
        Route(v + "/os-hypervisors/detail", e(detail(api.list_hypervisors, True)),
              methods=["GET"]),
        Route(v + "/os-hypervisors/{id}", e(api.show_hypervisor), methods=["GET"]),
        Route(v + "/os-services", e(api.list_services), methods=["GET"]),
        Route(v + "/os-aggregates", e(api.list_aggregates), methods=["GET"]),
        Route(v + "/limits", e(api.limits), methods=["GET"]),
        Route(v + "/images", e(api.list_images, compute=False), methods=["GET"]),
        Route(v + "/v2/images", e(api.list_images, compute=False), methods=["GET"]),
        Route(v + "/images/{id}", e(api.show_image, compute=False), methods=["GET"]),
        Route(v + "/v2/images/{id}", e(api.show_image, compute=False), methods=["GET"]),
        Route("/identity", e(api.identity_versions, False, False), methods=["GET"]),
        Route("/identity/v3", e(api.identity_v3, False, False), methods=["GET"]),
        Route("/identity/v3/", e(api.identity_v3, False, False), methods=["GET"]),
        Route("/identity/v3/auth/tokens", e(api.issue_token, False, False),
              methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        404: _route_error, 405: _route_error})
    app.state.api = api
    return app


async def _route_error(request: Request, exc) -> Response:
    code = getattr(exc, "status_code", 404)
    message = "The resource could not be found." if code == 404 else \
        f"The method {request.method} is not allowed for this resource."
    response = _json(ApiError(code, message).body(), code)
    rid = f"req-{uuidlib.uuid4()}"
    response.headers["x-openstack-request-id"] = rid
    response.headers["x-compute-request-id"] = rid
    return response
