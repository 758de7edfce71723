"""One deferred invocation, thin: it wires the rooms below to one running dbt task.

Built from a running dbt task when deferral is on and a chain is configured; ``patches`` is
the only caller. Owns the invocation's state (the loaded chain, the selection, the restricted
and refused nodes, the audit recorder) and the order of events: start (``chain.load_chain``),
merge (``guard``, then ``merge.assign_deferral``), each ref (``refs.RefResolution``: ``resolution.resolve`` with
``warehouse.ExistenceChecker``, ``limits``), finish (``audit``, ``audit_table``). Loading,
existence checks, write checks and the audit file live in those modules, not here; dbt
internals are patched only in ``patches``. Uses dbt's public-ish APIs (adapter, events).
"""

from __future__ import annotations

import os
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence

from dbt_common.events.base_types import EventLevel
from dbt_common.exceptions import DbtRuntimeError

from dbt_defer import audit, audit_table, chain, guard, limits, merge
from dbt_defer.chain import Environment
from dbt_defer.config import DeferConfig, DeferConfigError, gc_paused, one_line
from dbt_defer.events import log
from dbt_defer.events import warn as _warn
from dbt_defer.refs import RefResolution
from dbt_defer.settings import load_config, overlay_settings, vars_key_notice
from dbt_defer.warehouse import ExistenceChecker


def settings_from(config: Any) -> Optional[Mapping[str, Any]]:
    """vars: dbt_defer of the running project, overlaid by --vars."""
    project = (getattr(config, "vars", None) and config.vars.to_dict()) or {}
    return overlay_settings(project, getattr(config, "cli_vars", None))


def _load(config: Any, args: Any) -> DeferConfig:
    """The run's DeferConfig from dbt's project config and flags; DeferConfigError on bad input."""
    project = (getattr(config, "vars", None) and config.vars.to_dict()) or {}
    return load_config(
        overlay_settings(project, getattr(config, "cli_vars", None)), os.environ, config.project_root,
        defer_state=_str(getattr(args, "defer_state", None)), state=_str(getattr(args, "state", None)),
        favor_state=bool(getattr(args, "favor_state", False)),
        vars_notice=vars_key_notice(project, getattr(config, "cli_vars", None)),
    )


