"""The write guard (SPEC §7): which selected nodes would write a relation a chain environment
records or into a schema one builds (functions and shared relations included), the lines for
hooks that render a chain environment's relation, which nodes are restricted (never_defer), and
the ref-shim check. Nothing here writes, loads or fetches (that is ``chain``); each failure is
one clear line.

Imports ``config`` and ``chain`` (for ``source_of``), and dbt's selector and task classes lazily;
never the warehouse, the audit or the session.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from dbt_defer.chain import source_of
from dbt_defer.config import node_meta, one_line

SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}"


class GuardError(RuntimeError):
    pass


def loaded_class(module: str, name: str) -> Any:
    """dbt's class ``module.name`` if that module is imported, else ``()`` (``isinstance(x, ())``
    is False): a task is an instance of it only if its module was imported, and importing
    dbt.task.test costs ~0.15 s a ``dbt compile`` never pays otherwise (bench 3b)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, ()) if loaded is not None else ()


def task_writes(task: Any) -> bool:
    """Does this command create relations for its selected nodes? (run, build, seed, snapshot, clone)"""
    RunTask = loaded_class("dbt.task.run", "RunTask")
    TestTask = loaded_class("dbt.task.test", "TestTask")
    CloneTask = loaded_class("dbt.task.clone", "CloneTask")
    return (isinstance(task, RunTask) and not isinstance(task, TestTask)) or isinstance(task, CloneTask)


Key = Tuple[str, str, str]


def location_key(location: Tuple[Any, Any, Any], default_database: Optional[str]) -> Key:
    """A relation's identity for comparisons: lower-cased; a missing database is the adapter's default."""
    database, schema, identifier = location
    return ((database or default_database or "").lower(), (schema or "").lower(), (identifier or "").lower())


def _writes_of(node: Any, store_failures: bool) -> Optional[Tuple[Any, Any, Any]]:
    """The relation a selected node would write, or None (ephemeral, tests not storing failures).
    A function (dbt >= 1.11) is a relation like any other: replacing it replaces the environment's."""
    kind = node.resource_type
    if kind in ("model", "seed", "snapshot", "function"):
        if getattr(node, "is_ephemeral_model", False):
            return None
        return (node.database, node.schema, getattr(node, "alias", None) or node.name)
    if kind == "test":
        config = node.config
        stores = getattr(config, "store_failures", None)
        stores_as = getattr(config, "store_failures_as", None)
        if stores_as == "ephemeral" or stores is False:
            return None
        if stores or stores_as in ("table", "view") or store_failures:
            return (node.database, node.schema, node.alias or node.name)
    return None


SHARED_OPT_IN = "meta: {dbt_defer: {shared: true}}"


def _fixed_schema(node: Any, target_schema: Optional[str]) -> bool:
    """The node writes into a schema that does not follow the running target's (a legacy
    snapshot's fixed ``target_schema``, a model whose schema config is fixed): dbt writes it to
    the same place from every target, so every environment shares that relation. A schema that
    is the target's, or dbt's default custom schema ``<target schema>_<name>``, follows it."""
    if node.resource_type not in ("model", "seed", "snapshot") or not target_schema:
        return False
    schema, own = (node.schema or "").lower(), target_schema.lower()
    return schema != own and not schema.startswith(own + "_")


def _shared_by_choice(node: Any, target_schema: Optional[str]) -> bool:
    """``meta: {dbt_defer: {shared: true}}`` on a node whose schema is fixed: the team means every
    environment to write that relation (honoured only where the target cannot be the reason)."""
    return node_meta(node).get("shared") is True and _fixed_schema(node, target_schema)


def _selected_node(manifest: Any, uid: str) -> Any:
    node = manifest.nodes.get(uid)
    if node is None:
        node = (getattr(manifest, "functions", None) or {}).get(uid)
    return node


