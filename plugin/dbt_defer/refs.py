"""Each ``ref()`` of a deferred invocation (SPEC §4, §5, §6): where it reads from, the relation
dbt renders, its row limit, and its audit record.

``RefResolution`` is called from dbt's ref resolver (``patches``, through the session) for
every ref of every node compiled. Chain mode: the rules of ``resolution.resolve`` over the
chain's candidates, with the warehouse's existence checks and "did the developer change this
node?"; native mode (SPEC §2): dbt's own choice, observed. Either way the relation gets the
configured limit (``limits``) and one audit record (``audit.Recorder``). It reads the
invocation's state (chain, selection, restricted nodes, existence checker) from the session
it is handed, and imports ``config``, ``chain``, ``resolution``, ``guard``, ``limits``,
``audit`` and ``events``; never ``session`` or ``patches``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from dbt_common.events.base_types import EventLevel
from dbt_common.exceptions import CompilationError, DbtRuntimeError

from dbt_defer import audit, guard, limits
from dbt_defer.chain import Location, render
from dbt_defer.config import DEV
from dbt_defer.events import log
from dbt_defer.manifests import REFABLE
from dbt_defer.resolution import (
    DEFERRED,
    DEV_EXISTS,
    EPHEMERAL,
    MISSING,
    RESTRICTED,
    SELECTED,
    RestrictedMissing,
    Unresolved,
    resolve,
)


def _normalized(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class RefResolution:
    """The refs of one invocation; ``session``: its ``DeferSession`` (cfg, environments,
    native, current, restricted, checker, recorder, ``_selected_now()``, ``_writes``, task)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._modified_cache: Dict[Tuple[str, str], bool] = {}
        self._warned_parents: Set[str] = set()
        self._lock = threading.Lock()
        self._hook_warned: Set[Tuple[str, str]] = set()
        self._hook_lock = threading.Lock()

    def relation_for(self, resolver: Any, target: Any, original: Any, hook: bool = False) -> Any:
        """``hook``: the ref is rendered by a hook (a node's pre/post hook, on-run-start/end),
        whose statement may write to what it renders: a chain environment's relation there fails
        the node, unless the node opts in to a warning (SPEC §7)."""
        node = resolver.model
        if target.is_ephemeral_model:
            relation = original(resolver, target)
            self._record(node, target, EPHEMERAL, EPHEMERAL, str(relation), None)
            return relation
        if self.session.native:
            return self._observe(resolver, target, original, hook)

        dev_location: Location = (target.database, target.schema, target.alias or target.name)
        uid = target.unique_id
        try:
            result = resolve(
                ephemeral=False,
                selected=uid in self.session._selected_now(),
                restricted=uid in self.session.restricted,
                dev_location=dev_location,
                policy=self.session.cfg.dev_relations,
                candidates=[env.candidate(uid) for env in self.session.environments],
                exists=self.session.checker.exists,
                modified_against=lambda env: self._modified(target, env),
                builds_selection=self.session._writes,
            )
        except RestrictedMissing as exc:
            raise CompilationError(
                f"dbt-defer: {node.unique_id} refs {uid}, which is restricted (never_defer / "
                f"meta dbt_defer.defer: false) and so is read only from the current target, but "
                f"{render(exc.location)} does not exist there; build it in your target first "
                f"(e.g. dbt build -s +{node.name})"
            ) from None
        except Unresolved as exc:
            # SPEC §4.6: render what dbt would (the current target's relation), so macros that
            # handle a missing relation and compile keep working; say where we looked.
            relation = self._relation(resolver, target, None)
            if self._record(node, target, MISSING, MISSING, str(relation), None):
                log(
                    f"dbt-defer: {node.unique_id} refs {uid}, which exists nowhere; looked at: "
                    + "; ".join(exc.places)
                    + f". Rendered {relation} as dbt would. Fix: select the parent too "
                    f"(dbt build -s +{node.name}) or build {target.name} in one of these environments",
                    EventLevel.WARN,
                )
            return relation

        location = None if result.env == DEV else result.location
        if hook and location is not None:
            self._hook_reads(node, target, result.env, render(location), refuse=True)
        return self._finish_relation(resolver, node, target, result.env, result.reason, location)

    def _hook_reads(self, node: Any, target: Any, env: str, where: str, refuse: bool) -> None:
        """A hook of ``node`` renders ``target`` as environment ``env``'s relation ``where``:
        fail the node (chain mode) unless it opts in; else one warning per (node, ref)."""
        allowed = guard.hook_reads_allowed(node)
        if refuse and not allowed:
            raise DbtRuntimeError(guard.hook_refusal(node, target, env, where))  # no Jinja stack: one line
        key = (node.unique_id, target.unique_id)
        with self._hook_lock:
            if key in self._hook_warned:
                return
            self._hook_warned.add(key)
        log(guard.hook_warning(node, target, env, where, allowed), EventLevel.WARN)

    def _observe(self, resolver: Any, target: Any, original: Any, hook: bool = False) -> Any:
        """Native mode: dbt's own choice, recorded (and limited when limits are configured)."""
        node = resolver.model
        uid = target.unique_id
        own = (target.database, target.schema, target.alias or target.name)
        if uid in self.session.restricted:
            return self._finish_relation(resolver, node, target, DEV, RESTRICTED, None)
        relation = original(resolver, target)
        path = relation.path
        rendered = (path.database, path.schema, path.identifier)
        if guard.location_key(rendered, None) == guard.location_key(own, None):
            reason = SELECTED if uid in self.session._selected_now() else DEV_EXISTS
            return self._finish_relation(resolver, node, target, DEV, reason, None, relation)
        env = self.session.environments[0].name if self.session.environments else "prod"
        if hook:  # native mode (SPEC §2): dbt's outcome; said, never refused
            self._hook_reads(node, target, env, render(rendered), refuse=False)
        return self._finish_relation(resolver, node, target, env, DEFERRED, rendered, relation)

    def _relation(self, resolver: Any, target: Any, limit: Optional[int]) -> Any:
        extras: Dict[str, Any] = {"limit": limit if limit is not None else resolver.resolve_limit}
        if hasattr(resolver, "resolve_event_time_filter"):
            extras["event_time_filter"] = resolver.resolve_event_time_filter(target)
        return resolver.Relation.create_from(resolver.config, target, **extras)

    def _finish_relation(self, resolver: Any, node: Any, target: Any, env: str, reason: str,
                         location: Optional[Location], relation: Any = None) -> Any:
        """The relation to render: at ``location`` (None: the current target's), with the
        environment limit when it applies (SPEC §6); recorded in the audit."""
        native_limit = resolver.resolve_limit
        event_time_filter = (
            resolver.resolve_event_time_filter(target) if hasattr(resolver, "resolve_event_time_filter") else None
        )
        limit = None
        if env != DEV and native_limit is None and event_time_filter is None:
            limit = self._limit_for(node, target)
        if relation is None:
            relation = self._relation(resolver, target, None)
            if location is not None:
                database, schema, identifier = location
                relation = dataclasses.replace(
                    relation,
                    path=dataclasses.replace(relation.path, database=database, schema=schema, identifier=identifier),
                )
        if limit is not None:
            relation = dataclasses.replace(relation, limit=limit)
            if getattr(node, "language", "sql") != "python":
                relation = limits.limited_relation(relation)  # its alias is settled after compile
        plain = dataclasses.replace(relation, limit=None)
        if event_time_filter is not None:
            plain = dataclasses.replace(plain, event_time_filter=None)
        self._record(node, target, env, reason, str(plain), limit)
        return relation

    def _limit_for(self, node: Any, target: Any) -> Optional[int]:
        try:
            return limits.limit_for(self.session.cfg, self.session.task.config.target_name, node, target)
        except limits.LimitError as exc:
            raise CompilationError(str(exc)) from None

    def _modified(self, target: Any, env_name: str) -> bool:
        key = (target.unique_id, env_name)
        cached = self._modified_cache.get(key)
        if cached is None:
            env = next((e for e in self.session.environments if e.name == env_name), None)
            if env is None:  # native mode without a loaded state: nothing to compare with
                return False
            other = env.manifest.nodes.get(target.unique_id)
            checksum = getattr(getattr(target, "checksum", None), "checksum", "")
            cached = (
                other is None
                or other.checksum != checksum
                or _normalized(other.unrendered_config) != _normalized(getattr(target, "unrendered_config", {}))
            )
            self._modified_cache[key] = cached
        return cached

    def _record(self, node: Any, target: Any, env: str, reason: str, relation: str, limit: Optional[int],
                kind: str = audit.REF) -> bool:
        """Keep one audit record per (node, ref, kind); True when it is new. ``DEV`` is recorded
        as the running target's name (SPEC §3). A parent read from an environment whose copy
        differs from the project's own version is flagged, and said once per parent."""
        modified = reason == DEFERRED and kind != audit.CLONE and target.unique_id.split(".")[0] in REFABLE \
            and self._modified(target, env)
        record = audit.Record(
            node=node.unique_id,
            ref=target.unique_id,
            env=self.session.current if env == DEV else env,
            relation=relation,
            reason=reason,
            limit=limit,
            is_test=node.resource_type == "test",
            kind=kind,
            parent_modified=modified,
        )
        is_new = self.session.recorder.add(record)
        if is_new and env not in (DEV, EPHEMERAL):
            limited = f" (limit {limit})" if limit is not None else ""
            what = "" if kind == audit.REF else f" ({kind.replace('_', ' ')})"
            log(f"dbt-defer: {record.node} -> {record.ref}{what}: {env} {relation}{limited}", EventLevel.DEBUG)
        if modified:
            self._warn_modified_parent(node, target, env)
        return is_new

    def _warn_modified_parent(self, node: Any, target: Any, env: str) -> None:
        """SPEC §5: once per parent and run — the most common cause of "column does not exist"."""
        with self._lock:
            if target.unique_id in self._warned_parents:
                return
            self._warned_parents.add(target.unique_id)
        log(
            f"dbt-defer: {node.unique_id} reads {target.unique_id} from {env}, but your {target.name} differs "
            f"from {env}'s copy (its code or config changed), so {node.name} does not see your change; build both: "
            f"dbt build -s {target.name} {node.name} (or -s state:modified+)",
            EventLevel.WARN,
        )

    # --- deferred reads other than ref() (SPEC §5): foreign keys, functions, dbt clone ---------------

    def _chosen_env(self, unique_id: str) -> str:
        """The environment whose copy a defer_relation/defer_function is: the chain's choice;
        native mode: dbt's own --state, named as ``_observe`` names it."""
        env = self.session.chosen.get(unique_id)
        if env is None:
            env = self.session.environments[0].name if self.session.environments else "prod"
        return env

    def record_foreign_keys(self, node: Any, manifest: Any, before: Sequence[Tuple[Any, str]], render: Any) -> None:
        """The ``to: ref(...)`` targets of ``node``'s foreign-key constraints, as dbt compiled them
        (``before``: (constraint, its expression before compiling); ``render``: a relation-like
        object -> its SQL text, as dbt renders it)."""
        for constraint, expression in before:
            rendered = getattr(constraint, "to", None)
            if not isinstance(rendered, str) or rendered == expression:
                continue  # not compiled (dbt raised), or already a relation
            try:
                target = manifest.find_node_from_ref_or_source(expression)
            except Exception:  # dbt's own error is what the user sees
                continue
            if target is None or getattr(target, "resource_type", None) not in REFABLE:
                continue  # sources are never deferred
            deferred = getattr(target, "defer_relation", None)
            if deferred is not None and rendered == render(deferred):
                env, reason = self._chosen_env(target.unique_id), DEFERRED
            else:
                env, reason = self._own_read(target)
            self._record(node, target, env, reason, rendered, None, kind=audit.FOREIGN_KEY)

    def _own_read(self, target: Any) -> Tuple[str, str]:
        """(env, reason) of a read of the current target's own relation of ``target``."""
        uid = target.unique_id
        if uid in self.session.restricted:
            return DEV, RESTRICTED
        if uid in self.session._selected_now():
            return DEV, SELECTED
        location = (target.database, target.schema, getattr(target, "alias", None) or target.name)
        checker = self.session.checker
        return (DEV, DEV_EXISTS) if checker is None or checker.exists(location) else (MISSING, MISSING)

    def record_functions(self, node: Any, reads: Sequence[Tuple[Any, bool, str]]) -> None:
        """``function()`` calls of ``node`` (dbt >= 1.11): (function, read its defer_function?,
        the relation dbt rendered), as ``patches`` observed dbt's own choice."""
        for function, deferred, rendered in reads:
            if deferred:
                env, reason = self._chosen_env(function.unique_id), DEFERRED
            elif function.unique_id in self.session._selected_now():
                env, reason = DEV, SELECTED
            else:
                env, reason = DEV, DEV_EXISTS
            self._record(node, function, env, reason, rendered, None, kind=audit.FUNCTION)

    def record_clone(self, node: Any, render: Any) -> None:
        """``dbt clone``: which environment ``node`` is copied from (its defer_relation)."""
        deferred = getattr(node, "defer_relation", None)
        if deferred is not None:
            self._record(node, node, self._chosen_env(node.unique_id), DEFERRED, render(deferred), None,
                         kind=audit.CLONE)
        else:  # nothing to copy: dbt's clone materialization says so; restricted nodes never are
            env, reason = self._own_read(node)
            self._record(node, node, env, reason, render(node), None, kind=audit.CLONE)

