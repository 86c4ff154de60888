"""Host and controller: pure decisions, their shells, their Ray deployment, the Python API.

`from vmresize.actors import Cluster` gives the Python API; it is loaded on first use so
that the CLI's offline commands (`audit`, `events`) never import Ray.
"""


def __getattr__(name):
    if name in ("Cluster", "MigrationHandle"):
        from vmresize.actors import api
        return getattr(api, name)
    if name == "OperationError":
        from vmresize.actors.controller import OperationError
        return OperationError
    raise AttributeError(name)
