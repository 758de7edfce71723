"""The chain room: the environments a run defers to — locate, fetch, load, validate — and,
per node, what each environment can serve and which one the chain picks (SPEC §3, §4.5, §7).

Owns ``Environment``, ``Candidate``, loading one environment (``load_environment``) or the
whole chain (``load_chain``), the checks on what is loaded (state not in the target path,
distinct states, the right project, stale). Writing the choice into dbt's manifest is
``merge``. Imports ``config``, ``manifests`` and, lazily, ``remote``; never the warehouse
(existence is a callable handed in), the write guard, the audit or the session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import (
    LoadedManifest,
    ManifestError,
    format_age,
    load_manifest,
    manifest_path_for,
    project_id_for,
)

Location = Tuple[Optional[str], Optional[str], str]  # (database, schema, identifier)
Warn = Callable[[str], None]


class ChainError(RuntimeError):
    """A chain environment that cannot be used as configured; the message is the one line."""


def render(location: Location) -> str:
    return ".".join(part for part in location if part)


@dataclass(frozen=True)
class Candidate:
    """What one chain environment knows about the referenced node."""

    env: str
    location: Optional[Location]  # None: the environment cannot serve it
    problem: Optional[str] = None  # why not, when location is None


def first_existing(candidates: Iterable[Candidate], exists: Callable[[Location], bool]) -> Tuple[Optional[Candidate], List[str]]:
    """The first candidate whose relation exists (SPEC §4.5); else None. Also every place
    looked at before it, as lines for the 'exists nowhere' warning."""
    places = []
    for cand in candidates:
        if cand.location is None:
            places.append(f"{cand.env}: {cand.problem}")
        elif exists(cand.location):
            return cand, places
        else:
            places.append(f"{cand.env}: {render(cand.location)} does not exist in the warehouse")
    return None, places


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


def chain_choice(environments: Sequence[Environment], unique_id: str,
                 exists: Callable[[Location], bool]) -> Tuple[Optional[Environment], List[str]]:
    """The first environment that has the node, did not fail it, and whose relation exists
    (SPEC §4.5); else None and every place looked at."""
    chosen, places = first_existing((env.candidate(unique_id) for env in environments), exists)
    env = None if chosen is None else next(e for e in environments if e.name == chosen.env)
    return env, places


def first_serving(environments: Sequence[Environment], unique_id: str,
                  exists: Callable[[Location], bool]) -> Optional[Environment]:
    """``chain_choice(...)[0]`` without the lines of the places looked at: the same checks
    as ``Environment.candidate`` in the same order, no Candidate nor message built (the merge
    asks this of every node of the project; bench 3b)."""
    for env in environments:
        manifest = env.manifest
        node = manifest.nodes.get(unique_id)
        if node is None or node.materialized == "ephemeral" or unique_id in manifest.unusable:
            continue
        if manifest.bad_status.get(unique_id):
            continue
        if exists((node.database, node.schema, node.identifier)):
            return env
    return None


# --- locate, fetch, load, validate -------------------------------------------------------------


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
    """The local folder/file for an environment's state; a URI (or a local folder ``dbt-defer
    publish`` wrote, through its pointer) is fetched into the cache first
    (a download of another project's manifest is refused before it replaces the cached copy)."""
    from dbt_defer import remote

    fetched = remote.fetched_form(spec)  # a local folder dbt-defer publish wrote: its file:// form
    if fetched is None:
        return spec.state
    return remote.fetch_state(fetched, target_path, warn=warn, project_name=project_name)


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
    deferred run and the CLI both use. Raises ManifestError or ChainError with the clear line.

    ``local``: the state's local folder when the caller has fetched it already. ``native``: dbt's
    own --state (SPEC §2): a state in the target path is dbt's business, only warned about.
    """
    if "{{" in spec.state:
        raise ChainError(
            f"dbt-defer: environment '{spec.name}': state {spec.redact(spec.state)} contains Jinja, which dbt does "
            f"not render inside vars: dbt_defer; set DBT_DEFER_{spec.name.upper()}_STATE instead "
            "(e.g. in your shell or CI job)"
        )
    if local is None:
        local = local_state(spec, target_path, warn, project_name)
    try:
        check_not_target_path(spec, local, target_path)
    except ChainError as exc:
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
            raise ChainError(
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
        what = "this run's own target path" if target == folder else "a folder holding this run's target path"
        raise ChainError(
            f"dbt-defer: environment '{spec.name}' state {source_of(spec)} is {what} "
            f"({target_path}), which dbt overwrites during the run; copy that environment's artifacts "
            "to another folder (e.g. prod-artifacts/) and point the environment there, or use another --target-path"
        )


def target_path_of(config: Any) -> str:
    """The running project's target path (dbt's --target-path, or target-path: in the project)."""
    path = getattr(config, "project_target_path", None)
    if path:
        return path
    return os.path.join(config.project_root, config.target_path)


def inside_state_folder(target_path: str, specs: Iterable[EnvironmentSpec]) -> bool:
    """Is the target path an environment's local state folder, or inside one?"""
    target = os.path.realpath(target_path)
    for spec in specs:
        if spec.is_uri or "\0" in spec.state:
            continue
        state = os.path.realpath(spec.state)
        folder = state if os.path.isdir(state) else os.path.dirname(state)
        if target == folder or target.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False


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
        raise ChainError(
            f"dbt-defer: environment '{spec.name}': {manifest.path} records no project name or "
            f"project_id and {what} of project {project_name!r}, so it cannot be this project's "
            "manifest; point the environment at the manifest.json dbt writes for this project"
        )
    if not same:
        raise ChainError(
            f"dbt-defer: environment '{spec.name}': {manifest.path} is a manifest of project {other!r}, "
            f"not of {project_name!r}; point the environment at this project's artifacts"
        )


