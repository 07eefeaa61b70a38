"""The use cases: request, approve, deny, cancel, review, activate, extend, release, reap,
reconcile. The one place that changes a grant's state; every change is written with its audit
entries in one transaction, and every transition is conditional on the state it starts from, so
racing callers cannot both win. One module per concern; `Grants` is all of them together."""

from .assertions import Assertions
from .base import MAY_HOLD, REAP_BATCH, REAPER, GrantsBase
from .deciding import Deciding
from .exchange import ExchangedToken, Exchanging
from .health import Health
from .issuing import Issuing
from .reconcile import Reconciling
from .removal import Removal, Removing
from .tasks import Tasks, TaskScope, task_asked


class Grants(
    Issuing, Deciding, Reconciling, Removing, Health, Exchanging, Tasks, Assertions, GrantsBase
):
    """Every use case over one store, policy and set of backends."""


__all__ = [
    "ExchangedToken",
    "MAY_HOLD",
    "REAPER",
    "REAP_BATCH",
    "Grants",
    "Removal",
    "TaskScope",
    "task_asked",
]
