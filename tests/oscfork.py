"""The real `openstack` CLI, started once and forked per command.

`openstack` spends about 2 s of CPU importing itself before it sends a request, and
the compute API's tests run it dozens of times. This process imports
python-openstackclient once; each command then runs in a child forked from it, through
the same `openstackclient.shell.main(argv)` that the `openstack` script calls, with its
own stdout, stderr, environment, working directory and exit code.

Protocol, one JSON object a line: in {"argv", "env", "cwd", "out", "err"} (out and
err: files the child writes), out {"pid"} when the child starts, then {"code"}.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def _preload() -> None:
    # The modules every command of the tests loads; a child then imports nothing.
    import keystoneauth1.session  # noqa: F401
    import openstack.connection  # noqa: F401
    import openstackclient.shell  # noqa: F401
    from openstackclient.compute.v2 import (flavor, hypervisor, server,  # noqa: F401
                                            server_event, server_migration, service)
    from openstackclient.image.v2 import image  # noqa: F401


def _child(req: dict) -> int:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["out"]), (2, req["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    from openstackclient import shell
    try:
        code = shell.main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0


def main() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
