"""One deferred invocation: the loaded chain, the existence checks, the audit recorder.

Built from a running dbt task when deferral is on and a chain is configured; ``patches`` is
the only caller. Uses dbt's public-ish APIs (adapter, relation cache, selectors, events).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from dbt_common.events.base_types import EventLevel
from dbt_common.events.functions import fire_event
from dbt_common.events.types import Note
from dbt_common.exceptions import CompilationError, DbtRuntimeError

import dbt_defer
from dbt_defer import audit, audit_table, guard, limits
from dbt_defer.config import (
    DEV,
    LIMIT_RANGE,
    DeferConfig,
    DeferConfigError,
    EnvironmentSpec,
    load_config,
    overlay_settings,
    valid_limit,
)
from dbt_defer.manifests import REFABLE, LoadedManifest, ManifestError, unsafe_name
from dbt_defer.resolution import (
    DEFERRED,
    DEV_EXISTS,
    EPHEMERAL,
    MISSING,
    RESTRICTED,
    SELECTED,
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


def refuse_target_path_in_state(config: Any) -> None:
    """Before dbt parses (and writes manifest.json into its target path): refuse a target path
    that is, or is inside, a chain environment's local state folder (SPEC §7). Native mode
    keeps dbt's own rule (dbt allows ``--state target``)."""
    args = config.args
    try:
        cfg = load_config(
            settings_from(config), os.environ, config.project_root,
            defer_state=_str(getattr(args, "defer_state", None)), state=_str(getattr(args, "state", None)),
            favor_state=bool(getattr(args, "favor_state", False)),
        )
    except DeferConfigError:
        return  # reported by the run itself, which also replaces the previous audit
    if cfg.native:
        return
    target_path = _target_path(config)
    for spec in cfg.environments:
        if not spec.is_uri:
            try:
                guard.check_not_target_path(spec, spec.state, target_path)
            except guard.GuardError as exc:
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
        if unique_id in self.manifest.unusable:  # SPEC §7: its names never reach SQL
            return Candidate(self.name, None, f"{unique_id} has a name there that cannot be a SQL name")
        status = self.manifest.bad_status.get(unique_id)
        if status:
            return Candidate(
                self.name, None, f"{unique_id} has status '{status}' in {self.manifest.run_results_path}"
            )
        return Candidate(self.name, node.location)

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "state": self.spec.redact(self.spec.state),
            "generated_at": self.manifest.generated_at,
            "nodes": self.manifest.node_count,
        }


_DBT_CACHED: FrozenSet[str] = frozenset({"<cached by dbt>"})  # sentinel: ask dbt's live cache
_BARE_WORD = re.compile(r"^[\w$-]+$")  # what may be rendered unquoted (any script's letters)