def write_clashes(
    selected: Iterable[str],
    manifest: Any,
    environments: Iterable[Any],
    *,
    default_database: Optional[str],
    target_schema: Optional[str] = None,
    store_failures: bool = False,
    suspects: Optional[Dict[str, str]] = None,
) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(refused, shared): selected nodes that would write into a chain environment.

    Refused: a node that would write a relation a chain environment's manifest records — models,
    seeds, snapshots, functions, sources, tests' stored failures — for the node itself or any
    other (a dev model aliased onto a production table overwrites it just the same); and a node
    that would create a relation in a schema a chain environment builds (its models, seeds,
    snapshots, functions, tests' stored failures — not sources): a target pointed at that
    schema writes nothing there, new models included. Each value is the one line saying so.
    ``shared``: nodes whose fixed schema every environment shares and that opt in with
    ``meta: {dbt_defer: {shared: true}}``: reported, not refused. ``suspects``: environment name
    -> why its manifest records this target's own relations (``this_target_warning``); a
    refusal because of such an environment says that instead.
    """
    envs = list(environments)
    owners: Dict[Key, Tuple[Any, str]] = {}
    built: Dict[Tuple[str, str], Tuple[Any, str]] = {}  # (database, schema) -> (env, an example)
    for env in reversed(envs):  # the first environment of the chain wins the report
        for location, owner_uid in env.manifest.relations.items():
            key = location_key(location, default_database)
            owners[key] = owner = (env, owner_uid)
            if owner_uid[:7] != "source.":
                built[key[0], key[1]] = owner
    refused: Dict[str, str] = {}
    shared: Dict[str, str] = {}
    if not owners:
        return refused, shared
    for uid in sorted(selected):
        node = _selected_node(manifest, uid)
        if node is None:
            continue
        mine = _writes_of(node, store_failures)
        if mine is None:
            continue
        key = location_key(mine, default_database)
        owner = owners.get(key)
        if owner is None and (key[0], key[1]) not in built:
            continue
        where = ".".join(p for p in mine if p)
        fixed = _fixed_schema(node, target_schema)
        if _shared_by_choice(node, target_schema) and (owner is None or owner[1] == uid):
            env = (owner or built[key[:2]])[0]
            shared[uid] = (
                f"dbt-defer: {node.resource_type} {uid} writes {where}, a relation every environment shares "
                f"(environment '{env.name}' writes there too); it runs because it opts in with {SHARED_OPT_IN}"
            )
            continue
        if owner is None:  # a new relation, in a schema a chain environment builds
            env, example = built[key[:2]]
            refused[uid] = (
                f"dbt-defer: refusing to write {uid} into {where}: schema {'.'.join(p for p in mine[:2] if p)} "
                f"holds environment '{env.name}''s relations ({source_of(env.spec)} records {example} there), "
                "and this target writes nothing into a chain environment's schema, not even a relation no "
                "manifest records. " + _fix(fixed) + " Nothing was written."
            )
            continue
        env, other_uid = owner
        whose = "for it" if other_uid == uid else f"for {other_uid}"
        suspect = (suspects or {}).get(env.name)
        if suspect and not fixed:
            refused[uid] = (
                f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
                f"({source_of(env.spec)}) records that relation {whose}, and it {suspect}. Nothing was written."
            )
            continue
        if fixed and other_uid == uid:
            refused[uid] = (
                f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
                f"({source_of(env.spec)}) records that relation for it, and its fixed schema (e.g. a legacy "
                "snapshot's target_schema) makes every target write that same relation, so it is "
                f"'{env.name}''s. If every environment is meant to write it, opt in on the node: "
                f"{SHARED_OPT_IN}; else make its schema follow the target. Nothing was written."
            )
            continue
        refused[uid] = (
            f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
            f"({source_of(env.spec)}) records that relation {whose}. " + _fix(False) + " Nothing was written."
        )
    return refused, shared


def _fix(fixed: bool) -> str:
    if fixed:
        return (
            "Give the node a schema that follows the target, or, if every environment is meant to "
            f"share that relation, opt in on the node: {SHARED_OPT_IN}."
        )
    return (
        "Point your target at a development schema, or name the target that builds that "
        "environment (vars: dbt_defer: environments: [{name: ..., target: ...}])."
    )


HOOKS_OPT_IN = "meta: {dbt_defer: {hooks: warn}}"


def _hook_owner(node: Any) -> str:
    if getattr(node, "resource_type", None) == "operation":
        return f"the project hook {node.unique_id} (on-run-start/on-run-end)"
    return f"a pre/post hook of {node.unique_id}"


def hook_reads_allowed(node: Any) -> bool:
    """The node opts in to hooks that read a chain environment: ``meta: {dbt_defer: {hooks: warn}}``."""
    return node_meta(node).get("hooks") == "warn"


def hook_refusal(node: Any, target: Any, env: str, where: str) -> str:
    """The one line of a hook refused because it renders a chain environment's relation."""
    if getattr(node, "resource_type", None) == "operation":
        fix = (
            f"build {target.name} in your target first (dbt build -s {target.name}), or list it in vars: "
            "dbt_defer: never_defer so that hooks read your target only"
        )
    else:
        fix = (
            f"build {target.name} in your target first (dbt build -s +{node.name}), or, if the hook only "
            f"reads it, opt in on the node: {HOOKS_OPT_IN}"
        )
    return (
        f"dbt-defer: refusing to run {_hook_owner(node)}: it renders ref('{target.name}') as {where} of "
        f"environment '{env}', and a hook's statement can write there. Fix: {fix}. The hook did not run."
    )


def hook_warning(node: Any, target: Any, env: str, where: str, allowed: bool) -> str:
    why = (f"the node opts in with {HOOKS_OPT_IN}" if allowed
           else "dbt's own --defer renders it so (native mode: dbt-defer only warns)")
    return (
        f"dbt-defer: {_hook_owner(node)} renders ref('{target.name}') as {where} of environment "
        f"'{env}' ({why}); a statement that writes there changes '{env}'"
    )


def this_target_warning(env: Any, manifest: Any, default_database: Optional[str], target_name: str) -> Optional[str]:
    """Why, as the tail of a sentence about the environment ("records this target's own ...",
    no final stop), for an environment whose manifest records this target's own relations for most
    models, or None. Either the target writes where the environment keeps its relations, or
    the environment's artifacts come from a run of this target (a dev manifest copied as
    prod's); either way every write is refused later and every ref reads the target itself,
    so it is said once, at start."""
    compared = same = 0
    example = None
    nodes = manifest.nodes
    dd = default_database or ""
    theirs = getattr(env.manifest, "schemas", None)
    if theirs is not None:
        # no schema of the environment is one of this target's: nothing to compare (the usual case)
        theirs = {((d or dd).lower(), (s or "").lower()) for d, s in theirs}
        if not any(((n.database or dd).lower(), (n.schema or "").lower()) in theirs for n in nodes.values()
                   if n.resource_type == "model"):
            return None
    for uid, env_node in env.manifest.nodes.items():
        if env_node.resource_type != "model" or env_node.materialized == "ephemeral":
            continue
        node = nodes.get(uid)
        if node is None or getattr(node, "is_ephemeral_model", False):
            continue
        compared += 1
        # location_key of both, compared part by part (cheapest first; every model of 3
        # environments at start, bench 3b)
        alias = node.alias or node.name
        if (((alias or "").lower() == (env_node.identifier or "").lower())
                and (node.schema or "").lower() == (env_node.schema or "").lower()
                and (node.database or dd).lower() == (env_node.database or dd).lower()):
            same += 1
            mine = (node.database, node.schema, alias)
            example = example or (uid, ".".join(p for p in mine if p))
    if example is None or same * 2 <= compared:
        return None
    uid, where = example
    return (
        f"records this target's own relations "
        f"for {same} of {compared} models (e.g. {uid} at {where}): either target '{target_name}' writes "
        f"where '{env.name}' keeps its relations (point the target at a development schema), or that "
        f"manifest comes from a run of target '{target_name}' (point '{env.name}' at the artifacts of the "
        f"job that builds it); if target '{target_name}' does build '{env.name}', name it: vars: dbt_defer: "
        f"environments: [{{name: {env.name}, target: {target_name}, ...}}]"
    )


def _deep_no_warn(spec: Any) -> None:
    """Selections that match nothing are reported by us, naming never_defer, not by dbt."""
    if hasattr(spec, "expect_exists"):
        try:
            spec.expect_exists = False
        except Exception:  # pragma: no cover - frozen in some dbt version
            pass
    for component in getattr(spec, "components", None) or ():
        _deep_no_warn(component)


def never_defer_nodes(selectors: Iterable[str], graph: Any, manifest: Any, previous_state: Any,
                      log: Callable[..., None]) -> FrozenSet[str]:
    """The unique_ids matched by the ``never_defer`` selectors (dbt selector syntax).

    A bad selector is one clear line naming it; a selector matching nothing warns (a typo there
    would leave regulated data deferrable).
    """
    from dbt_common.events.base_types import EventLevel
    from dbt.graph import NodeSelector, parse_difference

    selector = NodeSelector(graph, manifest, previous_state=previous_state)
    takes_warn = "warn_on_no_nodes" in inspect.signature(selector.get_selected).parameters
    found: Set[str] = set()
    for raw in selectors:
        try:
            spec = parse_difference([raw], None)
            _deep_no_warn(spec)
            chosen = selector.get_selected(spec, warn_on_no_nodes=False) if takes_warn else selector.get_selected(spec)
        except Exception as exc:  # dbt raises several kinds for bad selectors
            raise GuardError(
                f"dbt-defer: vars: dbt_defer: never_defer selector {raw!r} is not a valid dbt selector "
                f"({one_line(exc, pick='last')}); use dbt selector syntax such as tag:pii or path:models/restricted"
            ) from None
        if not chosen:
            log(
                f"dbt-defer: vars: dbt_defer: never_defer selector {raw!r} matches no node; nothing is "
                "restricted by it — check it for a typo",
                EventLevel.WARN,
            )
        found |= set(chosen)
    return frozenset(found)


def restricted_nodes(task: Any, never_defer: Iterable[str], log: Callable[..., None]) -> FrozenSet[str]:
    """Nodes read only from the running target (SPEC §7): ``meta: dbt_defer: defer: false`` and
    what the ``never_defer`` selectors match. Raises GuardError for a bad selector."""
    found: Set[str] = {uid for uid, node in task.manifest.nodes.items() if node_meta(node).get("defer") is False}
    if never_defer:
        found |= never_defer_nodes(never_defer, task.graph, task.manifest, task.previous_state, log)
    return frozenset(found)


def warn_if_shim_missing(manifest: Any, project_name: str, log: Callable[..., None]) -> bool:
    """True when the root project routes ``ref`` through dbt_defer.ref; warn once otherwise."""
    from dbt_common.events.base_types import EventLevel

    macro = manifest.macros.get(f"macro.{project_name}.ref")
    if macro is not None and "dbt_defer.ref" in (macro.macro_sql or ""):
        return True
    log(
        "dbt-defer: the root project has no ref shim routing ref() through dbt_defer.ref. "
        f"Add macros/ref.sql containing: {SHIM}",
        EventLevel.WARN,
    )
    return False
