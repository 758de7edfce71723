"""The write guard (SPEC §7): which selected nodes would write a relation a chain environment
records, which nodes are restricted (never_defer), and the ref-shim check. Nothing here writes,
loads or fetches (that is ``chain``); each failure is one clear line.

Imports ``config`` and ``chain`` (for ``source_of``), and dbt's selector and task classes lazily;
never the warehouse, the audit or the session.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from dbt_defer.chain import source_of
from dbt_defer.config import node_meta, one_line

SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}"


class GuardError(RuntimeError):
    pass


def task_writes(task: Any) -> bool:
    """Does this command create relations for its selected nodes? (run, build, seed, snapshot, clone)"""
    from dbt.task.run import RunTask
    from dbt.task.test import TestTask

    try:
        from dbt.task.clone import CloneTask
    except ImportError:  # pragma: no cover
        CloneTask = ()  # type: ignore
    return (isinstance(task, RunTask) and not isinstance(task, TestTask)) or isinstance(task, CloneTask)


Key = Tuple[str, str, str]


def location_key(location: Tuple[Any, Any, Any], default_database: Optional[str]) -> Key:
    """A relation's identity for comparisons: lower-cased; a missing database is the adapter's default."""
    database, schema, identifier = location
    return ((database or default_database or "").lower(), (schema or "").lower(), (identifier or "").lower())


def _writes_of(node: Any, store_failures: bool) -> Optional[Tuple[Any, Any, Any]]:
    """The relation a selected node would write, or None (ephemeral, tests not storing failures)."""
    kind = node.resource_type
    if kind in ("model", "seed", "snapshot"):
        if getattr(node, "is_ephemeral_model", False):
            return None
        return (node.database, node.schema, node.alias or node.name)
    if kind == "test":
        config = node.config
        stores = getattr(config, "store_failures", None)
        stores_as = getattr(config, "store_failures_as", None)
        if stores_as == "ephemeral" or stores is False:
            return None
        if stores or stores_as in ("table", "view") or store_failures:
            return (node.database, node.schema, node.alias or node.name)
    return None


def _shared_snapshot(node: Any, target_schema: Optional[str]) -> bool:
    """A snapshot whose legacy ``target_schema`` config names a fixed schema, not the running
    target's: dbt writes it to the same place from every target, so that place is shared by
    design (``target_schema=target.schema`` is not shared: it follows the target)."""
    config = getattr(node, "config", None)
    return (
        node.resource_type == "snapshot"
        and bool(getattr(config, "target_schema", None))
        and (node.schema or "").lower() != (target_schema or "").lower()
    )


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
    """(refused, shared): selected nodes that would write a relation a chain environment records.

    Checked against every relation each environment's manifest records — models, seeds,
    snapshots, sources, tests' stored failures — for the node itself or any other (a dev model
    aliased onto a production table overwrites it just the same). Each value is the one line
    saying so. ``shared`` holds legacy snapshots whose target_schema is fixed (not the running
    target's schema): written from every target by dbt's design, reported but not refused.
    ``suspects``: environment name -> why its manifest records this target's own relations
    (``this_target_warning``); a refusal because of such an environment says that instead.
    """
    envs = list(environments)
    owners: Dict[Key, Tuple[Any, str]] = {}
    for env in reversed(envs):  # the first environment of the chain wins the report
        for location, owner_uid in env.manifest.relations.items():
            owners[location_key(location, default_database)] = (env, owner_uid)
    refused: Dict[str, str] = {}
    shared: Dict[str, str] = {}
    if not owners:
        return refused, shared
    for uid in sorted(selected):
        node = manifest.nodes.get(uid)
        if node is None:
            continue
        mine = _writes_of(node, store_failures)
        if mine is None:
            continue
        owner = owners.get(location_key(mine, default_database))
        if owner is None:
            continue
        env, other_uid = owner
        where = ".".join(p for p in mine if p)
        whose = "for it" if other_uid == uid else f"for {other_uid}"
        if other_uid == uid and _shared_snapshot(node, target_schema):
            shared[uid] = (
                f"dbt-defer: snapshot {uid} writes {where}, which environment '{env.name}' records too: its "
                "target_schema/target_database config makes every target write the same table (dbt's "
                "legacy snapshot config), so dbt-defer lets it run"
            )
            continue
        suspect = (suspects or {}).get(env.name)
        if suspect:
            refused[uid] = (
                f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
                f"({source_of(env.spec)}) records that relation {whose}, and it {suspect}. Nothing was written."
            )
            continue
        refused[uid] = (
            f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
            f"({source_of(env.spec)}) records that relation {whose}. Point your target at a "
            "development schema, or name the target that builds that environment (vars: dbt_defer: "
            "environments: [{name: ..., target: ...}]). Nothing was written."
        )
    return refused, shared


def this_target_warning(env: Any, manifest: Any, default_database: Optional[str], target_name: str) -> Optional[str]:
    """Why, as the tail of a sentence about the environment ("records this target's own ...",
    no final stop), for an environment whose manifest records this target's own relations for most
    models, or None. Either the target writes where the environment keeps its relations, or
    the environment's artifacts come from a run of this target (a dev manifest copied as
    prod's); either way every write is refused later and every ref reads the target itself,
    so it is said once, at start."""
    compared = same = 0
    example = None
    for uid, env_node in env.manifest.nodes.items():
        node = manifest.nodes.get(uid)
        if env_node.resource_type != "model" or env_node.materialized == "ephemeral" or node is None:
            continue
        if getattr(node, "is_ephemeral_model", False):
            continue
        compared += 1
        mine = (node.database, node.schema, node.alias or node.name)
        if location_key(mine, default_database) == location_key(env_node.location, default_database):
            same += 1
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
