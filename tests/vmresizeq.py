"""`vmresize` commands in one process that stays connected to the cluster.

A new `vmresize show` spends seconds joining Ray before it asks anything; the compute
API's tests check the cluster's own views often. This process runs
`vmresize.cli.main.main(argv)` (what the `vmresize` script calls) once per line of
stdin, a JSON list of arguments, and answers {"code", "out", "err"}: read-only commands
only, as the Ray connection it keeps is to the cluster that was up when it started.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from vmresize.cli.main import main as vmresize


def main() -> None:
    # Answers on a private copy of stdout; anything else that writes to fd 1 (Ray's
    # own messages) goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = vmresize(json.loads(line))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        answers.write(json.dumps({"code": code, "out": out.getvalue(),
                                  "err": err.getvalue()}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
