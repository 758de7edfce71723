"""One deferred invocation, thin: it wires the rooms below to one running dbt task.

Built from a running dbt task when deferral is on and a chain is configured; ``patches`` is
the only caller. Owns the invocation's state (the loaded chain, the selection, the restricted
and refused nodes, the audit recorder) and the order of events: start (``chain.load_chain``),
merge (``guard``, then ``chain.assign_deferral``), each ref (``resolution.resolve`` with
``warehouse.ExistenceChecker``, ``limits``), finish (``audit``, ``audit_table``). Loading,
existence checks, write checks and the audit file live in those modules, not here; dbt
internals are patched only in ``patches``. Uses dbt's public-ish APIs (adapter, events).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from dbt_common.events.base_types import EventLevel
from dbt_common.events.functions import fire_event
from dbt_common.events.types import Note
from dbt_common.exceptions import CompilationError, DbtRuntimeError

from dbt_defer import audit, audit_table, chain, guard, limits
from dbt_defer.config import DEV, DeferConfig, DeferConfigError, one_line
from dbt_defer.settings import load_config, overlay_settings
from dbt_defer.chain import Environment, Location, render
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
from dbt_defer.warehouse import ExistenceChecker


def log(msg: str, level: EventLevel = EventLevel.INFO) -> None:
    fire_event(Note(msg=msg), level=level)


def settings_from(config: Any) -> Optional[Mapping[str, Any]]:
    """vars: dbt_defer of the running project, overlaid by --vars."""
    project = (getattr(config, "vars", None) and config.vars.to_dict()) or {}
    return overlay_settings(project, getattr(config, "cli_vars", None))


def _load(config: Any, args: Any) -> DeferConfig:
    """The run's DeferConfig from dbt's project config and flags; DeferConfigError on bad input."""
    return load_config(
        settings_from(config), os.environ, config.project_root,
        defer_state=_str(getattr(args, "defer_state", None)), state=_str(getattr(args, "state", None)),
        favor_state=bool(getattr(args, "favor_state", False)),
    )


def config_for_task(task: Any) -> DeferConfig:
    try:
        return _load(task.config, task.args)
    except DeferConfigError as exc:
        raise DbtRuntimeError(str(exc)) from None


def refuse_target_path_in_state(config: Any) -> None:
    """Before dbt parses (and writes manifest.json into its target path): refuse a target path
    that is, or is inside, a chain environment's local state folder (SPEC §7). Native mode
    keeps dbt's own rule (dbt allows ``--state target``)."""
    try:
        cfg = _load(config, config.args)
    except DeferConfigError:
        return  # reported by the run itself, which also replaces the previous audit
    if cfg.native:
        return
    target_path = chain.target_path_of(config)
    for spec in cfg.environments:
        if not spec.is_uri:
            try:
                chain.check_not_target_path(spec, spec.state, target_path)
            except chain.ChainError as exc:
                raise DbtRuntimeError(str(exc)) from None


def _str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


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
        own, specs = cfg.chain_for_target(target_name)
        if own is not None:
            if not specs:
                log(
                    f"dbt-defer: target '{target_name}' builds environment '{own.name}', the last of the "
                    "chain: nothing to defer to, so this run is plain dbt (no deferral)"
                )
                return cls(task, cfg, [], plain=True)
            log(
                f"dbt-defer: target '{target_name}' builds environment '{own.name}': deferring to "
                + ", ".join(e.name for e in specs)
            )
        target_path = os.path.realpath(chain.target_path_of(task.config))
        project = task.config.project_name
        _note_ignored_defer_state(task, cfg)
        try:
            envs = chain.load_chain(
                specs, target_path, project, native=cfg.native, max_age_hours=cfg.max_age_hours,
                warn=_warn, is_compatible=WritableManifest.is_compatible_version,
            )
        except chain.ChainError as exc:
            raise DbtRuntimeError(str(exc)) from None
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
            chain.drop_deferral(manifest, self.restricted)
        elif chain.assign_deferral(manifest, self.environments, self.restricted, self.checker.exists, _warn):  # functions changed: their part of 'graph' too
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
                log(f"dbt-defer: environment '{env.name}' ({chain.source_of(env.spec)}) {suspects[env.name]}",
                    EventLevel.WARN)

    def _restricted(self, task: Any) -> FrozenSet[str]:
        try:
            return guard.restricted_nodes(task, self.cfg.never_defer, log)
        except guard.GuardError as exc:
            raise DbtRuntimeError(str(exc)) from None

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
        try:
            return limits.limit_for(self.cfg, self.task.config.target_name, node, target)
        except limits.LimitError as exc:
            raise CompilationError(str(exc)) from None

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
        metadata = audit.run_metadata(task)
        if error is not None:  # dbt raised while refs were being resolved: the records so far
            metadata.update(status=audit.FAILED, error=one_line(error))
        saved = self._savings()
        document = audit.build_document(records, metadata=metadata, environments=self._described(), saved=saved)
        audit.write_for_run(task, document, _warn)
        try:
            # only commands that run tests report them (compile/show only compile them)
            ran_tests = audit.command_of(task) in ("test", "build")
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
            line = limits.failing_tests_line(records, audit.tests_with_failures(task))
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
                audit.upstream_not_selected(self.task.manifest, selected),
                [(e.name, e.manifest.build_seconds if e.manifest.run_results_path else None)
                 for e in self.environments],
            )
        except Exception as exc:
            log(f"dbt-defer: could not count the upstream nodes not rebuilt ({one_line(exc)})", EventLevel.WARN)
            return audit.Savings()


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
    targets = limits.profile_targets(task.config, task.args)
    unknown = limits.unknown_targets(cfg.limits, targets or ())
    if targets and unknown:
        log(limits.unknown_targets_warning(unknown, task.config.profile_name, targets), EventLevel.WARN)


def _default_database(config: Any) -> Optional[str]:
    return getattr(getattr(config, "credentials", None), "database", None)


def end_refused(task: Any, error: BaseException, environments: Sequence[Environment] = (),
                cfg: Optional[DeferConfig] = None) -> None:
    """The invocation stopped before resolving any ref: see ``audit.end_refused``. Never raises."""
    audit.end_refused(task, error, environments, cfg.environments if cfg is not None else None, _warn)


def _warn(line: str) -> None:
    log(line, EventLevel.WARN)