def _unquoted_parts(adapter: Any) -> FrozenSet[str]:
    """The parts of a relation name this project renders unquoted (adapter default + quoting:)."""
    try:
        policy = dict(adapter.Relation.get_default_quote_policy().to_dict(omit_none=True))
        policy.update(getattr(adapter.config, "quoting", None) or {})
    except Exception:  # unknown: the strict rule for every part
        return frozenset({"database", "schema", "identifier"})
    return frozenset(p for p in ("database", "schema", "identifier") if not policy.get(p, False))


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
        self._unquoted: Optional[FrozenSet[str]] = None

    def _key(self, database: Optional[str], schema: Optional[str]) -> Tuple[str, str]:
        database = database or getattr(self.adapter.config.credentials, "database", "") or ""
        return (database.lower(), (schema or "").lower())

    def exists(self, location: Location) -> bool:
        database, schema, identifier = location
        if not self._safe(location):
            return False  # never pasted into a metadata query (SPEC §7); the reader said why
        key = self._key(database, schema)
        listed = self._listed.get(key)
        if listed is None:
            listed = self._settle(key, database, schema)
        if listed is _DBT_CACHED:
            return self.adapter.get_relation(database, schema, identifier) is not None
        return identifier.lower() in listed

    def _safe(self, location: Location) -> bool:
        """Every part can be a SQL name (manifests.unsafe_name); a part the adapter renders
        unquoted (quoting off) must moreover be one word (letters, digits, _, $, -)."""
        if self._unquoted is None:
            self._unquoted = _unquoted_parts(self.adapter)
        for part, value in zip(("database", "schema", "identifier"), location):
            if value is None:
                continue
            if unsafe_name(value) is not None:
                return False
            if part in self._unquoted and not _BARE_WORD.match(value):
                return False
        return True

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
            relations = self._list(schema_relation, f"list_{database}_{schema}")
            self.queries[key] = self.queries.get(key, 0) + 1
            for relation in relations:
                adapter.cache.add(relation)
            adapter.cache.update_schemas([(database, schema)])
            listed = frozenset((r.identifier or "").lower() for r in relations)
            self._listed[key] = listed
            return listed


    def _list(self, schema_relation: Any, name: str) -> List[Any]:
        """One metadata query on a connection of its own, in its own thread, as dbt's own
        cache population does: the caller's connection (dbt's "master" while deferral is
        merged, or a node's) is never renamed, released or left inside a transaction."""

        def work() -> List[Any]:
            with self.adapter.connection_named(name):
                return list(self.adapter.list_relations_without_caching(schema_relation))

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(work).result()


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
    def __init__(self, task: Any, cfg: DeferConfig, environments: List[Environment], *, plain: bool = False) -> None:
        self.task = task
        self.cfg = cfg
        self.environments = environments
        self.env_names = [e.name for e in environments]
        self.native = cfg.native  # SPEC §2: dbt decides, dbt-defer only observes (+ limits)
        self.plain = plain  # the running target builds the last environment: nothing to defer to
        self.current = str(task.config.target_name)  # records of the current target carry its name
        self.recorder = audit.Recorder()
        self.restricted: FrozenSet[str] = frozenset()
        self.refused: Dict[str, str] = {}  # unique_id -> the guard's line; these nodes fail
        self.checker: Optional[ExistenceChecker] = None
        self._selected_src: Any = None
        self._selected: FrozenSet[str] = frozenset()
        self._modified_cache: Dict[Tuple[str, str], bool] = {}
        self._writes = True  # does this command build its selected nodes? (set in merge)
        self.merged = False
        self.finished = False  # finish() ran (before dbt's closing lines, or at the very end)

    # --- set-up ------------------------------------------------------------------------

    @classmethod
    def start(cls, task: Any, cfg: DeferConfig) -> "DeferSession":
        """Load and validate the chain of this run; one clear error line on bad input.

        The chain starts after the environment the running target builds (SPEC §3). In native
        mode (SPEC §2) dbt reads and judges its own --state: a problem dbt-defer sees there is
        a warning, never an error dbt would not raise.
        """
        from dbt.artifacts.schemas.manifest import WritableManifest

        for notice in cfg.notices:
            log(notice, EventLevel.WARN)
        target_name = str(task.config.target_name)
        own, chain = cfg.chain_for_target(target_name)
        if own is not None:
            if not chain:
                log(
                    f"dbt-defer: target '{target_name}' builds environment '{own.name}', the last of the "
                    "chain: nothing to defer to, so this run is plain dbt (no deferral)"
                )
                return cls(task, cfg, [], plain=True)
            log(
                f"dbt-defer: target '{target_name}' builds environment '{own.name}': deferring to "
                + ", ".join(e.name for e in chain)
            )
        target_path = os.path.realpath(_target_path(task.config))
        project = task.config.project_name
        _note_ignored_defer_state(task, cfg)
        if not cfg.native:
            try:
                guard.check_distinct_states(chain)
            except guard.GuardError as exc:
                raise DbtRuntimeError(str(exc)) from None
        envs = []
        for spec in chain:
            try:
                manifest = guard.load_environment(
                    spec, target_path, None if cfg.native else project,
                    is_compatible=WritableManifest.is_compatible_version,
                    native=cfg.native, warn=lambda line, spec=spec: log(spec.redact(line), EventLevel.WARN),
                )
            except (ManifestError, guard.GuardError) as exc:
                if cfg.native:
                    log(f"{spec.redact(str(exc))} (dbt's own --defer reads this state; dbt-defer only audits it)",
                        EventLevel.WARN)
                    continue
                raise DbtRuntimeError(spec.redact(str(exc))) from None
            envs.append(Environment(spec, manifest))
            stale = guard.stale_warning(spec, manifest, cfg.max_age_hours)
            if stale:
                log(stale, EventLevel.WARN)
        _warn_unknown_limit_targets(task, cfg)
        return cls(task, cfg, envs)

    def merge(self, task: Any) -> None:
        """Called where dbt merges its deferral manifest (before anything executes).

        Native mode: dbt has merged its own --state already; only restricted nodes lose their
        deferral. Chain mode: every node's ``defer_relation`` (and every function's
        ``defer_function``) becomes what the chain resolves it to, so dbt's own consumers
        (clone, unit tests, foreign keys, ``graph``) read exactly what refs read (SPEC §4).
        """
        from dbt.adapters.factory import get_adapter

        manifest = task.manifest
        adapter = get_adapter(task.config)
        self.checker = ExistenceChecker(adapter)
        self.restricted = self._restricted(task)
        if not self.native:
            guard.warn_if_shim_missing(manifest, task.config.project_name, log)
        # commands that build their selection; DBT_DEFER_COMPILE_AS=build makes compile/show
        # resolve (and guard) exactly as the build of the same selection would
        self._writes = guard.task_writes(task) or self.cfg.compile_as == "build"
        suspects = {}
        for env in ([] if self.native else self.environments):  # native: dbt's own --state, dbt's rules
            why = guard.this_target_warning(env, manifest, _default_database(task.config), self.current)
            if why:
                suspects[env.name] = why
        self._guard(task, suspects)
        # nodes: the 'graph' Jinja variable is patched with them (with_defer_relation)
        if self.native:
            self._drop_deferral(manifest, self.restricted)
        elif self._assign_deferral(manifest):  # functions changed: their part of 'graph' too
            flat_graph = getattr(manifest, "flat_graph", None)
            if isinstance(flat_graph, dict) and "functions" in flat_graph:
                flat_graph["functions"] = {k: v.to_dict(omit_none=False) for k, v in manifest.functions.items()}
            elif hasattr(manifest, "build_flat_graph"):
                manifest.build_flat_graph()
        self.merged = True

    def _guard(self, task: Any, suspects: Dict[str, str]) -> None:
        """SPEC §7: selected nodes that would write a chain relation fail before executing (their
        descendants are skipped by dbt); in native mode this only warns. ``suspects``: chain
        environments whose manifests record this target's own relations: said once, at start,
        or by each refusal they cause."""
        from dbt.task.test import TestTask

        if not (self._writes or isinstance(task, TestTask)):
            self._say_suspects(suspects)
            return
        refused, shared = guard.write_clashes(
            self._selected_now(), task.manifest, self.environments,
            default_database=_default_database(task.config),
            target_schema=getattr(task.config.credentials, "schema", None),
            store_failures=bool(getattr(task.args, "store_failures", False)),
            suspects=suspects,
        )
        if not refused:
            self._say_suspects(suspects)
        for line in shared.values():
            log(line, EventLevel.INFO)
        if self.native:
            for line in refused.values():
                log(line.replace("refusing to write", "warning: this run writes", 1)
                    .replace(" Nothing was written.", " (dbt's own --defer: not refused)"), EventLevel.WARN)
            return
        self.refused = refused
        if refused:
            log(
                f"dbt-defer: {len(refused)} selected node(s) would write relations a chain environment "
                "records; they fail before executing and their descendants are skipped: "
                + ", ".join(sorted(refused)),
                EventLevel.INFO,  # each refused node's error says the rest, next to dbt's summary
            )

    def _say_suspects(self, suspects: Dict[str, str]) -> None:
        for env in self.environments:
            if env.name in suspects:
                log(f"dbt-defer: environment '{env.name}' ({guard.source_of(env.spec)}) {suspects[env.name]}",
                    EventLevel.WARN)

    def _drop_deferral(self, manifest: Any, unique_ids: FrozenSet[str]) -> bool:
        changed = False
        for uid in unique_ids:
            node = manifest.nodes.get(uid)
            if node is not None and getattr(node, "defer_relation", None) is not None:
                manifest.nodes[uid] = with_defer_relation(manifest, node, None)
                changed = True
        return changed

    def chain_choice(self, unique_id: str) -> Tuple[Optional["Environment"], List[str]]:
        """The first environment that has the node, did not fail it, and whose relation exists
        (SPEC §4.5); else None and every place looked at."""
        places = []
        for env in self.environments:
            cand = env.candidate(unique_id)
            if cand.location is None:
                places.append(f"{cand.env}: {cand.problem}")
            elif self.checker.exists(cand.location):
                return env, places
            else:
                places.append(f"{cand.env}: {render(cand.location)} does not exist in the warehouse")
        return None, places

    def _assign_deferral(self, manifest: Any) -> bool:
        """Every node's defer_relation is the chain's choice; True when functions changed."""
        from dbt.artifacts.resources import DeferRelation

        for uid, node in list(manifest.nodes.items()):
            if node.resource_type not in ("model", "seed", "snapshot") or node.is_ephemeral_model:
                continue
            defer_relation = None
            env = None if uid in self.restricted else self.chain_choice(uid)[0]
            if env is not None:
                database, schema, identifier = env.manifest.nodes[uid].location
                defer_relation = DeferRelation(
                    database=database,
                    schema=schema,
                    alias=identifier,
                    relation_name=None,
                    resource_type=node.resource_type,
                    name=node.name,
                    description=node.description,
                    compiled_code=None,
                    meta=node.meta,
                    tags=node.tags,
                    config=node.config,
                )
            if getattr(node, "defer_relation", None) != defer_relation:
                manifest.nodes[uid] = with_defer_relation(manifest, node, defer_relation)
        return self._assign_function_deferral(manifest)  # True: functions changed

    def _assign_function_deferral(self, manifest: Any) -> bool:
        """dbt >= 1.11 functions: ``defer_function`` from the first environment whose
        run_results.json records the function as built; else from the first environment that
        lists it and did not fail it. (A function is not a relation: no listing can confirm it.)"""
        functions = getattr(manifest, "functions", None)
        if not functions:
            return False
        from dbt.artifacts.resources.v1.function import DeferFunction

        changed = False
        for uid, function in list(functions.items()):
            if uid in self.restricted:
                continue
            listing = [e for e in self.environments if uid in e.manifest.functions and not e.manifest.bad_status.get(uid)]
            built = [e for e in listing if uid in e.manifest.built]
            for env in built + [e for e in listing if e not in built]:
                raw = env.manifest.functions[uid]
                fields = {k: raw.get(k) for k in (
                    "database", "schema", "alias", "arguments", "returns", "resource_type", "name",
                    "description", "compiled_code", "meta", "tags", "config")}
                for key, empty in (("meta", {}), ("tags", []), ("arguments", []), ("description", "")):
                    fields[key] = fields[key] or empty
                try:
                    defer_fn = DeferFunction.from_dict(fields)
                except Exception as exc:  # an unreadable record: that environment cannot serve it
                    log(f"dbt-defer: environment '{env.name}': cannot read function {uid} ({exc}); skipped",
                        EventLevel.WARN)
                    continue
                functions[uid] = dataclasses.replace(function, defer_function=defer_fn)
                changed = True
                break
        if changed and hasattr(manifest, "_function_lookup"):
            manifest._function_lookup = None
        return changed

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
        if self.native:
            return self._observe(resolver, target, original)

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
        return self._finish_relation(resolver, node, target, result.env, result.reason, location)

    def _observe(self, resolver: Any, target: Any, original: Any) -> Any:
        """Native mode: dbt's own choice, recorded (and limited when limits are configured)."""
        node = resolver.model
        uid = target.unique_id
        own = (target.database, target.schema, target.alias or target.name)
        if uid in self.restricted:
            return self._finish_relation(resolver, node, target, DEV, RESTRICTED, None)
        relation = original(resolver, target)
        path = relation.path
        rendered = (path.database, path.schema, path.identifier)
        if guard.location_key(rendered, None) == guard.location_key(own, None):
            reason = SELECTED if uid in self._selected_now() else DEV_EXISTS
            return self._finish_relation(resolver, node, target, DEV, reason, None, relation)
        env = self.environments[0].name if self.environments else "prod"
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
        applies, limit = self.cfg.limit_for_target(self.task.config.target_name)
        if not applies:
            return None
        if node.resource_type == "test" and not self.cfg.limit_tests:
            return None
        meta = _meta(target)
        if "limit" in meta:
            value = meta["limit"]
            if not valid_limit(value):
                raise CompilationError(f"dbt-defer: meta dbt_defer.limit of {target.unique_id} is {value!r}; {LIMIT_RANGE}")
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

    def _record(self, node: Any, target: Any, env: str, reason: str, relation: str, limit: Optional[int]) -> bool:
        """Keep one audit record per (node, ref); True when it is new. ``DEV`` is recorded as the
        running target's name (SPEC §3)."""
        record = audit.Record(
            node=node.unique_id,
            ref=target.unique_id,
            env=self.current if env == DEV else env,
            relation=relation,
            reason=reason,
            limit=limit,
            is_test=node.resource_type == "test",
        )
        is_new = self.recorder.add(record)
        if is_new and env not in (DEV, EPHEMERAL):
            limited = f" (limit {limit})" if limit is not None else ""
            log(f"dbt-defer: {record.node} -> {record.ref}: {env} {relation}{limited}", EventLevel.DEBUG)
        return is_new

    # --- the end -------------------------------------------------------------------------

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Write the audit and the end-of-run lines. The audit never changes the run's outcome:
        each failing step is one warning line and the summary line still ends the run (what
        could still escape, patches._finish catches). ``error``: what dbt raised, if it did."""
        task = self.task
        self.finished = True
        if self.plain:  # nothing to defer to: a plain dbt run, with no audit of its own
            return
        if not self.merged and error is not None:  # refused before resolving anything
            end_refused(task, error, self.environments, self.cfg)
            return
        # (not merged and no error: nothing was selected; the audit says so with no records)
        records = self.recorder.records()
        metadata = _metadata(task)
        if error is not None:  # dbt raised while refs were being resolved: the records so far
            metadata.update(status=audit.FAILED, error=audit.one_line(error))
        saved = self._savings()
        document = audit.build_document(records, metadata=metadata, environments=self._described(), saved=saved)
        _write_audit(task, document)
        try:
            # only commands that run tests report them (compile/show only compile them)
            ran_tests = _command(task) in ("test", "build")
            for test, envs in (audit.cross_environment_tests(records) if ran_tests else {}).items():
                log(
                    f"dbt-defer: {test} compares data across environments ({', '.join(envs)}); "
                    "its result may not hold in any single environment",
                    EventLevel.WARN,
                )
            if self.cfg.audit_table and records and not self.cfg.explain:
                audit_table.append(task, document, self.environments, log)
        finally:
            log(audit.summary_line(document["summary"], (r.limit for r in records), saved.measured_in))
            line = limits.failing_tests_line(records, _tests_with_failures(task))
            if line:
                log(line, EventLevel.WARN)

    def _described(self) -> List[Dict[str, Any]]:
        return [e.describe() for e in self.environments]

    def _savings(self) -> audit.Savings:
        """SPEC §5 not_built / saved_seconds; a failure is one warning, never the run's outcome."""
        try:
            # dbt sets the selection when it executes; a run that selected nothing never merged
            selected = self._selected_now() if self.merged else frozenset()
            return audit.savings(
                upstream_not_selected(self.task.manifest, selected),
                [(e.name, e.manifest.build_seconds if e.manifest.run_results_path else None)
                 for e in self.environments],
            )
        except Exception as exc:
            log(f"dbt-defer: could not count the upstream nodes not rebuilt ({audit.one_line(exc)})", EventLevel.WARN)
            return audit.Savings()


