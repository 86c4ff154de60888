"""cluster.yaml decoded into typed, frozen structs (DESIGN §7).

`load(path)` raises `ConfigError` whose message names the field's path
(`hosts[1].memory_mb: expected int >= 1, got -5`) or, for YAML syntax, the line and
column; callers print it as one line and exit 2. Relative paths are relative to the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.yaml

from vmresize.events.schema import Flavor, Resources

Count = Annotated[int, msgspec.Meta(ge=1)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class ConfigError(ValueError):
    """A cluster.yaml that cannot be used; the message names the field."""


class Options(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`options:` of cluster.yaml; the controller and the hosts read this one struct."""
    allow_resize_to_same_host: bool = False
    use_cow_images: bool = True
    resize_confirm_window_s: Seconds = 0
    max_attempts: Count = 3
    step_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60
    cleanup_attempts: Count = 5          # tries of a cleanup step before it is abandoned
    retry_backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    retry_backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    retain_requests: Count = 2048        # ended requests the controller remembers
    retain_migrations: Count = 1024      # ended migrations its views keep
    retain_deleted: Count = 1024         # deleted instances its views keep


class Ratios(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vcpus: Ratio = 16.0
    memory_mb: Ratio = 1.5
    disk_gb: Ratio = 1.0


class Reserved(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vcpus: NonNeg = 0
    memory_mb: NonNeg = 512
    disk_gb: NonNeg = 0


class FlavorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vcpus: Count
    memory_mb: Count
    root_gb: Count
    ephemeral_gb: NonNeg = 0
    swap_mb: NonNeg = 0


class HostSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    vcpus: Count
    memory_mb: Count
    disk_gb: Count
    driver: Literal["fake", "libvirt"] = "fake"
    uri: str = ""                        # libvirt only
    instances_path: str = ""             # libvirt only
    image: str = ""                      # libvirt only: base image for new instances
    resources: dict[str, float] = {}     # Ray custom resources that pin the host actor
    overhead_memory_mb: NonNeg = 0       # per-instance driver overhead
    overhead_vcpus: NonNeg = 0

    @property
    def capacity(self) -> Resources:
        return Resources(self.vcpus, self.memory_mb, self.disk_gb)


class UserSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A user of the compute API under `auth: keystone`; `password_hash` is what
    `vmresize password-hash` prints (scrypt, salted)."""
    name: Annotated[str, msgspec.Meta(min_length=1)]
    password_hash: Annotated[str, msgspec.Meta(pattern=r"^scrypt\$")]
    roles: list[Literal["admin", "member", "reader", "manager"]] = msgspec.field(
        default_factory=lambda: ["member"])
    project: Annotated[str, msgspec.Meta(min_length=1)] = "default"


class ApiSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The Nova-compatible compute API that `up` serves (DESIGN §7, Compute API)."""
    listen: str = "127.0.0.1:8774"       # HOST:PORT; "" turns the API off
    auth: Literal["none", "keystone"] = "none"
    users: list[UserSpec] = []
    token_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3600
    replicas: Count = 1                  # Ray Serve replicas of the ingress deployment
    # "actor": uvicorn in one detached Ray actor (the default: no proxy hop, see the
    # README's figures); "serve": Ray Serve's proxy and `replicas` replicas.
    runtime: Literal["serve", "actor"] = "actor"


class ImageSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An image the compute API lists (read-only); `id` defaults to a UUID derived from
    the name, so it is the same on every start."""
    name: Annotated[str, msgspec.Meta(min_length=1)]
    id: str = ""
    disk_format: str = "qcow2"
    min_disk_gb: NonNeg = 0
    min_ram_mb: NonNeg = 0
    size_bytes: NonNeg = 0


DEFAULT_IMAGES = [ImageSpec(name="cirros")]


class ClusterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hosts: list[HostSpec]
    flavors: dict[str, FlavorSpec]
    state_dir: str = "./state"
    options: Options = Options()
    allocation_ratios: Ratios = Ratios()
    reserved: Reserved = Reserved()
    ray_namespace: str = ""              # default: derived from the state directory
    path: str = ""                       # the file this came from (set by `load`)
    api: ApiSpec = ApiSpec()
    images: list[ImageSpec] = msgspec.field(default_factory=lambda: list(DEFAULT_IMAGES))

    def flavor(self, name: str) -> Flavor:
        spec = self.flavors[name]
        return Flavor(name=name, vcpus=spec.vcpus, memory_mb=spec.memory_mb,
                      root_gb=spec.root_gb, ephemeral_gb=spec.ephemeral_gb,
                      swap_mb=spec.swap_mb)

    def all_flavors(self) -> dict[str, Flavor]:
        return {name: self.flavor(name) for name in self.flavors}

    def limit(self, host: HostSpec) -> Resources:
        """capacity x allocation ratio - reserved, what the ledger may hold."""
        r, z = self.allocation_ratios, self.reserved
        return Resources(int(host.vcpus * r.vcpus) - z.vcpus,
                         int(host.memory_mb * r.memory_mb) - z.memory_mb,
                         int(host.disk_gb * r.disk_gb) - z.disk_gb)

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


_PATH_IN_MSG = re.compile(r"^(.*) - at `\$(.*)`$")


_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\.\.\.\]")


def _value_at(raw, path: str):
    """The offending value in the untyped document, to quote it in the message."""
    node = raw
    for key, index in _STEP.findall(path):
        try:
            node = node[int(index)] if index else node[key]
        except (KeyError, IndexError, TypeError, ValueError):
            return _MISSING
    return node


_MISSING = object()


def _where(msg: str, text) -> str:
    """msgspec says 'Expected `int` >= 1 - at `$.hosts[1].memory_mb`'; we say
    'hosts[1].memory_mb: expected int >= 1, got -5'."""
    m = _PATH_IN_MSG.match(msg)
    if not m:
        return msg.replace("`", "") + " (top level)"
    what, path = m.groups()
    what = what.replace("`", "")
    got = ""
    if what.startswith("Expected") and ", got" not in what:
        value = _value_at(msgspec.yaml.decode(text), path)
        if value is not _MISSING:
            got = f", got {value!r}"
    return f"{path.lstrip('.') or '(top level)'}: {what[:1].lower()}{what[1:]}{got}"


def parse(text: str | bytes, source: str = "cluster.yaml") -> ClusterConfig:
    try:
        cfg = msgspec.yaml.decode(text, type=ClusterConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_where(str(exc), text)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: YAML syntax: {_yaml_position(exc)}") from None
    _check(cfg, source)
    return cfg


def _yaml_position(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    mark = getattr(cause, "problem_mark", None)
    problem = getattr(cause, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def _check(cfg: ClusterConfig, source: str) -> None:
    if not cfg.hosts:
        raise ConfigError(f"{source}: hosts: at least one host is needed")
    _check_unique(cfg.hosts, "hosts", source)
    for i, h in enumerate(cfg.hosts):
        if h.driver == "libvirt" and not h.instances_path:
            raise ConfigError(f"{source}: hosts[{i}].instances_path: required for the "
                              f"libvirt driver")
        limit = cfg.limit(h)
        if min(limit.vcpus, limit.memory_mb, limit.disk_gb) < 0:
            raise ConfigError(f"{source}: hosts[{i}]: reserved exceeds capacity x ratio "
                              f"({limit})")
    if not cfg.flavors:
        raise ConfigError(f"{source}: flavors: at least one flavor is needed")
    _check_api(cfg, source)


LOOPBACK = ("127.", "::1", "localhost")


def split_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port); ValueError saying why."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a port 1-65535, got {port!r}")
    return host.strip("[]"), int(port)


def _check_api(cfg: ClusterConfig, source: str) -> None:
    api = cfg.api
    if api.listen:
        try:
            host, _ = split_listen(api.listen)
        except ValueError as exc:
            raise ConfigError(f"{source}: api.listen: {exc}") from None
        if api.auth == "none" and not host.startswith(LOOPBACK):
            raise ConfigError(f"{source}: api.listen: {api.listen!r} is not a loopback "
                              f"address; with api.auth none the API listens on loopback "
                              f"only (set api.auth: keystone to serve other addresses)")
    _check_unique(api.users, "api.users", source)
    if api.auth == "keystone" and not api.users:
        raise ConfigError(f"{source}: api.users: at least one user is needed with "
                          f"api.auth keystone")
    _check_unique(cfg.images, "images", source)


def _check_unique(items, path: str, source: str) -> None:
    """Each item's `name` once in the list at `path`; else an error naming both."""
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.name in seen:
            raise ConfigError(f"{source}: {path}[{i}].name: {item.name!r} is also "
                              f"{path}[{seen[item.name]}].name; names must be unique")
        seen[item.name] = i


DEFAULT_YAML = """
state_dir: ./state
flavors:
  m1.tiny:   {vcpus: 1, memory_mb: 512,   root_gb: 1}
  m1.small:  {vcpus: 1, memory_mb: 2048,  root_gb: 20}
  m1.medium: {vcpus: 2, memory_mb: 4096,  root_gb: 40}
  m1.large:  {vcpus: 4, memory_mb: 8192,  root_gb: 80}
  m1.xlarge: {vcpus: 8, memory_mb: 16384, root_gb: 160}
hosts:
  - {name: compute-1, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: compute-2, vcpus: 8, memory_mb: 16384, disk_gb: 400}
  - {name: compute-3, vcpus: 16, memory_mb: 32768, disk_gb: 800}
"""


def default(state_dir: str | None = None) -> ClusterConfig:
    """The built-in cluster, for `demo` and `simulate` where no cluster.yaml exists."""
    cfg = parse(DEFAULT_YAML, "(built-in cluster)")
    state = Path(state_dir or cfg.state_dir).resolve()
    return msgspec.structs.replace(cfg, state_dir=str(state))


def load(path: str | Path, state_dir: str | None = None) -> ClusterConfig:
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--config: {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config: {path}: {exc.strerror}") from None
    cfg = parse(text, str(path))
    base = path.resolve().parent
    state = Path(state_dir) if state_dir else base / cfg.state_dir
    hosts = [msgspec.structs.replace(h, instances_path=str(base / h.instances_path))
             if h.instances_path else h for h in cfg.hosts]
    return msgspec.structs.replace(cfg, state_dir=str(state.resolve()), hosts=hosts,
                                   path=str(path.resolve()))


def with_api_listen(cfg: ClusterConfig, listen: str) -> ClusterConfig:
    """`up --api-listen`: the same checks as api.listen in the file."""
    out = msgspec.structs.replace(cfg, api=msgspec.structs.replace(cfg.api, listen=listen))
    try:
        _check_api(out, "--api-listen")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--api-listen: api.listen", "--api-listen"))
    return out
