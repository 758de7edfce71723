"""Every patch of dbt internals, in one place.

Patched (checked on dbt-core 1.8.x and 1.11.x):

1. ``dbt.task.runnable.GraphRunnableTask.run`` — with deferral on and a chain configured,
   load and validate the chain before the task starts, and write the audit when it ends.
2. ``dbt.task.runnable.GraphRunnableTask.defer_to_manifest`` — where dbt merges its single
   ``--state`` manifest: merge the chain instead, run the write guard, find restricted nodes.
3. ``dbt.context.providers.RuntimeRefResolver.create_relation`` — where dbt decides which
   relation a ``ref()`` renders to: apply the chain rules (SPEC §4), limits and audit.

With deferral off each patched function calls dbt's original at once (the plugin is inert).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from dbt.context.providers import RuntimeRefResolver
from dbt.task.runnable import GraphRunnableTask

_ORIGINALS: dict = {}
_ACTIVE: Optional[Any] = None  # the DeferSession of the running invocation
_ACTIVE_LOCK = threading.Lock()


def active_session() -> Optional[Any]:
    return _ACTIVE


def _deferring(task: Any) -> bool:
    return bool(getattr(task.args, "defer", False))


def _run(self: Any) -> Any:
    global _ACTIVE
    original: Callable = _ORIGINALS["run"]
    if not _deferring(self):
        return original(self)
    from dbt_defer.session import DeferSession, config_for_task

    cfg = config_for_task(self)
    if not cfg.configured:
        return original(self)  # nothing configured anywhere: exactly dbt's behaviour and error
    session = DeferSession.start(self, cfg)
    with _ACTIVE_LOCK:
        previous, _ACTIVE = _ACTIVE, session
    try:
        return original(self)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE = previous
        if session.merged:
            session.finish()


def _defer_to_manifest(self: Any) -> None:
    session = _ACTIVE
    if session is None or session.task is not self:
        return _ORIGINALS["defer_to_manifest"](self)
    session.merge(self)


def _create_relation(self: Any, target_model: Any) -> Any:
    original: Callable = _ORIGINALS["create_relation"]
    session = _ACTIVE
    if (
        session is None
        or not session.merged
        or getattr(self.model, "resource_type", None) == "unit_test"
    ):
        return original(self, target_model)
    return session.relation_for(self, target_model, original)


def apply() -> None:
    """Install the patches once per process."""
    if _ORIGINALS:
        return
    _ORIGINALS["run"] = GraphRunnableTask.run
    _ORIGINALS["defer_to_manifest"] = GraphRunnableTask.defer_to_manifest
    _ORIGINALS["create_relation"] = RuntimeRefResolver.create_relation
    GraphRunnableTask.run = _run
    GraphRunnableTask.defer_to_manifest = _defer_to_manifest
    RuntimeRefResolver.create_relation = _create_relation
