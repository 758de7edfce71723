"""One deferred invocation: the loaded chain, the existence checks, the audit recorder.

Built from a running dbt task when deferral is on and a chain is configured; ``patches`` is
the only caller. Uses dbt's public-ish APIs (adapter, relation cache, selectors, events).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from dbt_common.events.base_types import EventLevel
from dbt_common.events.functions import fire_event
from dbt_common.events.types import Note
from dbt_common.exceptions import CompilationError, DbtRuntimeError

import dbt_defer
from dbt_defer import audit, guard
from dbt_defer.config import DEV, DeferConfig, DeferConfigError, EnvironmentSpec, load_config, overlay_settings
from dbt_defer.manifests import LoadedManifest, ManifestError
from dbt_defer.resolution import (
    EPHEMERAL,
    Candidate,
    Location,
    RestrictedMissing,
    Unresolved,
    render,
    resolve,
)


def log(msg: str, level: EventLevel = EventLevel.INFO) -> None:
    fire_event(Note(msg=msg), level=level)


def settings_from(config: Any) -> Optional[Mapping[str, Any]]:
    """vars: dbt_defer of the running project, overlaid by --vars."""
    project = (getattr(config, "vars", None) and config.vars.to_dict()) or {}
    return overlay_settings(project, getattr(config, "cli_vars", None))


def config_for_task(task: Any) -> DeferConfig:
    args = task.args
    try:
        return load_config(
            settings_from(task.config),
            os.environ,
            task.config.project_root,
            defer_state=_str(getattr(args, "defer_state", None)),
            state=_str(getattr(args, "state", None)),
            favor_state=bool(getattr(args, "favor_state", False)),
        )
    except DeferConfigError as exc:
        raise DbtRuntimeError(str(exc)) from None


def _str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Environment:
    spec: EnvironmentSpec
    manifest: LoadedManifest

    @property
    def name(self) -> str:
        return self.spec.name

    def candidate(self, unique_id: str) -> Candidate:
        node = self.manifest.nodes.get(unique_id)
        if node is None:
            return Candidate(self.name, None, f"no enabled model/seed/snapshot {unique_id} in {self.manifest.path}")
        if node.materialized == "ephemeral":
            return Candidate(self.name, None, f"{unique_id} is ephemeral there (no relation)")
        status = self.manifest.bad_status.get(unique_id)
        if status:
            return Candidate(
                self.name, None, f"{unique_id} has status '{status}' in {self.manifest.run_results_path}"
            )
        return Candidate(self.name, node.location)

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "state": self.spec.state,
            "generated_at": self.manifest.generated_at,
            "nodes": self.manifest.node_count,
        }


_DBT_CACHED: FrozenSet[str] = frozenset({"<cached by dbt>"})  # sentinel: ask dbt's live cache


class ExistenceChecker:
    """Does a relation exist? Backed by dbt's relation cache.

    Every (database, schema) is settled once, under a per-schema lock: a schema dbt cached
    before the run is looked up in dbt's live cache; any other schema is listed once (one
    metadata query) and what was found also goes into dbt's cache. No thread ever reads a
    schema while another is still listing it.
    """

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self._lock = threading.Lock()
        self._schema_locks: Dict[Tuple[str, str], threading.Lock] = {}
        self._listed: Dict[Tuple[str, str], FrozenSet[str]] = {}
        self.queries: Dict[Tuple[str, str], int] = {}

    def _key(self, database: Optional[str], schema: Optional[str]) -> Tuple[str, str]:
        database = database or getattr(self.adapter.config.credentials, "database", "") or ""
        return (database.lower(), (schema or "").lower())

    def exists(self, location: Location) -> bool:
        database, schema, identifier = location
        key = self._key(database, schema)
        listed = self._listed.get(key)
        if listed is None:
            listed = self._settle(key, database, schema)
        if listed is _DBT_CACHED:
            return self.adapter.get_relation(database, schema, identifier) is not None
        return identifier.lower() in listed

    def _settle(self, key: Tuple[str, str], database: Optional[str], schema: Optional[str]) -> FrozenSet[str]:
        with self._lock:
            schema_lock = self._schema_locks.setdefault(key, threading.Lock())
        with schema_lock:
            listed = self._listed.get(key)
            if listed is not None:
                return listed
            adapter = self.adapter
            # Only this lock's holder adds this schema to dbt's cache, so if it is there now,
            # dbt cached it itself (complete, and kept current by dbt as the run writes).
            if (database, schema) in adapter.cache:
                self._listed[key] = _DBT_CACHED
                return _DBT_CACHED
            schema_relation = adapter.Relation.create(
                database=database, schema=schema, identifier="", quote_policy=adapter.config.quoting
            ).without_identifier()
            relations = adapter.list_relations_without_caching(schema_relation)
            self.queries[key] = self.queries.get(key, 0) + 1
            for relation in relations:
                adapter.cache.add(relation)
            adapter.cache.update_schemas([(database, schema)])
            listed = frozenset((r.identifier or "").lower() for r in relations)
            self._listed[key] = listed
            return listed


def _meta(node: Any) -> Dict[str, Any]:
    meta: Dict[str, Any] = {}
    config = getattr(node, "config", None)
    for source in (getattr(node, "meta", None), getattr(config, "meta", None)):
        if isinstance(source, dict):
            meta.update(source)
    value = meta.get("dbt_defer")
    return value if isinstance(value, dict) else {}


def _normalized(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class DeferSession:
    def __init__(self, task: Any, cfg: DeferConfig, environments: List[Environment]) -> None:
        self.task = task
        self.cfg = cfg
        self.environments = environments
        self.env_names = [e.name for e in environments]
        self.recorder = audit.Recorder()
        self.restricted: FrozenSet[str] = frozenset()
        self.checker: Optional[ExistenceChecker] = None
        self._selected_src: Any = None
        self._selected: FrozenSet[str] = frozenset()
        self._modified_cache: Dict[Tuple[str, str], bool] = {}
        self._writes = True  # does this command build its selected nodes? (set in merge)
        self.merged = False

    # --- set-up ------------------------------------------------------------------------

    @classmethod
    def start(cls, task: Any, cfg: DeferConfig) -> "DeferSession":
        """Load and validate every environment; one clear error line on bad input."""
        from dbt.artifacts.schemas.manifest import WritableManifest

        target_path = os.path.realpath(_target_path(task.config))
        project = task.config.project_name
        envs = []
        for spec in cfg.environments:
            try:
                manifest = guard.load_environment(
                    spec, target_path, project, is_compatible=WritableManifest.is_compatible_version
                )
            except (ManifestError, guard.GuardError) as exc:
                raise DbtRuntimeError(str(exc)) from None
            envs.append(Environment(spec, manifest))
            stale = guard.stale_warning(spec, manifest, cfg.max_age_hours)
            if stale:
                log(stale, EventLevel.WARN)
        return cls(task, cfg, envs)

    def merge(self, task: Any) -> None:
        """Called where dbt merges its deferral manifest (before anything executes)."""
        from dbt.adapters.factory import get_adapter
        from dbt.artifacts.resources import DeferRelation

        manifest = task.manifest
        self.checker = ExistenceChecker(get_adapter(task.config))
        self.restricted = self._restricted(task)
        guard.warn_if_shim_missing(manifest, task.config.project_name, log)
        # commands that build their selection; DBT_DEFER_COMPILE_AS=build makes compile/show
        # resolve (and guard) exactly as the build of the same selection would
        self._writes = guard.task_writes(task) or self.cfg.compile_as == "build"
        if self._writes:
            try:
                guard.check_writes(self._selected_now(), manifest, self.environments)
            except guard.GuardError as exc:
                raise DbtRuntimeError(str(exc)) from None

        # dbt's own consumers (graph.nodes[..].defer_relation, clone, state) see the first
        # environment of the chain that holds each node.
        for uid, node in list(manifest.nodes.items()):
            if node.resource_type not in ("model", "seed", "snapshot") or node.is_ephemeral_model:
                continue
            for env in self.environments:
                other = env.manifest.nodes.get(uid)
                if other is None or other.materialized == "ephemeral":
                    continue
                defer_relation = DeferRelation(
                    database=other.database,
                    schema=other.schema,
                    alias=other.identifier,
                    relation_name=None,
                    resource_type=node.resource_type,
                    name=node.name,
                    description=node.description,
                    compiled_code=None,
                    meta=node.meta,
                    tags=node.tags,
                    config=node.config,
                )
                manifest.nodes[uid] = dataclasses.replace(node, defer_relation=defer_relation)
                break
        self.merged = True

    def _restricted(self, task: Any) -> FrozenSet[str]:
        found: Set[str] = {
            uid for uid, node in task.manifest.nodes.items() if _meta(node).get("defer") is False
        }
        if self.cfg.never_defer:
            try:
                found |= guard.never_defer_nodes(
                    self.cfg.never_defer, task.graph, task.manifest, task.previous_state, log
                )
            except guard.GuardError as exc:
                raise DbtRuntimeError(str(exc)) from None
        return frozenset(found)

    def _selected_now(self) -> FrozenSet[str]:
        from dbt import selected_resources

        current = selected_resources.SELECTED_RESOURCES
        if current is not self._selected_src:
            self._selected = frozenset(current)
            self._selected_src = current
        return self._selected

    # --- resolution ----------------------------------------------------------------------

    def relation_for(self, resolver: Any, target: Any, original: Any) -> Any:
        node = resolver.model
        if target.is_ephemeral_model:
            relation = original(resolver, target)
            self._record(node, target, EPHEMERAL, EPHEMERAL, str(relation), None)
            return relation

        dev_location: Location = (target.database, target.schema, target.alias or target.name)
        uid = target.unique_id
        try:
            result = resolve(
                ephemeral=False,
                selected=uid in self._selected_now(),
                restricted=uid in self.restricted,
                dev_location=dev_location,
                policy=self.cfg.dev_relations,
                candidates=[env.candidate(uid) for env in self.environments],
                exists=self.checker.exists,
                modified_against=lambda env: self._modified(target, env),
                builds_selection=self._writes,
            )
        except RestrictedMissing as exc:
            raise CompilationError(
                f"dbt-defer: {node.unique_id} refs {uid}, which is restricted (never_defer / "
                f"meta dbt_defer.defer: false) and so is read only from the current target, but "
                f"{render(exc.location)} does not exist there; build it in your target first "
                f"(e.g. dbt build -s +{node.name})"
            ) from None
        except Unresolved as exc:
            raise CompilationError(
                f"dbt-defer: {node.unique_id} refs {uid}, which exists nowhere; looked at: "
                + "; ".join(exc.places)
                + f". Fix: select the parent too (dbt build -s +{node.name}) or build {target.name} "
                "in one of these environments"
            ) from None

        native_limit = resolver.resolve_limit
        extras: Dict[str, Any] = {"limit": native_limit}
        event_time_filter = None
        if hasattr(resolver, "resolve_event_time_filter"):
            event_time_filter = resolver.resolve_event_time_filter(target)
            extras["event_time_filter"] = event_time_filter

        limit = None
        if result.env != DEV and native_limit is None and event_time_filter is None:
            limit = self._limit_for(node, target)
            extras["limit"] = limit

        relation = resolver.Relation.create_from(resolver.config, target, **extras)
        if result.env != DEV:
            database, schema, identifier = result.location
            relation = dataclasses.replace(
                relation,
                path=dataclasses.replace(relation.path, database=database, schema=schema, identifier=identifier),
            )
        plain = dataclasses.replace(relation, limit=None)
        if event_time_filter is not None:
            plain = dataclasses.replace(plain, event_time_filter=None)
        self._record(node, target, result.env, result.reason, str(plain), limit)
        return relation

    def _limit_for(self, node: Any, target: Any) -> Optional[int]:
        applies, limit = self.cfg.limit_for_target(self.task.config.target_name)
        if not applies:
            return None
        if node.resource_type == "test" and not self.cfg.limit_tests:
            return None
        meta = _meta(target)
        if "limit" in meta:
            value = meta["limit"]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise CompilationError(
                    f"dbt-defer: meta dbt_defer.limit of {target.unique_id} is {value!r}; "
                    "use a whole number >= 0, or null for no limit"
                )
            return value
        return limit

    def _modified(self, target: Any, env_name: str) -> bool:
        key = (target.unique_id, env_name)
        cached = self._modified_cache.get(key)
        if cached is None:
            env = next(e for e in self.environments if e.name == env_name)
            other = env.manifest.nodes.get(target.unique_id)
            checksum = getattr(getattr(target, "checksum", None), "checksum", "")
            cached = (
                other is None
                or other.checksum != checksum
                or _normalized(other.unrendered_config) != _normalized(getattr(target, "unrendered_config", {}))
            )
            self._modified_cache[key] = cached
        return cached

    def _record(self, node: Any, target: Any, env: str, reason: str, relation: str, limit: Optional[int]) -> None:
        record = audit.Record(
            node=node.unique_id,
            ref=target.unique_id,
            env=env,
            relation=relation,
            reason=reason,
            limit=limit,
            is_test=node.resource_type == "test",
        )
        if self.recorder.add(record) and env not in (DEV, EPHEMERAL):
            limited = f" (limit {limit})" if limit is not None else ""
            log(f"dbt-defer: {record.node} -> {record.ref}: {env} {relation}{limited}", EventLevel.DEBUG)

    # --- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        task = self.task
        records = self.recorder.records()
        metadata = {
            "dbt_defer_version": dbt_defer.__version__,
            "invocation_id": _invocation_id(),
            "generated_at": audit.now_iso(),
            "target": task.config.target_name,
            "command": _command(task),
        }
        document = audit.build_document(
            records, metadata=metadata, environments=[e.describe() for e in self.environments]
        )
        audit.write_document(document, _target_path(task.config))
        for test, envs in audit.cross_environment_tests(records).items():
            log(
                f"dbt-defer: {test} compares data across environments ({', '.join(envs)}); "
                "its result may not hold in any single environment",
                EventLevel.WARN,
            )
        if self.cfg.audit_table and records:
            self._write_audit_table(document)
        log(audit.summary_line(document["summary"], (r.limit for r in records)))

    def _write_audit_table(self, document: Dict[str, Any]) -> None:
        """Append the records to <target schema>.dbt_defer_audit; a failure only warns (SPEC §5)."""
        from dbt.adapters.factory import get_adapter

        config = self.task.config
        where = f"{config.credentials.schema}.{audit.TABLE_NAME}"
        try:
            adapter = get_adapter(config)
            relation = adapter.Relation.create(
                database=config.credentials.database,
                schema=config.credentials.schema,
                identifier=audit.TABLE_NAME,
                type="table",
            )
            where = str(relation)
            rows = audit.table_rows(document)
            with adapter.connection_named("dbt_defer_audit"):
                try:
                    adapter.execute_macro(
                        "create_audit_table", macro_resolver=self.task.manifest, project="dbt_defer",
                        kwargs={"relation": relation},
                    )
                    for batch in audit.batches(rows):
                        adapter.execute_macro(
                            "insert_audit_records", macro_resolver=self.task.manifest, project="dbt_defer",
                            kwargs={"relation": relation, "rows": list(batch)},
                        )
                    adapter.commit_if_has_connection()
                except BaseException:
                    try:
                        adapter.connections.rollback_if_open()
                    except Exception:
                        pass
                    raise
            log(f"dbt-defer: appended {len(rows)} audit records to {where}", EventLevel.DEBUG)
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            # dbt's errors start with a header line ("Database Error", "Runtime Error in macro ...")
            cause = [line for line in lines if not _ERROR_HEADER.match(line)] or lines or [type(exc).__name__]
            log(
                f"dbt-defer: could not append the audit to {where} ({cause[0]}); the run is not affected "
                "and target/dbt_defer_audit.json holds the records. Fix or drop that relation, "
                "or set vars: dbt_defer: audit_table: false",
                EventLevel.WARN,
            )


_ERROR_HEADER = re.compile(r"^(Database|Runtime|Compilation|Internal|Dbt\w*) ?Error( in .*)?:?$")


def _target_path(config: Any) -> str:
    path = getattr(config, "project_target_path", None)
    if path:
        return path
    return os.path.join(config.project_root, config.target_path)


def _invocation_id() -> Optional[str]:
    try:
        from dbt_common.invocation import get_invocation_id

        return get_invocation_id()
    except Exception:  # pragma: no cover - older dbt-common
        return None


def _command(task: Any) -> str:
    which = getattr(task.args, "which", None)
    return str(which) if which else type(task).__name__
