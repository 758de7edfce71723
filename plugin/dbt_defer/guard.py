"""Safety checks (SPEC §7): nothing here writes; each failure is one clear line."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import LoadedManifest, project_id_for

SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}"


class GuardError(RuntimeError):
    pass


def _source(spec: EnvironmentSpec) -> str:
    return f"{spec.source}={spec.state}" if spec.source.startswith(("DBT_", "--")) else spec.state


def local_state(spec: EnvironmentSpec, target_path: str) -> str:
    """The local folder/file for an environment's state; a URI is fetched into the cache first."""
    if not spec.is_uri:
        return spec.state
    from dbt_defer import remote

    return remote.fetch_state(spec, target_path)


def check_not_target_path(spec: EnvironmentSpec, manifest_path: str, target_path: str) -> None:
    folder = os.path.realpath(os.path.dirname(os.path.abspath(manifest_path)))
    if folder == os.path.realpath(target_path):
        raise GuardError(
            f"dbt-defer: environment '{spec.name}' state {_source(spec)} is this run's own target path "
            f"({target_path}), which dbt overwrites during the run; copy that environment's artifacts "
            "to another folder (e.g. prod-artifacts/) and point the environment there"
        )


def check_project(spec: EnvironmentSpec, manifest: LoadedManifest, project_name: str) -> None:
    if manifest.project_name:
        other = manifest.project_name
        same = other == project_name
    elif manifest.project_id:
        other = f"project_id {manifest.project_id}"
        same = manifest.project_id == project_id_for(project_name)
    else:
        return
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


def _same(a: Any, b: Any) -> bool:
    return (a or "").lower() == (b or "").lower()


def check_writes(selected: Iterable[str], manifest: Any, environments: Iterable[Any]) -> None:
    """Refuse when a selected node would be written where a chain environment keeps it."""
    envs = list(environments)
    for uid in sorted(selected):
        node = manifest.nodes.get(uid)
        if node is None or node.resource_type not in ("model", "seed", "snapshot") or node.is_ephemeral_model:
            continue
        mine = (node.database, node.schema, node.alias or node.name)
        for env in envs:
            other = env.manifest.nodes.get(uid)
            if other is None:
                continue
            if all(_same(x, y) for x, y in zip(mine, other.location)):
                where = ".".join(p for p in mine if p)
                raise GuardError(
                    f"dbt-defer: refusing to write {uid} into {where}: environment '{env.name}' "
                    f"({_source(env.spec)}) records that same relation for it. Point your target at a "
                    "development schema, or unset DBT_DEFER / --defer in production jobs. Nothing was written."
                )


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