def end_refused(task: Any, error: BaseException, environments: Sequence[Environment] = (),
                cfg: Optional[DeferConfig] = None) -> None:
    """A deferred invocation stopped before resolving any ref: replace the previous invocation's
    audit file, which would look current, by one that says so (``metadata.status: refused``,
    ``metadata.error``, no resolutions). Never raises. A target path inside an environment's
    state folder (itself a reason to refuse) gets nothing new written into it: the stale file
    is removed instead."""
    try:
        target_path = _target_path(task.config)
        if cfg is not None and _inside_state_folder(target_path, cfg):
            stale = os.path.join(target_path, audit.AUDIT_FILE)
            if os.path.isfile(stale):
                os.unlink(stale)
            return
        metadata = {**_metadata(task), "status": audit.REFUSED, "error": audit.one_line(error)}
        document = audit.build_document([], metadata=metadata, environments=[e.describe() for e in environments])
    except Exception as exc:  # never hide the refusal itself
        log(f"dbt-defer: could not record the refused run in the audit ({audit.one_line(exc)})", EventLevel.WARN)
        return
    _write_audit(task, document)


def _write_audit(task: Any, document: Dict[str, Any]) -> None:
    """target/dbt_defer_audit.json; a failure is one warning line, never the run's outcome."""
    try:
        audit.write_document(document, _target_path(task.config))
    except Exception as exc:
        where = os.path.join(_target_path(task.config), audit.AUDIT_FILE)
        log(
            f"dbt-defer: could not write the audit file {where} ({audit.one_line(exc)}); the run is not "
            "affected. Make that path a writable file (remove what is there), or use another --target-path",
            EventLevel.WARN,
        )


