"""What reads a state directory with no cluster running: the offline audit, on one
process or two. The projections it runs are pure; the files and processes are here."""
from vmresize.offline.audit import audit  # noqa: F401
