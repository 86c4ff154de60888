"""Pure folds of the logs into instances, migrations and host ledgers, and the auditor
(a state directory is audited by `vmresize.offline.audit`)."""
from vmresize.projections.audit import AuditReport, Violation, check  # noqa: F401
from vmresize.projections.fold import (Projection, apply, evolve, evolve_instance,  # noqa: F401
                                       evolve_ledger, evolve_migration, fold, merge_logs)
from vmresize.projections.state import Instance, Ledger, Migration, server_status  # noqa: F401