def say_notices(cfg: DeferConfig) -> None:
    """The configuration's did-you-mean lines (also when they leave nothing configured)."""
    for notice in cfg.notices:
        log(notice, EventLevel.WARN)


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
        # unique_id -> the environment whose copy its defer_relation / defer_function is (merge)
        self.chosen: Dict[str, str] = {}
        self.checker: Optional[ExistenceChecker] = None
        self._selected_src: Any = None
        self._selected: FrozenSet[str] = frozenset()
        self._queued: Optional[FrozenSet[str]] = None  # the nodes this task executes (set in merge)
        self._writes = True  # does this command build its selected nodes? (set in merge)
        self.merged = False
        self.finished = False  # finish() ran (before dbt's closing lines, or at the very end)
        self.refs = RefResolution(self)

    # --- set-up ------------------------------------------------------------------------

    @classmethod
    def start(cls, task: Any, cfg: DeferConfig) -> "DeferSession":
        """Load and validate the chain of this run; one clear error line on bad input.

        The chain starts after the environment the running target builds (SPEC §3). In native
        mode (SPEC §2) dbt reads and judges its own --state: a problem dbt-defer sees there is
        a warning, never an error dbt would not raise.
        """
        from dbt.artifacts.schemas.manifest import WritableManifest

        say_notices(cfg)
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
        bad_limit = limits.bad_meta_limits(manifest.nodes.values())
        if bad_limit:  # a bad setting stops the run at start, wherever it is written
            raise DbtRuntimeError(bad_limit)
        self._queued = _queued_nodes(task)
        if self._queued is not None and not self.native:
            _align_dbt_selection(self._queued)
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
            merge.drop_deferral(manifest, self.restricted)
        elif self._assign(manifest):  # functions changed: their part of 'graph' too
            flat_graph = getattr(manifest, "flat_graph", None)
            if isinstance(flat_graph, dict) and "functions" in flat_graph:
                flat_graph["functions"] = {k: v.to_dict(omit_none=False) for k, v in manifest.functions.items()}
            elif hasattr(manifest, "build_flat_graph"):
                manifest.build_flat_graph()
        self.merged = True

    def _assign(self, manifest: Any) -> bool:
        """The chain's choice into every node (``merge.assign_deferral``); True when functions
        changed. 20,000 nodes get a new copy each: the cyclic GC is paused meanwhile."""
        with gc_paused():
            return merge.assign_deferral(manifest, self.environments, self.restricted, self.checker.exists, _warn,
                                         self.chosen)

    def _guard(self, task: Any, suspects: Dict[str, str]) -> None:
        """SPEC §7: selected nodes that would write a chain relation fail before executing (their
        descendants are skipped by dbt); in native mode this only warns. ``suspects``: chain
        environments whose manifests record this target's own relations: said once, at start,
        or by each refusal they cause."""
        TestTask = guard.loaded_class("dbt.task.test", "TestTask")  # not imported: not a test task

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
        """The nodes this invocation builds: the task's own queue (``dbt retry`` builds its queue
        without dbt's selector, so dbt's selection global stays empty there), else that global."""
        if self._queued is not None:
            return self._queued
        from dbt import selected_resources

        current = selected_resources.SELECTED_RESOURCES
        if current is not self._selected_src:
            self._selected = frozenset(current)
            self._selected_src = current
        return self._selected

    # --- resolution (refs.RefResolution) --------------------------------------------------

    def relation_for(self, resolver: Any, target: Any, original: Any, hook: bool = False) -> Any:
        return self.refs.relation_for(resolver, target, original, hook=hook)

    # --- deferred reads other than ref() (SPEC §5), observed after dbt resolved them -----------

    def foreign_keys_of(self, node: Any) -> List[Any]:
        """(constraint, its ``to:`` expression) of ``node``'s foreign keys, before dbt compiles
        them into relations (dbt >= 1.12 resolves them to the deferred relation)."""
        if getattr(node, "resource_type", None) != "model":
            return []
        try:
            return [(c, c.to) for c in getattr(node, "all_constraints", None) or ()
                    if getattr(c, "type", None) == "foreign_key" and isinstance(getattr(c, "to", None), str)]
        except Exception:  # a node dbt cannot list constraints of: dbt says so itself
            return []

    def record_compiled(self, node: Any, manifest: Any, foreign_keys: List[Any]) -> None:
        """The audit records of ``node``'s foreign-key targets and ``function()`` calls; a failure
        is one warning line, never the run's outcome."""
        if not foreign_keys and not getattr(node, "functions", None):
            return
        try:
            from dbt.adapters.factory import get_adapter

            adapter = get_adapter(self.task.config)
            if foreign_keys:
                self.refs.record_foreign_keys(
                    node, manifest, foreign_keys, lambda r: str(adapter.Relation.create_from(self.task.config, r))
                )
            reads = _function_reads(node, manifest, adapter, self.task.config)
            if reads:
                self.refs.record_functions(node, reads)
        except Exception as exc:
            log(f"dbt-defer: could not record the foreign keys and functions of {getattr(node, 'unique_id', node)} "
                f"in the audit ({one_line(exc)}); the run is not affected", EventLevel.WARN)

    def record_clone(self, node: Any) -> None:
        """``dbt clone``: one record per node copied (from which environment)."""
        if audit.command_of(self.task) != "clone" or getattr(node, "resource_type", None) not in ("model", "seed", "snapshot"):
            return
        try:
            from dbt.adapters.factory import get_adapter

            adapter = get_adapter(self.task.config)
            self.refs.record_clone(node, lambda r: str(adapter.Relation.create_from(self.task.config, r)))
        except Exception as exc:
            log(f"dbt-defer: could not record the clone of {node.unique_id} in the audit ({one_line(exc)}); "
                "the run is not affected", EventLevel.WARN)

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
        # only commands that run tests report them (compile/show only compile them)
        ran_tests = audit.command_of(task) in ("test", "build")
        try:
            crossed = audit.cross_environment_tests(records) if ran_tests else {}
            for test, envs in crossed.items():
                if not audit.cross_environment_ok(task.manifest.nodes.get(test)):
                    log(audit.cross_environment_line(test, envs), EventLevel.WARN)
            if self.cfg.audit_table and records and not self.cfg.explain:
                audit_table.append(task, document, self.environments, log)
        finally:
            line = audit.summary_line(document["summary"], (r.limit for r in records), saved.measured_in,
                                      audit.kinds_read(records))
            if ran_tests:
                line += limits.limited_tests_text(records)
            log(line)
            line = limits.failing_tests_line(records, audit.tests_with_failures(task))
            if line:
                log(line, EventLevel.WARN)

    def _described(self) -> List[Dict[str, Any]]:
        return [e.describe() for e in self.environments]

    def _savings(self) -> audit.Savings:
        """SPEC §5 not_built / saved_seconds, reported only by commands that build (run, build,
        seed, snapshot, clone; explain as the build): a test, compile or show run builds nothing,
        and neither does a run whose every selected model, seed and snapshot the guard refused.
        A failure is one warning, never the run's outcome."""
        if not self._writes:
            return audit.Savings()
        try:
            # dbt sets the selection when it executes; a run that selected nothing never merged
            selected = self._selected_now() if self.merged else frozenset()
            if self.refused and audit.all_refused(self.task.manifest, selected, self.refused):
                return audit.Savings()
            return audit.savings(
                audit.upstream_not_selected(self.task.manifest, selected),
                [(e.name, e.manifest.build_seconds if e.manifest.run_results_path else None)
                 for e in self.environments],
            )
        except Exception as exc:
            log(f"dbt-defer: could not count the upstream nodes not rebuilt ({one_line(exc)})", EventLevel.WARN)
            return audit.Savings()


