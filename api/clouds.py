"""The `clouds.yaml` entry (cloud `vmresize`) for a running compute API."""
from __future__ import annotations

from vmresize.config import ClusterConfig


def clouds_yaml(cfg: ClusterConfig, api_url: str, user: str | None = None) -> str:
    """With `auth: none`, a fixed endpoint and no identity service (the clients need
    `identity_api_version: 3` to accept that); with `auth: keystone`, the password
    method against the token endpoint beside the compute API."""
    if cfg.api.auth == "none":
        return ("clouds:\n"
                "  vmresize:\n"
                "    auth_type: none\n"
                "    auth:\n"
                f"      endpoint: {api_url}\n"
                "    identity_api_version: 3\n")
    root = api_url.rsplit("/v2.1", 1)[0]
    users = {u.name: u for u in cfg.api.users}
    chosen = users.get(user) if user else cfg.api.users[0]
    if chosen is None:
        raise KeyError(f"--user: no user {user!r} in api.users")
    return ("clouds:\n"
            "  vmresize:\n"
            "    auth_type: password\n"
            "    auth:\n"
            f"      auth_url: {root}/identity/v3\n"
            f"      username: {chosen.name}\n"
            "      password: PASSWORD      # the password whose hash is in api.users\n"
            f"      project_name: {chosen.project}\n"
            "      user_domain_name: Default\n"
            "      project_domain_name: Default\n"
            "    identity_api_version: 3\n"
            "    region_name: RegionOne\n")
