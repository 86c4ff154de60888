"""Nova's and Glance's JSON shapes, built from the cluster's views (pure).

Each function takes the projections' frozen structs (`Instance`, `Migration`,
`HostInfo`, `FlavorInfo`) and the request's microversion, and returns the document
Nova returns at that microversion: fields appear at the version that introduced them
and not before, because clients (Tempest above all) validate the exact set.
"""
from __future__ import annotations

import hashlib
import uuid as uuidlib
from datetime import datetime, timezone
from functools import lru_cache

import msgspec

from vmresize.api.microversions import Version
from vmresize.projections.state import server_status

# Namespace of the stable UUIDs this API derives from names (images, hypervisors,
# services), so they are the same on every start.
NAMESPACE = uuidlib.UUID("6a0a3e36-3f52-4c0e-9d55-6f3c3b1b9f1e")

ZONE = "nova"
PROGRESS_STATUSES = frozenset({"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE",
                               "MIGRATING"})
# vmresize's migration task states in the order Nova walks them.
PENDING_TASK_STATE = "resize_prep"


def stable_uuid(kind: str, name: str) -> str:
    return str(uuidlib.uuid5(NAMESPACE, f"{kind}:{name}"))


def iso(ts: float | None) -> str | None:
    """Nova's timestamps: ISO 8601, UTC, seconds, 'Z'."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_micro(ts: float | None) -> str | None:
    """os-migrations and instance actions: microseconds, no zone (Nova's DB format)."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def links(base: str, kind: str, ident: str) -> list[dict]:
    root = base.rsplit("/v2.1", 1)[0]
    return [{"rel": "self", "href": f"{base}/{kind}/{ident}"},
            {"rel": "bookmark", "href": f"{root}/{kind}/{ident}"}]


# --------------------------------------------------------------------------- flavors

def flavor_doc(info, base: str, v: Version, detail: bool = True) -> dict:
    f = info.flavor
    doc = {"id": info.id, "name": f.name, "links": links(base, "flavors", info.id)}
    if v >= (2, 55):
        doc["description"] = info.description or None
    if not detail:
        return doc
    doc.update({"ram": f.memory_mb, "vcpus": f.vcpus, "disk": f.root_gb,
                "OS-FLV-EXT-DATA:ephemeral": f.ephemeral_gb,
                "swap": f.swap_mb if (f.swap_mb or v >= (2, 75)) else "",
                "rxtx_factor": 1.0, "os-flavor-access:is_public": info.is_public,
                "OS-FLV-DISABLED:disabled": False})
    if v >= (2, 61):
        doc["extra_specs"] = {}
    return doc


def embedded_flavor(flavor, info, base: str, v: Version) -> dict:
    """A server's flavor: a link before 2.47, the flavor itself from 2.47."""
    if v >= (2, 47):
        return {"vcpus": flavor.vcpus, "ram": flavor.memory_mb, "disk": flavor.root_gb,
                "ephemeral": flavor.ephemeral_gb, "swap": flavor.swap_mb,
                "original_name": flavor.name, "extra_specs": {}}
    if info is None:
        return {}
    return {"id": info.id, "links": [links(base, "flavors", info.id)[1]]}


# --------------------------------------------------------------------------- servers

def task_state(inst, migration) -> str | None:
    """The instance's task state, with a resize that no host has claimed yet shown as
    `resize_prep` (Nova sets it in the API before anything else happens)."""
    if inst.task_state is None and migration is not None and not inst.deleted \
            and migration.status == "pre-migrating":
        return PENDING_TASK_STATE
    return inst.task_state


def status(inst, task: str | None) -> str:
    """Nova's server status: the projection's, with the task state shown."""
    if task != inst.task_state:
        inst = msgspec.structs.replace(inst, task_state=task)
    return server_status(inst)


def server_summary(view, base: str) -> dict:
    inst = view.instance
    return {"id": inst.uuid, "name": inst.name, "links": links(base, "servers", inst.uuid)}


def server_doc(view, ctx, v: Version) -> dict:
    """One server as `GET /servers/{id}` and `/servers/detail` show it."""
    inst, base = view.instance, ctx.base
    task = task_state(inst, view.migration)
    st = status(inst, task)
    project = view.project or ctx.default_project
    doc = {
        "id": inst.uuid, "name": inst.name, "status": st,
        "tenant_id": project, "user_id": view.user or ctx.default_user,
        "metadata": {}, "hostId": host_id(project, inst.host),
        "image": ctx.image_ref(view), "flavor": embedded_flavor(
            inst.flavor, ctx.flavor_info(inst.flavor.name), base, v),
        "created": iso(view.created_at), "updated": iso(view.updated_at or view.created_at),
        "addresses": {}, "accessIPv4": "", "accessIPv6": "",
        "links": links(base, "servers", inst.uuid), "OS-DCF:diskConfig": "MANUAL",
        "key_name": None, "security_groups": [{"name": "default"}],
        "OS-SRV-USG:launched_at": iso_micro(view.created_at),
        "OS-SRV-USG:terminated_at": iso_micro(view.updated_at) if inst.deleted else None,
        "OS-EXT-AZ:availability_zone": ZONE,
        "OS-EXT-STS:task_state": task, "OS-EXT-STS:vm_state": inst.vm_state,
        "OS-EXT-STS:power_state": inst.power_state,
        "os-extended-volumes:volumes_attached": [], "config_drive": "",
    }
    if st in PROGRESS_STATUSES:
        doc["progress"] = 0
    if ctx.admin:
        doc.update({"OS-EXT-SRV-ATTR:host": inst.host,
                    "OS-EXT-SRV-ATTR:hypervisor_hostname": inst.host,
                    "OS-EXT-SRV-ATTR:instance_name": instance_name(inst.uuid)})
        if v >= (2, 3):
            doc.update({"OS-EXT-SRV-ATTR:reservation_id": "r-" + inst.uuid[:8],
                        "OS-EXT-SRV-ATTR:launch_index": 0,
                        "OS-EXT-SRV-ATTR:hostname": inst.name,
                        "OS-EXT-SRV-ATTR:kernel_id": "", "OS-EXT-SRV-ATTR:ramdisk_id": "",
                        "OS-EXT-SRV-ATTR:root_device_name": "/dev/vda",
                        "OS-EXT-SRV-ATTR:user_data": None})
    if v >= (2, 3):
        doc["os-extended-volumes:volumes_attached"] = []
    if v >= (2, 9):
        doc["locked"] = False
    if v >= (2, 16) and ctx.admin:
        doc["host_status"] = "UP" if ctx.host_up(inst.host) else "DOWN"
    if v >= (2, 19):
        doc["description"] = None
    if v >= (2, 26):
        doc["tags"] = []
    if v >= (2, 63):
        doc["trusted_image_certificates"] = None
    if v >= (2, 73):
        doc["locked_reason"] = None
    if v >= (2, 90) and not ctx.admin:
        doc["OS-EXT-SRV-ATTR:hostname"] = inst.name
    if v >= (2, 96):
        doc["pinned_availability_zone"] = None
    return doc


@lru_cache(maxsize=4096)     # one per project and host, asked for every server shown
def host_id(project: str, host: str) -> str:
    """Nova's hostId: the host hashed with the project, the same for one project."""
    return hashlib.sha224((project + host).encode()).hexdigest() if host else ""


def instance_name(uuid: str) -> str:
    return f"instance-{uuid[:8]}"


# --------------------------------------------------------------------------- migrations

def migration_doc(mig, number: int, flavor_pk, v: Version, server_base: str) -> dict:
    doc = {
        "id": number, "status": mig.status, "instance_uuid": mig.instance_uuid,
        "source_node": mig.source_compute or None,
        "source_compute": mig.source_compute or None,
        "dest_node": mig.dest_compute or None, "dest_compute": mig.dest_compute or None,
        "dest_host": None, "old_instance_type_id": flavor_pk(mig.old_flavor.name),
        "new_instance_type_id": flavor_pk(mig.new_flavor.name),
        "created_at": iso_micro(mig.created_at), "updated_at": iso_micro(mig.updated_at),
    }
    if v >= (2, 23):
        doc["migration_type"] = mig.migration_type
    return _with_ids(doc, mig, v)


def server_migration_doc(mig, number: int, v: Version) -> dict:
    """A migration as servers/{id}/migrations shows it (2.22 on)."""
    doc = {"id": number, "server_uuid": mig.instance_uuid, "status": mig.status,
           "source_compute": mig.source_compute, "source_node": mig.source_compute,
           "dest_compute": mig.dest_compute, "dest_node": mig.dest_compute,
           "dest_host": None, "created_at": iso_micro(mig.created_at),
           "updated_at": iso_micro(mig.updated_at),
           "disk_processed_bytes": 0, "disk_remaining_bytes": 0, "disk_total_bytes": 0,
           "memory_processed_bytes": 0, "memory_remaining_bytes": 0,
           "memory_total_bytes": 0}
    return _with_ids(doc, mig, v)


def _with_ids(doc: dict, mig, v: Version) -> dict:
    """The fields both migration documents gain with microversions 2.59 and 2.80."""
    if v >= (2, 59):
        doc["uuid"] = mig.id
    if v >= (2, 80):
        doc["user_id"] = None
        doc["project_id"] = None
    return doc


# --------------------------------------------------------------------------- hosts

def hypervisor_doc(host, number: int, running_vms: int, v: Version, detail: bool,
                   admin_view: bool = True) -> dict:
    ident = stable_uuid("hypervisor", host.name) if v >= (2, 53) else number
    doc = {"id": ident, "hypervisor_hostname": host.name,
           "state": "up" if host.up else "down", "status": "enabled"}
    if not detail:
        return doc
    service_id = stable_uuid("service", "nova-compute@" + host.name) if v >= (2, 53) \
        else number
    doc.update({"hypervisor_type": "QEMU" if host.driver == "libvirt" else "fake",
                "hypervisor_version": 1000, "host_ip": "127.0.0.1",
                "service": {"id": service_id, "host": host.name, "disabled_reason": None}})
    if v < (2, 88):
        free_mb = host.memory_mb - host.memory_mb_used
        free_gb = host.disk_gb - host.disk_gb_used
        doc.update({"vcpus": host.vcpus, "memory_mb": host.memory_mb,
                    "local_gb": host.disk_gb, "vcpus_used": host.vcpus_used,
                    "memory_mb_used": host.memory_mb_used,
                    "local_gb_used": host.disk_gb_used, "free_ram_mb": free_mb,
                    "free_disk_gb": free_gb, "current_workload": 0,
                    "running_vms": running_vms, "disk_available_least": free_gb,
                    "cpu_info": "{}"})
    else:
        doc["uptime"] = None
    return doc


def service_doc(binary: str, host: str, up: bool, number: int, v: Version,
                updated_at: float) -> dict:
    ident = stable_uuid("service", f"{binary}@{host}") if v >= (2, 53) else number
    doc = {"id": ident, "binary": binary, "host": host,
           "zone": ZONE if binary == "nova-compute" else "internal",
           "status": "enabled", "state": "up" if up else "down",
           "updated_at": iso_micro(updated_at), "disabled_reason": None}
    if v >= (2, 11):
        doc["forced_down"] = False
    return doc


# --------------------------------------------------------------------------- images

def image_id(spec) -> str:
    return spec.id or stable_uuid("image", spec.name)


def glance_image(spec, created_at: float) -> dict:
    """An image as the Glance v2 API shows it (what the image client reads)."""
    ident = image_id(spec)
    stamp = iso(created_at)
    return {"id": ident, "name": spec.name, "status": "active", "visibility": "public",
            "protected": False, "os_hidden": False, "disk_format": spec.disk_format,
            "container_format": "bare", "size": spec.size_bytes or None,
            "virtual_size": None, "min_disk": spec.min_disk_gb,
            "min_ram": spec.min_ram_mb, "checksum": None, "os_hash_algo": None,
            "os_hash_value": None, "owner": None, "tags": [], "created_at": stamp,
            "updated_at": stamp, "self": f"/v2/images/{ident}",
            "file": f"/v2/images/{ident}/file", "schema": "/v2/schemas/image"}
