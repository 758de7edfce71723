"""Every patch of dbt internals, in one place.

Patched (checked on dbt-core 1.8.x, 1.9.x, 1.10.x, 1.11.x and 1.12.x; ``CHECKED_ON``):

1. ``dbt.task.runnable.GraphRunnableTask.run`` — with deferral on and a chain configured,
   load and validate the chain before the task starts, and write the audit when it ends
   (whatever the outcome; the audit step never raises, so it cannot hide dbt's own exception;
   a run refused before resolving replaces the previous audit with a ``refused`` one).
2. ``dbt.task.runnable.GraphRunnableTask.defer_to_manifest`` — where dbt merges its single
   ``--state`` manifest: in chain mode merge the chain instead (``defer_relation`` and
   ``defer_function`` of every node are what the chain resolves to); in native mode (SPEC §2)
   dbt's own merge runs unchanged. Then the write guard and the restricted nodes, over the
   nodes the task's own queue executes (``dbt retry`` runs its task through here too, with a
   queue it builds itself).
3. ``dbt.context.providers.RuntimeRefResolver.create_relation`` — where dbt decides which
   relation a ``ref()`` renders to: apply the chain rules (SPEC §4), limits and audit; in
   native mode dbt decides and the plugin records (and limits, when configured). A ref a hook
   renders (see 6) that reads a chain environment fails its node (SPEC §7), or warns.
4. ``dbt.task.base.BaseRunner.compile_and_execute`` — a node the write guard refused fails
   here, before it compiles or executes; dbt then skips its descendants (SPEC §7). ``dbt clone``
   records here which environment each node is copied from (the audit only).
5. ``dbt.cli.requires.parse_manifest`` and ``dbt.parser.manifest.parse_manifest`` (which
   ``dbt retry`` calls) — before dbt parses (and writes ``manifest.json`` into the target path),
   refuse a ``--target-path`` inside a chain environment's state folder.
6. ``dbt.compilation.Compiler._compile_code`` — where dbt renders a node's SQL (models, tests,
   snapshots, ephemeral CTEs, on-run-start/end hooks, ``show``/inline nodes): give each
   subquery dbt-defer limited its alias (``limits.resolve``; only the spans it marked), and
   record the other reads dbt resolved there: foreign-key ``to:`` targets and ``function()``
   calls (the audit only; dbt's SQL is unchanged). A ref rendered for a node outside it is
   rendered by the node's pre/post hooks.

With deferral off each patched function calls dbt's original at once (the plugin is inert).

Before patching, ``apply`` checks that every patch point is there with the parameters the
patch relies on (``_PATCH_POINTS``). If one is missing or has changed shape (a dbt version
dbt-defer was not checked on), nothing is patched: dbt runs unchanged, i.e. its own ``--defer``
(native behaviour), and the plugin says so in one line when deferral is on
(``DeferPlugin.initialize``), never a traceback and never a partly patched dbt.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

from dbt_defer import limits

CHECKED_ON = ("1.8", "1.9", "1.10", "1.11", "1.12")  # dbt-core minors whose internals were checked

_ORIGINALS: dict = {}
_UNPATCHED: List[str] = []  # what could not be patched (then nothing is patched)
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
        _forget_stale_audit(self)
        return original(self)
    from dbt_defer.session import DeferSession, config_for_task, end_refused, say_notices

    cfg = None
    try:
        cfg = config_for_task(self)
        session = DeferSession.start(self, cfg) if cfg.configured else None
    except Exception as exc:
        end_refused(self, exc, cfg=cfg)  # the previous invocation's audit must not look current
        raise
    if session is None:
        say_notices(cfg)  # a misspelled vars key or state variable is why nothing is configured
        return original(self)  # nothing configured anywhere: exactly dbt's behaviour and error
    with _ACTIVE_LOCK:
        previous, _ACTIVE = _ACTIVE, session
    error: Optional[BaseException] = None
    _finish_before_end_messages(self, session)
    try:
        return original(self)
    except BaseException as exc:
        error = exc
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE = previous
        vars(self).pop("task_end_messages", None)
        if not getattr(session, "finished", False):
            _finish(session, error)


def _forget_stale_audit(task: Any) -> None:
    """Deferral off: a previous deferred run's audit in this target path would look like this
    run's (dbt rewrites its own artifacts now), so it is removed. Only our own file; never an
    error or a line (the plugin is otherwise inert with deferral off)."""
    try:
        from dbt_defer.audit import remove_stale

        remove_stale(task)
    except Exception:
        pass


def _finish_before_end_messages(task: Any, session: Any) -> None:
    """dbt-defer's end-of-run lines (audit summary, cross-environment tests) come before dbt's
    own closing lines ("Completed successfully", "Done. PASS=..."), not after them: the
    session finishes where dbt prints those, on this task instance only."""
    end_messages = getattr(task, "task_end_messages", None)
    if end_messages is None:
        return

    def task_end_messages(results: Any) -> Any:
        if not getattr(session, "finished", False):
            _finish(session, None)
        return end_messages(results)

    task.task_end_messages = task_end_messages


def _finish(session: Any, error: Optional[BaseException]) -> None:
    """The audit step never changes the run's outcome, nor hides the run's own exception."""
    try:
        session.finish(error)
    except Exception as exc:  # finish warns on its own; this is the last line of defence
        from dbt_common.events.base_types import EventLevel

        from dbt_defer.config import one_line
        from dbt_defer.events import log

        log(f"dbt-defer: the audit step failed ({one_line(exc)}); the run is not affected", EventLevel.WARN)


def _defer_to_manifest(self: Any) -> None:
    session = _ACTIVE
    if session is None or session.task is not self:
        return _ORIGINALS["defer_to_manifest"](self)
    if session.plain:
        return None  # the running target builds the chain's last environment: plain dbt
    if session.native:
        _ORIGINALS["defer_to_manifest"](self)
    session.merge(self)


_COMPILING = threading.local()  # .depth: how many node compilations this thread is inside


def _in_hook(model: Any) -> bool:
    """Is this ref rendered by a hook? on-run-start/end hooks are compiled as ``operation``
    nodes; a node's own SQL (and its ephemeral parents) renders inside ``_compile_code``, so a
    ref rendered for a node outside it is rendered while the node executes: its pre/post hooks
    (``run_hooks`` renders them then)."""
    return getattr(model, "resource_type", None) == "operation" or not getattr(_COMPILING, "depth", 0)


def _create_relation(self: Any, target_model: Any) -> Any:
    original: Callable = _ORIGINALS["create_relation"]
    session = _ACTIVE
    if (
        session is None
        or not session.merged
        or getattr(self.model, "resource_type", None) == "unit_test"
    ):
        return original(self, target_model)
    return session.relation_for(self, target_model, original, hook=_in_hook(self.model))


def _compile_code(self: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
    session = _ACTIVE
    if session is None:
        return _ORIGINALS["compile_code"](self, node, *args, **kwargs)
    observe = session.merged and not session.plain
    foreign_keys = session.foreign_keys_of(node) if observe else []
    _COMPILING.depth = getattr(_COMPILING, "depth", 0) + 1
    try:
        compiled = _ORIGINALS["compile_code"](self, node, *args, **kwargs)
    finally:
        _COMPILING.depth -= 1
    if observe:  # the reads dbt resolved while compiling it: foreign keys, function() (SPEC §5)
        manifest = args[0] if args else kwargs.get("manifest")
        session.record_compiled(compiled if compiled is not None else node, manifest, foreign_keys)
    if getattr(node, "language", "sql") == "python":
        return compiled
    code = getattr(compiled, "compiled_code", None)
    if code and limits.MARK in code:
        compiled.compiled_code = limits.resolve(code)
    return compiled


def _compile_and_execute(self: Any, manifest: Any, ctx: Any) -> Any:
    session = _ACTIVE
    if session is not None and session.refused:
        message = session.refused.get(getattr(self.node, "unique_id", None))
        if message is not None:
            from dbt_common.exceptions import DbtRuntimeError

            raise DbtRuntimeError(message)
    if session is not None and session.merged and not session.plain:
        session.record_clone(self.node)  # dbt clone: where each node is copied from (SPEC §5)
    return _ORIGINALS["compile_and_execute"](self, manifest, ctx)


def _refuse_target_path(runtime_config: Any) -> None:
    args_ = getattr(runtime_config, "args", None)
    if args_ is not None and getattr(args_, "defer", False):
        from dbt_defer.session import refuse_target_path_in_state

        refuse_target_path_in_state(runtime_config)


def _parse_manifest(runtime_config: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_target_path(runtime_config)
    return _ORIGINALS["parse_manifest"](runtime_config, *args, **kwargs)


def _parser_parse_manifest(runtime_config: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_target_path(runtime_config)
    return _ORIGINALS["parser_parse_manifest"](runtime_config, *args, **kwargs)


# (module, class or None, attribute, the leading parameters the patch relies on, our patch's name)
_PATCH_POINTS: Tuple[Tuple[str, Optional[str], str, Tuple[str, ...], str], ...] = (
    ("dbt.task.runnable", "GraphRunnableTask", "run", ("self",), "run"),
    ("dbt.task.runnable", "GraphRunnableTask", "defer_to_manifest", ("self",), "defer_to_manifest"),
    ("dbt.context.providers", "RuntimeRefResolver", "create_relation", ("self", "target_model"), "create_relation"),
    ("dbt.compilation", "Compiler", "_compile_code", ("self", "node"), "compile_code"),
    ("dbt.task.base", "BaseRunner", "compile_and_execute", ("self", "manifest", "ctx"), "compile_and_execute"),
    ("dbt.cli.requires", None, "parse_manifest", ("runtime_config",), "parse_manifest"),
    ("dbt.parser.manifest", None, "parse_manifest", ("runtime_config",), "parser_parse_manifest"),
)
_PATCHES = {
    "run": _run,
    "defer_to_manifest": _defer_to_manifest,
    "create_relation": _create_relation,
    "compile_code": _compile_code,
    "compile_and_execute": _compile_and_execute,
    "parse_manifest": _parse_manifest,
    "parser_parse_manifest": _parser_parse_manifest,
}
# modules that bind a patched function by name when they are imported: dbt imports
# dbt.task.retry inside the retry command, after the plugins (and so after ``apply``); one
# imported earlier keeps dbt's function, so ``apply`` rebinds it
_REBIND = (("dbt.task.retry", "parse_manifest", "parser_parse_manifest"),)


def _find(module: str, cls: Optional[str], attr: str, params: Tuple[str, ...]) -> Tuple[Any, Any, str]:
    """(owner, dbt's function, "") when the patch point is there with the expected parameters;
    (None, None, what is wrong) otherwise. Never raises."""
    where = f"{module}.{cls + '.' if cls else ''}{attr}"
    try:
        owner: Any = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
            if attr not in vars(owner):  # inherited from elsewhere: not the function we checked
                return None, None, f"{where} is missing"
        function = getattr(owner, attr, None)
        if not callable(function):
            return None, None, f"{where} is missing"
        found = tuple(inspect.signature(function).parameters)[: len(params)]
    except Exception as exc:  # an import error or a signature that cannot be read
        return None, None, f"{where} cannot be loaded ({type(exc).__name__})"
    if found != params:
        return None, None, f"{where} has changed shape (parameters {', '.join(found) or 'none'}, expected {', '.join(params)})"
    return owner, function, ""


def unpatched() -> List[str]:
    """What could not be patched in the installed dbt (empty: every patch is installed)."""
    return list(_UNPATCHED)


def dbt_version() -> str:
    try:
        from dbt.version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def checked_on(version: str) -> bool:
    return ".".join(version.split(".")[:2]) in CHECKED_ON


def checked_range() -> str:
    return f"dbt-core {CHECKED_ON[0]}-{CHECKED_ON[-1]}"


def fallback_line() -> str:
    """The one line a deferred run prints when dbt-defer could not patch the installed dbt."""
    return (
        f"dbt-defer: cannot patch dbt-core {dbt_version()} ({'; '.join(_UNPATCHED)}); dbt-defer was "
        f"checked on {checked_range()}. Falling back to dbt's own --defer: no chain, limits, audit or "
        "write guard in this run (dbt needs --state or DBT_DEFER_STATE). Fix: install a dbt-core "
        f"version in {CHECKED_ON[0]}-{CHECKED_ON[-1]} or a dbt-defer release that supports this one."
    )


def apply() -> None:
    """Install the patches once per process, all or none (see the module's docstring)."""
    if _ORIGINALS or _UNPATCHED:
        return
    found = {}
    for module, cls, attr, params, name in _PATCH_POINTS:
        owner, function, problem = _find(module, cls, attr, params)
        if problem:
            _UNPATCHED.append(problem)
        else:
            found[name] = (owner, attr, function)
    if _UNPATCHED:
        return  # nothing patched: dbt unchanged (its own --defer); said once per deferred run
    for name, (owner, attr, function) in found.items():
        _ORIGINALS[name] = function
        setattr(owner, attr, _PATCHES[name])
    for module_name, attr, name in _REBIND:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, attr, None) is _ORIGINALS[name]:
            setattr(module, attr, _PATCHES[name])
