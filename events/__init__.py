"""Events: the schema of every log record, its codec and the durable log."""
from vmresize.events.schema import *  # noqa: F401,F403
from vmresize.events.schema import HOST_EVENT_TYPES, SCHEMA_VERSION  # noqa: F401
