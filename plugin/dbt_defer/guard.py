"""Safety checks (SPEC §7): nothing here writes; each failure is one clear line."""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import (
    MANIFEST,
    LoadedManifest,
    format_age,
    load_manifest,
    manifest_path_for,
    project_id_for,
)

SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}"


class GuardError(RuntimeError):
    pass


def source_of(spec: EnvironmentSpec) -> str:
    """Where an environment's state comes from, as shown in messages (redacted)."""
    state = spec.redact(spec.state)  # a URI's credentials and query string are never shown
    return f"{spec.source}={state}" if spec.source.startswith(("DBT_", "--")) else state



def local_state(
    spec: EnvironmentSpec,
    target_path: str,
    warn: Optional[Callable[[str], None]] = None,
    project_name: Optional[str] = None,
) -> str:
    """The local folder/file for an environment's state; a URI is fetched into the cache first
    (a download of another project's manifest is refused before it replaces the cached copy)."""
    if not spec.is_uri:
        return spec.state
    from dbt_defer import remote

    return remote.fetch_state(spec, target_path, warn=warn, project_name=project_name)


def load_environment(
    spec: EnvironmentSpec,
    target_path: str,
    project_name: Optional[str],
    *,
    is_compatible: Optional[Callable[[str], bool]] = None,
    warn: Optional[Callable[[str], None]] = None,
    local: Optional[str] = None,
    native: bool = False,
) -> LoadedManifest:
    """Fetch (URI), locate and validate one environment's manifest: the one sequence that a
    deferred run and the CLI both use. Raises ManifestError or GuardError with the clear line.

    ``local``: the state's local folder when the caller has fetched it already. ``native``: dbt's
    own --state (SPEC §2): a state in the target path is dbt's business, only warned about.
    """
    if "{{" in spec.state:
        raise GuardError(
            f"dbt-defer: environment '{spec.name}': state {spec.redact(spec.state)} contains Jinja, which dbt does "
            f"not render inside vars: dbt_defer; set DBT_DEFER_{spec.name.upper()}_STATE instead "
            "(e.g. in your shell or CI job)"
        )
    if local is None:
        local = local_state(spec, target_path, warn, project_name)
    try:
        check_not_target_path(spec, local, target_path)
    except GuardError as exc:
        if not native:
            raise
        if warn is not None:
            warn(f"{exc} (dbt's own --defer: not refused)")
    manifest = load_manifest(spec.name, manifest_path_for(spec.name, local), is_compatible=is_compatible)
    if project_name:
        check_project(spec, manifest, project_name)
    if warn is not None:
        for line in unusable_lines(spec, manifest):
            warn(line)
    return manifest


def check_distinct_states(specs: Iterable[EnvironmentSpec]) -> None:
    """Two environments reading one state would make the chain a lie (the second never wins)."""
    seen: Dict[str, EnvironmentSpec] = {}
    for spec in specs:
        key = spec.state if spec.is_uri or "\0" in spec.state else os.path.realpath(spec.state)
        if not spec.is_uri and os.path.isfile(key):
            key = os.path.dirname(key)
        first = seen.setdefault(key, spec)
        if first is not spec:
            raise GuardError(
                f"dbt-defer: environments '{first.name}' ({source_of(first)}) and '{spec.name}' "
                f"({source_of(spec)}) read the same state; point each environment at its own artifacts "
                f"(or remove '{spec.name}')"
            )


MAX_UNUSABLE_LINES = 5


def unusable_lines(spec: EnvironmentSpec, manifest: LoadedManifest) -> list:
    """One warning line per node whose names cannot be SQL names (SPEC §7), at most a few, then
    one line counting the rest."""
    uids = sorted(manifest.unusable)
    lines = [manifest.unusable_line(spec.name, uid) for uid in uids[:MAX_UNUSABLE_LINES]]
    if len(uids) > MAX_UNUSABLE_LINES:
        lines.append(
            f"dbt-defer: environment '{spec.name}': {len(uids) - MAX_UNUSABLE_LINES} more node(s) of "
            f"{manifest.path} have names that cannot be SQL names; their records there are not used either"
        )
    return lines


def check_not_target_path(spec: EnvironmentSpec, state: str, target_path: str) -> None:
    """``state`` is the environment's folder or its manifest file; either may not exist yet.

    Refused when the run's target path is that folder or inside it: dbt writes its artifacts
    there (manifest.json first, at parse time) and would overwrite the environment's state.
    """
    if "\0" in state:
        return  # not a usable path at all; the manifest reader says so
    state = os.path.abspath(state)
    is_file = os.path.isfile(state) or (not os.path.isdir(state) and state.endswith(".json"))
    folder = os.path.realpath(os.path.dirname(state) if is_file else state)
    target = os.path.realpath(target_path)
    if target == folder or target.startswith(folder.rstrip(os.sep) + os.sep):
        what = "this run's own target path" if target == folder else f"a folder holding this run's target path"
        raise GuardError(
            f"dbt-defer: environment '{spec.name}' state {source_of(spec)} is {what} "
            f"({target_path}), which dbt overwrites during the run; copy that environment's artifacts "
            "to another folder (e.g. prod-artifacts/) and point the environment there, or use another --target-path"
        )


def check_project(spec: EnvironmentSpec, manifest: LoadedManifest, project_name: str) -> None:
    if manifest.project_name:
        other = manifest.project_name
        same = other == project_name
    elif manifest.project_id:
        other = f"project_id {manifest.project_id}"
        same = manifest.project_id == project_id_for(project_name)
    elif project_name in manifest.packages:
        return  # no project name recorded (hand-made, old dbt), but nodes of this project
    else:
        # nothing says it is this project's: an empty or foreign manifest must not pass
        what = "no node" if not manifest.packages else f"only nodes of {', '.join(sorted(manifest.packages)[:3])}"
        raise GuardError(
            f"dbt-defer: environment '{spec.name}': {manifest.path} records no project name or "
            f"project_id and {what} of project {project_name!r}, so it cannot be this project's "
            "manifest; point the environment at the manifest.json dbt writes for this project"
        )
    if not same:
        raise GuardError(
            f"dbt-defer: environment '{spec.name}': {manifest.path} is a manifest of project {other!r}, "
            f"not of {project_name!r}; point the environment at this project's artifacts"
        )


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


def stale_warning(spec: EnvironmentSpec, manifest: LoadedManifest, max_age_hours: float, now=None) -> Optional[str]:
    """The warning line for a manifest older than max_age_hours, or None."""
    age = manifest.age_hours(now)
    if age is None or not age > max_age_hours:
        return None
    return (
        f"dbt-defer: environment '{spec.name}' manifest {manifest.path} is {format_age(age)} old "
        f"(generated_at {manifest.generated_at}; max_age_hours {max_age_hours:g}); deferred refs may "
        "read stale tables: refresh that environment's artifacts, or raise vars: dbt_defer: max_age_hours"
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if line.lower() not in ("runtime error", "compilation error")]
    return lines[-1] if lines else type(exc).__name__


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
                f"({_first_line(exc)}); use dbt selector syntax such as tag:pii or path:models/restricted"
            ) from None
        if not chosen:
            log(
                f"dbt-defer: vars: dbt_defer: never_defer selector {raw!r} matches no node; nothing is "
                "restricted by it — check it for a typo",
                EventLevel.WARN,
            )
        found |= set(chosen)
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