def _inside_state_folder(target_path: str, cfg: DeferConfig) -> bool:
    target = os.path.realpath(target_path)
    for spec in cfg.environments:
        if spec.is_uri or "\0" in spec.state:
            continue
        state = os.path.realpath(spec.state)
        folder = state if os.path.isdir(state) else os.path.dirname(state)
        if target == folder or target.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False


def _metadata(task: Any) -> Dict[str, Any]:
    return {
        "dbt_defer_version": dbt_defer.__version__,
        "invocation_id": _invocation_id(),
        "generated_at": audit.now_iso(),
        "target": task.config.target_name,
        "command": _command(task),
    }


def profile_targets(config: Any, args: Any) -> Optional[List[str]]:
    """The targets (outputs) of the running profile in profiles.yml; None when unreadable."""
    try:
        from dbt.config.profile import read_profile

        folder = getattr(args, "profiles_dir", None) or getattr(args, "PROFILES_DIR", None)
        outputs = read_profile(str(folder)).get(config.profile_name, {}).get("outputs")
    except Exception:
        return None
    return [str(name) for name in outputs] if isinstance(outputs, dict) else None


def _note_ignored_defer_state(task: Any, cfg: DeferConfig) -> None:
    """--defer-state given while vars/env vars configure the chain: say it is not used."""
    given = _str(getattr(task.args, "defer_state", None))
    if given and not cfg.native and not any(spec.source.startswith("--") for spec in cfg.environments):
        log(
            f"dbt-defer: --defer-state {given} is not used: the chain comes from vars: dbt_defer / "
            f"DBT_DEFER_<NAME>_STATE ({', '.join(e.name for e in cfg.environments)}); add it there as an "
            "environment to read it, or drop the flag"
        )