def load_chain(specs: Sequence[EnvironmentSpec], target_path: str, project_name: str, *, native: bool,
               max_age_hours: float, warn: Warn, is_compatible: Optional[Callable[[str], bool]] = None) -> List[Environment]:
    """Load every environment of the chain, in order: one clear ChainError line on bad input. Native mode (SPEC §2): dbt reads and judges its own --state, so a problem seen
    there is a warning (that environment is left out), never an error dbt would not raise."""
    if not native:
        check_distinct_states(specs)
    envs = []
    for spec in specs:
        try:
            manifest = load_environment(
                spec, target_path, None if native else project_name, is_compatible=is_compatible,
                native=native, warn=lambda line, spec=spec: warn(spec.redact(line)),
            )
        except (ManifestError, ChainError) as exc:
            if native:
                warn(f"{spec.redact(str(exc))} (dbt's own --defer reads this state; dbt-defer only audits it)")
                continue
            raise ChainError(spec.redact(str(exc))) from None
        envs.append(Environment(spec, manifest))
        stale = stale_warning(spec, manifest, max_age_hours)
        if stale:
            warn(stale)
    return envs


def stale_warning(spec: EnvironmentSpec, manifest: LoadedManifest, max_age_hours: float, now=None) -> Optional[str]:
    """The warning line for a manifest older than max_age_hours, or dated in the future (by more
    than a small clock skew: it would never be stale), or None."""
    ahead = manifest.ahead_hours(now)
    if ahead is not None:
        return (
            f"dbt-defer: environment '{spec.name}' manifest {manifest.path} is dated in the future "
            f"(generated_at {manifest.generated_at}, {format_age(ahead)} ahead of this machine's clock), so "
            f"max_age_hours ({max_age_hours:g}) can never call it stale: check the clock of the machine that "
            "produced it and regenerate that environment's artifacts"
        )
    age = manifest.age_hours(now)
    if age is None or not age > max_age_hours:
        return None
    return (
        f"dbt-defer: environment '{spec.name}' manifest {manifest.path} is {format_age(age)} old "
        f"(generated_at {manifest.generated_at}; max_age_hours {max_age_hours:g}); deferred refs may "
        "read stale tables: refresh that environment's artifacts, or raise vars: dbt_defer: max_age_hours"
    )
