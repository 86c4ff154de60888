"""Running the compute API beside the cluster, and stopping it.

Two ways, the same ASGI app (`app.build_app`) in both:
- `serve`: Ray Serve, Ray's own HTTP layer: the app is the ingress deployment, its
  replicas run wherever the Ray cluster has room and call the controller actor.
- `actor`: one detached Ray actor that runs uvicorn in its own event loop on the
  address asked for: no proxy hop (see README, "Compute API", for the figures that
  chose the default).
Either way the API outlives the `vmresize up` process and `vmresize down` stops it.
The signing key for tokens is drawn here and handed to every replica.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time

import ray

from vmresize.config import ClusterConfig, split_listen

APP_NAME = "vmresize-api"
ACTOR_NAME = "vmresize-api"
# Start-up returns as soon as the API answers; this only bounds a machine so loaded
# that it does not (a new Ray worker process, its imports, its connection).
START_TIMEOUT_S = 300


class ApiStartError(Exception):
    """The API could not start (address in use, Serve failed); the message says why."""


def public_url(cfg: ClusterConfig, listen: str) -> str:
    host, port = split_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _make_app(cfg: ClusterConfig, namespace: str, key: bytes, url: str):
    from vmresize.actors.api import Cluster
    from vmresize.api import auth
    from vmresize.api.app import build_app
    cluster = Cluster.connect(cfg, ray_address="auto")
    tokens = None
    if cfg.api.auth == "keystone":
        tokens = auth.Tokens(key, cfg.api.users, cfg.api.token_ttl_s, time.time)
    return build_app(cfg, cluster, tokens, url)


def _check_free(listen: str) -> None:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ApiStartError(f"api.listen {listen}: {exc.strerror}") from None


# --------------------------------------------------------------------------- Ray Serve

def _serve_deployment(replicas: int):
    from ray import serve

    @serve.ingress()
    class ComputeApi:
        def __init__(self, cfg, namespace, key, url):
            self.args = (cfg, namespace, key, url)

        def __serve_build_asgi_app__(self):
            return _make_app(*self.args)

    return serve.deployment(ComputeApi, name="compute-api", num_replicas=replicas,
                            ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=1000)


def _quiet_serve() -> None:
    import logging
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def _start_serve(cfg, namespace, listen, key, url) -> None:
    from ray import serve
    _quiet_serve()
    host, port = split_listen(listen)
    serve.start(http_options={"host": host, "port": port}, logging_config={
        "log_level": "WARNING"})
    app = _serve_deployment(cfg.api.replicas).bind(cfg, namespace, key, url)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    _wait_serving(url, START_TIMEOUT_S)


def _stop_serve() -> None:
    from ray import serve
    _quiet_serve()
    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    except Exception:      # Serve was never started here: nothing to stop
        pass


# --------------------------------------------------------------------------- one actor

@ray.remote(num_cpus=0, max_restarts=-1)
class ApiServer:
    """uvicorn serving the app in this actor's event loop."""

    def __init__(self, cfg, namespace, listen, key, url):
        self.args = (cfg, namespace, key, url)
        self.listen = listen
        self.server = None

    async def serve(self) -> int:
        if self.server is None:
            import uvicorn
            app = await asyncio.to_thread(_make_app, *self.args)
            host, port = split_listen(self.listen)
            config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                    lifespan="off", access_log=False,
                                    timeout_keep_alive=30)
            self.server = uvicorn.Server(config)
            self.app = app
            self.task = asyncio.ensure_future(self.server.serve())
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.started:
                return os.getpid()
            if self.task.done():
                raise ApiStartError(f"api.listen {self.listen}: uvicorn exited: "
                                    f"{self.task.exception()!r}")
            await asyncio.sleep(0.05)     # uvicorn binding its socket, bounded
        raise ApiStartError(f"api.listen {self.listen}: not serving after "
                            f"{START_TIMEOUT_S} s")

    def stats(self) -> dict:
        """The app's `Api.stats` (requests, cluster calls) and this process's id."""
        return {**self.app.state.api.stats(), "pid": os.getpid()}


def _start_actor(cfg, namespace, listen, key, url, detached: bool) -> None:
    server = ApiServer.options(name=ACTOR_NAME, namespace=namespace,
                               lifetime="detached" if detached else None,
                               get_if_exists=True).remote(cfg, namespace, listen, key, url)
    try:
        ray.get(server.serve.remote(), timeout=START_TIMEOUT_S)
    except ray.exceptions.RayTaskError as exc:
        ray.kill(server, no_restart=True)
        raise ApiStartError(str(exc.cause) if exc.cause else str(exc)) from None
    except ray.exceptions.GetTimeoutError:
        ray.kill(server, no_restart=True)
        raise ApiStartError(f"api.listen {listen}: the API actor did not start within "
                            f"{START_TIMEOUT_S} s") from None
    return server


def _stop_actor(namespace: str) -> bool:
    try:
        handle = ray.get_actor(ACTOR_NAME, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


# --------------------------------------------------------------------------- both

def start(cfg: ClusterConfig, namespace: str, listen: str, runtime: str = "actor",
          detached: bool = True) -> str:
    """Serve the API on `listen` with `runtime` ("serve" or "actor"); returns the
    `/v2.1` URL. Ray must be initialised and the cluster up."""
    from vmresize.api.auth import new_key
    _check_free(listen)
    url = public_url(cfg, listen)
    key = new_key()
    if runtime == "serve":
        _start_serve(cfg, namespace, listen, key, url)
    else:
        _start_actor(cfg, namespace, listen, key, url, detached)
    return url + "/v2.1"


def stop(namespace: str, runtime: str = "actor") -> None:
    if runtime == "serve":
        _stop_serve()
    else:
        _stop_actor(namespace)


def _wait_serving(url: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2.1", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)     # waiting for Serve's proxy to come up, bounded
    raise ApiStartError(f"the compute API did not answer at {url} within {timeout_s} s")
