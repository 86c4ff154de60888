"""Who may call the compute API: Keystone-v3-shaped tokens and Nova's default policy.

With `api.auth: none` every caller is the admin of the `default` project. With
`api.auth: keystone`, `POST /identity/v3/auth/tokens` (password method, project
scope) checks a user of cluster.yaml against its salted scrypt hash and returns a
token: the caller, project, roles and expiry, signed with HMAC-SHA256 under a key that
`up` draws at random and hands every replica, so any replica checks any token with no
shared state. Every compute call then needs a valid `X-Auth-Token`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import uuid as uuidlib
from functools import lru_cache

import msgspec

from vmresize.api.errors import ApiError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
DOMAIN = {"id": "default", "name": "Default"}
ADMIN_ONLY = frozenset({"migrate", "os-migrations", "server-migrations", "hypervisors",
                        "services", "aggregates", "flavor-manage", "all-tenants",
                        "instance-action-events-details"})


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (base64): what `vmresize password-hash` prints."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=len(base64.b64decode(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


@lru_cache(maxsize=1024)     # every request asks for the default project's
def project_id(name: str) -> str:
    """Projects have ids as Keystone's do (hex), stable for a name."""
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vmresize-project:{name}").hex


@lru_cache(maxsize=1024)
def user_id(name: str) -> str:
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vmresize-user:{name}").hex


class Caller(msgspec.Struct, frozen=True):
    user_id: str
    user_name: str
    project_id: str
    project_name: str
    roles: tuple[str, ...]
    expires_at: float = 0.0

    @property
    def admin(self) -> bool:
        return "admin" in self.roles

    @property
    def member(self) -> bool:
        return self.admin or "member" in self.roles or "manager" in self.roles

    @property
    def reader(self) -> bool:
        return self.member or "reader" in self.roles


ANONYMOUS_ADMIN = Caller(user_id("admin"), "admin", project_id("default"), "default",
                         ("admin", "member", "reader"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Issues and checks signed tokens; `key` is shared by every replica."""

    def __init__(self, key: bytes, users, ttl_s: float, clock):
        self.key = key
        self.users = {u.name: u for u in users}
        self.ttl_s = ttl_s
        self.clock = clock

    def issue(self, name: str, password: str, project: str | None) -> Caller:
        user = self.users.get(name)
        if user is None or not check_password(password, user.password_hash):
            raise ApiError(401, "The request you have made requires authentication.")
        if project is not None and project not in (user.project, project_id(user.project)):
            raise ApiError(401, f"User {name} has no access to project {project}.")
        roles = set(user.roles)
        if "admin" in roles:
            roles |= {"member", "reader"}
        if "member" in roles:
            roles.add("reader")
        return Caller(user_id(name), name, project_id(user.project), user.project,
                      tuple(sorted(roles)), self.clock() + self.ttl_s)

    def encode(self, caller: Caller) -> str:
        payload = msgspec.json.encode(caller)
        sig = hmac.new(self.key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(sig)}"

    def check(self, token: str | None) -> Caller:
        if not token:
            raise ApiError(401, "The request you have made requires authentication.")
        try:
            payload_b64, sig_b64 = token.split(".")
            payload = _unb64(payload_b64)
            ok = hmac.compare_digest(_unb64(sig_b64),
                                     hmac.new(self.key, payload, hashlib.sha256).digest())
            caller = msgspec.json.decode(payload, type=Caller) if ok else None
        except (ValueError, msgspec.DecodeError):
            caller = None
        if caller is None or caller.expires_at < self.clock():
            raise ApiError(401, "The request you have made requires authentication.")
        return caller


def new_key() -> bytes:
    return secrets.token_bytes(32)


def authorize(caller: Caller, rule: str, owner_project: str | None = None) -> None:
    """Nova's default policy: ADMIN_ONLY rules need admin; reading a project's servers
    needs reader in it, acting on them member in it; an admin may do anything. A
    server of another project is reported missing (404), as Nova does."""
    if caller.admin:
        return
    if rule in ADMIN_ONLY:
        raise ApiError(403, f"Policy doesn't allow os_compute_api:{rule} to be "
                            f"performed.")
    if owner_project is not None and owner_project != caller.project_id:
        raise ApiError(404, "Instance could not be found.")
    if rule.endswith(":read"):
        if not caller.reader:
            raise ApiError(403, f"Policy doesn't allow os_compute_api:{rule} to be "
                                f"performed.")
    elif not caller.member:
        raise ApiError(403, f"Policy doesn't allow os_compute_api:{rule} to be performed.")


def token_body(caller: Caller, issued_at: str, expires_at: str, catalog: list) -> dict:
    return {"token": {
        "methods": ["password"], "audit_ids": [_b64(os.urandom(12))],
        "user": {"id": caller.user_id, "name": caller.user_name, "domain": DOMAIN,
                 "password_expires_at": None},
        "project": {"id": caller.project_id, "name": caller.project_name,
                    "domain": DOMAIN},
        "roles": [{"id": uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"role:{r}").hex, "name": r}
                  for r in caller.roles],
        "issued_at": issued_at, "expires_at": expires_at, "is_domain": False,
        "catalog": catalog}}


def catalog(public_url: str) -> list:
    """The compute endpoint, and the image endpoint at the same URL: the image client
    reads the v2.1 version document as a v2, and `/v2.1/images` answers in Glance
    v2's shapes."""
    def service(kind: str, name: str, url: str) -> dict:
        ident = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"service:{kind}").hex
        return {"type": kind, "name": name, "id": ident, "endpoints": [
            {"id": uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"endpoint:{kind}:{i}").hex,
             "interface": i, "region": "RegionOne", "region_id": "RegionOne", "url": url}
            for i in ("public", "internal", "admin")]}
    return [service("compute", "nova", f"{public_url}/v2.1"),
            service("image", "glance", f"{public_url}/v2.1"),
            service("identity", "keystone", f"{public_url}/identity/v3")]


def parse_password_auth(body) -> tuple[str, str, str | None]:
    """(user name, password, project name or id) from a v3 password auth request."""
    try:
        ident = body["auth"]["identity"]
        if "password" not in ident.get("methods", []):
            raise ApiError(401, "Only the password method is supported.")
        user = ident["password"]["user"]
        name, password = user["name"], user["password"]
        scope = body["auth"].get("scope") or {}
        project = scope.get("project") or {}
        proj = project.get("name") or project.get("id")
    except (KeyError, TypeError, AttributeError):
        raise ApiError(400, "Expecting auth.identity.password.user with name and "
                            "password.") from None
    if not isinstance(name, str) or not isinstance(password, str):
        raise ApiError(400, "auth.identity.password.user: name and password must be "
                            "strings.")
    return name, password, proj


def identity_versions(public_url: str) -> dict:
    return {"versions": {"values": [identity_version(public_url)]}}


def identity_version(public_url: str) -> dict:
    return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{public_url}/identity/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}]}


def dumps(doc) -> bytes:
    return json.dumps(doc).encode()