def _warn_unknown_limit_targets(task: Any, cfg: DeferConfig) -> None:
    if not cfg.limits:
        return
    targets = profile_targets(task.config, task.args)
    unknown = limits.unknown_targets(cfg.limits, targets or ())
    if targets and unknown:
        log(limits.unknown_targets_warning(unknown, task.config.profile_name, targets), EventLevel.WARN)


def _tests_with_failures(task: Any) -> List[str]:
    """Data tests of this run that failed or warned (found rows)."""
    found = []
    for result in getattr(task, "node_results", None) or []:
        node = getattr(result, "node", None)
        if getattr(node, "resource_type", None) == "test" and str(getattr(result, "status", "")) in ("fail", "warn"):
            found.append(node.unique_id)
    return found


def _default_database(config: Any) -> Optional[str]:
    return getattr(getattr(config, "credentials", None), "database", None)


def with_defer_relation(manifest: Any, node: Any, defer_relation: Any) -> Any:
    """``node`` with ``defer_relation`` set, for ``manifest.nodes[uid]``; the 'graph' Jinja
    variable (``manifest.flat_graph``) gets the same ``defer_relation``.

    Linear and cheap at 20k nodes (bench/, SPEC §10): a shallow copy instead of dbt's
    ``dataclasses.replace`` (which re-runs the node's __init__, ~5x slower), and the flat graph
    patched in place instead of ``build_flat_graph`` (which serializes every node again: seconds
    at 20k). The result equals what dbt's replace + build_flat_graph would give (tests/test_merge.py).
    """
    new = copy.copy(node)
    new.defer_relation = defer_relation
    flat_graph = getattr(manifest, "flat_graph", None)
    flat = flat_graph.get("nodes", {}).get(node.unique_id) if isinstance(flat_graph, dict) else None
    if flat is not None:
        if defer_relation is None:
            flat["defer_relation"] = None
        else:  # DeferRelation.to_dict(omit_none=False), reusing the node's own serialized fields
            flat["defer_relation"] = {
                "database": defer_relation.database,
                "schema": defer_relation.schema,
                "alias": defer_relation.alias,
                "relation_name": defer_relation.relation_name,
                "resource_type": flat["resource_type"],
                "name": flat["name"],
                "description": flat["description"],
                "compiled_code": defer_relation.compiled_code,
                "meta": flat["meta"],
                "tags": flat["tags"],
                "config": flat["config"],
            }
    return new


def upstream_not_selected(manifest: Any, selected: FrozenSet[str]) -> List[str]:
    """Models, seeds and snapshots (not ephemeral) upstream of the selection that the run did
    not select: what ``dbt build -s +<selection>`` would also have built (SPEC §5). Walks
    ``depends_on`` once (through ephemeral models and tests too); linear in the graph."""
    nodes = manifest.nodes
    unit_tests = getattr(manifest, "unit_tests", None) or {}
    seen = set(selected)
    stack = list(selected)
    found = []
    while stack:
        uid = stack.pop()
        node = nodes.get(uid) or unit_tests.get(uid)
        for parent in getattr(getattr(node, "depends_on", None), "nodes", None) or ():
            if parent in seen:
                continue
            seen.add(parent)
            stack.append(parent)
            other = nodes.get(parent)
            if other is not None and other.resource_type in REFABLE and not getattr(other, "is_ephemeral_model", False):
                found.append(parent)
    return sorted(found)



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