class _SourceQuoting:
    quoting: Dict[str, Any] = {}  # what dbt's function resolver renders a function with


def _function_reads(node: Any, manifest: Any, adapter: Any, config: Any) -> List[Any]:
    """(function, read its defer_function?, the relation rendered) of each ``function()`` call
    of ``node`` (dbt >= 1.11) whose relation dbt rendered into the compiled SQL: the deferred
    function's or the function's own (dbt's ``RuntimeFunctionResolver`` chose; no warehouse
    call is made to tell which)."""
    calls = getattr(node, "functions", None)
    code = getattr(node, "compiled_code", None)
    if not calls or not code or not hasattr(manifest, "resolve_function"):
        return []
    from dbt.adapters.contracts.relation import RelationType

    def render(function: Any) -> str:
        return str(adapter.Relation.create_from(_SourceQuoting(), function, type=RelationType.Function))

    reads = []
    for call in calls:
        package, name = (None, call[0]) if len(call) == 1 else (call[0], call[1])
        function = manifest.resolve_function(name, package, config.project_name, node.package_name)
        if getattr(function, "unique_id", None) is None:  # not found or disabled: dbt raised already
            continue
        deferred = getattr(function, "defer_function", None)
        other = render(deferred) if deferred is not None else None
        own = render(function)
        if other is not None and other != own and other in code:
            reads.append((function, True, other))
        elif own in code:
            reads.append((function, False, own))
    return reads


def _queued_nodes(task: Any) -> Optional[FrozenSet[str]]:
    """The unique_ids the task's graph queue executes (what dbt's node selector also stores in
    ``selected_resources``, except under ``dbt retry``, whose task builds its queue itself from
    the previous run's failures); None when the task has no queue."""
    queue = getattr(task, "job_queue", None)
    get = getattr(queue, "get_selected_nodes", None)
    if get is None:
        return None
    try:
        return frozenset(get())
    except Exception:  # pragma: no cover - a queue of another shape: dbt's global decides
        return None


def _align_dbt_selection(queued: FrozenSet[str]) -> None:
    """Chain mode: dbt's own readers of the selection (``function()`` deferral, the
    ``selected_resources`` variable) see the nodes this task builds, under ``dbt retry`` too."""
    from dbt import selected_resources

    if set(selected_resources.SELECTED_RESOURCES) != queued:
        selected_resources.set_selected_resources(set(queued))


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
